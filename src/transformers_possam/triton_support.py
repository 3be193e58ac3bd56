"""
What this package's Triton kernels share: whether Triton can run on a device, the device to launch on, and the
PyTorch path where a kernel cannot be built on this machine.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import subprocess
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch
from torch._subclasses.fake_tensor import is_fake


__all__ = [
    "TritonKernelFallbackWarning",
    "TritonLanguageTooOld",
    "gives_way_to_pytorch",
    "kernel_op",
    "kernels_not_built",
    "launch_or_fall_back",
    "on_launch_device",
    "triton_runs_on",
]

_Result = TypeVar("_Result")


class TritonKernelFallbackWarning(RuntimeWarning):
    """One of this package's Triton kernels could not be built on this machine; its PyTorch path runs instead."""


class TritonLanguageTooOld(RuntimeError):
    """This machine's Triton lacks a `triton.language` function a kernel uses (an older release): the kernel cannot
    be built here, as with any other build failure (`launch_or_fall_back`)."""


def require_triton_language(*names: str) -> None:
    """Raise `TritonLanguageTooOld` unless `triton.language` has every one of `names` (e.g. `gather`, Triton 3.3)."""
    import triton
    import triton.language as tl

    missing = [name for name in names if not hasattr(tl, name)]
    if missing:
        raise TritonLanguageTooOld(
            f"Triton {getattr(triton, '__version__', '?')} has no triton.language.{', '.join(missing)}; a newer "
            "Triton (PyTorch's own, for a recent torch) has."
        )


# the kernels (with the key their caller gives: dtype, ...) that failed to build in this process
_unbuildable: set[Hashable] = set()


def launch_or_fall_back(kernel: Hashable, launch: Callable[[], _Result], fallback: Callable[[], _Result]) -> _Result:
    """
    `launch()`, a Triton kernel's launch (its first one for new arguments compiles it); where Triton fails to build
    the kernel on this machine (`_is_build_failure`: ptxas, more shared memory or registers than the GPU gives a
    block, a failed lowering pass, a cache it cannot write, a missing tool), one `TritonKernelFallbackWarning` naming
    the error, and `fallback()`, the same result from PyTorch, for this call and every later one with the same
    `kernel` key (callers put the device and the kernel's compile-time settings in it). `triton_runs_on` only asks
    whether Triton's driver builds; this covers what it cannot see before a kernel is compiled. Errors in a kernel's
    own source (`CompilationError`), invalid inputs and CUDA faults propagate, and so does every error under Triton's
    interpreter, where the tests must see the kernels' own failures. `kernels_not_built` lists the keys that fell
    back (benchmarks/device_check.py fails on any).
    """
    if kernel in _unbuildable:
        return fallback()
    try:
        return launch()
    except Exception as error:
        if _interpreting() or not _is_build_failure(error):
            raise
        failure = f"{type(error).__name__}: {error}"
    # outside the handler: the failed launch's frames (and its argument copies) are not kept alive by the traceback
    # while the fallback runs, and an error of the fallback is not reported as raised while handling this one
    warnings.warn(
        f"PosSAM's Triton kernel {kernel} could not be built here ({failure[:1000]}); its PyTorch path runs instead "
        "(slower) for the rest of this process.",
        TritonKernelFallbackWarning,
        stacklevel=3,
    )
    _unbuildable.add(kernel)  # after the warning: with warnings as errors, the next call tries (and raises) again
    return fallback()


def kernels_not_built() -> list[str]:
    """The kernels (with their callers' keys) that could not be built in this process, whose PyTorch paths ran."""
    return sorted(map(str, _unbuildable))


