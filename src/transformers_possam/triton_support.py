"""What this package's Triton kernels share: whether Triton can run on a device, and the device to launch on."""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch


__all__ = ["on_launch_device", "triton_runs_on"]


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on `device`: CUDA where Triton is installed and can launch kernels
    (`_triton_launches_on_cuda`), or any device under Triton's CPU interpreter (`TRITON_INTERPRET=1`, which runs them
    on CPU tensors for testing)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if torch.compiler.is_compiling():
        # no Triton kernel of this package runs inside a trace, and the probe's call into Triton's driver cannot be
        # traced (Dynamo runs a cached function's body at every compile)
        return False
    return torch.device(device).type == "cuda" and _triton_launches_on_cuda()


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