@torch.compiler.assume_constant_result  # called, not traced, by torch.compile: Triton's knobs read a C function
def _interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET`, any spelling Triton accepts)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # an older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def _is_build_failure(error: BaseException) -> bool:
    """
    What a machine can make fail while Triton builds a correct kernel: ptxas (`PTXASError`), too little shared
    memory, registers or threads (`OutOfResources`), a lowering pass (MLIR's `PassManager::run failed`, raised as a
    plain RuntimeError), the filesystem (a cache that cannot be written, a tool not found: `OSError`) and a tool that
    failed (`CalledProcessError`), and a Triton too old for the kernel (`TritonLanguageTooOld`). Not
    `CompilationError`: for these kernels it means an error in the kernel's source (the sampler and the assignment
    use no `tl.dot` and no fp8; the SAM attention kernel's `tl.dot` and `tl.gather` compiled for sm_75, sm_80 and
    sm_90 in 16-bit and float32 with Triton 3.8 without a GPU, docs/design.md "Seventeenth session"),
    which must be seen, not hidden behind the PyTorch path.
    """
    from triton.runtime.errors import OutOfResources, PTXASError

    if isinstance(error, (PTXASError, OutOfResources, OSError, subprocess.CalledProcessError, TritonLanguageTooOld)):
        return True
    return type(error) is RuntimeError and "PassManager::run failed" in str(error)


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on `device`: CUDA where Triton is installed and can launch kernels
    (`_triton_launches_on_cuda`), or any device under Triton's CPU interpreter (`TRITON_INTERPRET=1`, which runs them
    on CPU tensors for testing)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if _interpreting():
        return True
    if torch.device(device).type != "cuda":
        return False
    if torch.compiler.is_compiling():
        # the probe's call into Triton's driver cannot be traced (Dynamo would run a cached function's body at every
        # compile, and it skips Triton's modules): a trace takes its answer as a constant
        return _triton_launches_on_cuda_as_a_constant()
    return _triton_launches_on_cuda()


@torch.compiler.assume_constant_result
def _triton_launches_on_cuda_as_a_constant() -> bool:
    """`_triton_launches_on_cuda()`, called (not traced) by `torch.compile`, its answer a constant of the graph."""
    return _triton_launches_on_cuda()


def _build_cuda_driver() -> None:
    """Triton's CUDA driver module, which Triton compiles from C with the system's compiler into its cache at first
    use (`triton.runtime.driver.active.utils`)."""
    from triton.runtime import driver

    driver.active.utils  # the attribute access builds it


@functools.cache
def _triton_launches_on_cuda() -> bool:
    """
    Whether Triton can launch kernels on this machine's CUDA devices, asked once per process. Triton comes with
    every Linux CUDA build of torch, but its first launch compiles a C module with the system's C compiler into a
    writable cache: a slim container without a compiler, or with a read-only home, has Triton and cannot launch. There
    the package's PyTorch paths run instead, with one warning saying why. False without CUDA (fake CUDA tensors on a
    CPU-only machine), silently.
    """
    if not torch.cuda.is_available():
        return False
    try:
        _build_cuda_driver()
    except Exception as error:  # whatever stops Triton here, the PyTorch paths work
        warnings.warn(
            f"Triton is installed but cannot launch kernels here ({type(error).__name__}: {error}); PosSAM runs its "
            "PyTorch paths on CUDA instead (slower). Installing a C compiler (gcc) and making Triton's cache "
            "writable (TRITON_CACHE_DIR) enables its Triton kernels.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def on_launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context to launch a kernel for tensors on `device` in: Triton launches on the current CUDA device, which
    need not be the tensors'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def gives_way_to_pytorch(kernel: Callable, inputs: Sequence[torch.Tensor]) -> bool:
    """
    Whether a kernel marked `inference_only` (this package's Triton kernels: float32 at most, no backward unless
    also marked `has_backward`) must give way to its PyTorch form for these `inputs` (the first one holds the
    dtype): where autograd needs a gradient of one of them (unless the kernel has a true `has_backward` attribute:
    an op with its own backward kernel, `kernel_op(..., backward=...)`), for float64, and in portable traces
    (`torch.export`, `torch.jit.trace`: an exported graph runs where this package's ops may not exist); unless the
    kernel is a registered op (a true `compiles_as_an_op` attribute, `kernel_op`), also in `torch.compile` traces
    and for fake tensors, which only an op's fake implementation serves. False for an unmarked kernel.
    """
    if not getattr(kernel, "inference_only", False):
        return False
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        return True
    if inputs[0].dtype == torch.float64:
        return True
    if not getattr(kernel, "has_backward", False) and (
        torch.is_grad_enabled() and any(tensor.requires_grad for tensor in inputs)
    ):
        return True
    if getattr(kernel, "compiles_as_an_op", False):
        return False
    # (in this order: a trace never asks whether its tensors are fake)
    return torch.compiler.is_compiling() or is_fake(inputs[0])


def kernel_op(
    module_name: str,
    name: str,
    launch: Callable,
    fake: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
) -> Callable:
    """
    `launch` (a kernel's eager entry, type-annotated with what `torch.library.custom_op` accepts) as a custom op
    without side effects on its inputs, `fake` (the same arguments, an empty result of the right shape and dtype)
    its fake implementation: `torch.compile` then puts the kernel in its graphs (CUDA graphs capture it too) and
    fake tensors get shapes. The namespace comes from `module_name` (`__name__` of the caller): every copy of this
    package in a process (the installed one, a checkpoint's remote code under `transformers_modules`, whose folder
    names may hold any character) registers its own ops under its name in ASCII letters, digits and underscores
    (what `torch.library` accepts) and a hash of the whole name (two names that read the same in ASCII stay
    apart); a module imported again (`importlib.reload`) finds its ops registered and gets them back. `backward` and
    `setup_context` (`torch.library.register_autograd`'s): the op's gradient formula, for a kernel with a backward.
    """
    readable = re.sub(r"[^0-9A-Za-z]+", "_", module_name).strip("_")
    namespace = f"{readable}_{hashlib.sha256(module_name.encode()).hexdigest()[:8]}"
    registered = getattr(torch.ops, namespace)
    if hasattr(registered, name):
        return getattr(registered, name)
    op = torch.library.custom_op(f"{namespace}::{name}", mutates_args=())(launch)
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op
