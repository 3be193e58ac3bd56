"""
Small constants on the device (sizes, channel statistics, index grids): copied from the host without waiting for
the device (`to_device`), and made once per arguments and device in eager mode (`DeviceConstants`). The one rule the
forward and the post-processing follow.

A blocking host-to-device copy (`torch.tensor(values, device=cuda)`, `tensor.to(cuda)`, a CUDA tensor indexed with
a CPU index, or assigned a CPU value) synchronizes the stream: the host waits for every queued kernel before it goes
on queueing, and `torch.cuda.set_sync_debug_mode("error")` reports it. An asynchronous CUDA copy from pageable host
memory is staged by the driver before the call returns, so the source may be freed right after; CUDA documents that
the staging "may" synchronize, which for the few bytes here it does not in practice (benchmarks/device_check.py's
stall check measures it on a GPU). Only CUDA (and ROCm, which PyTorch calls "cuda") gets the asynchronous copy: on
MPS a non-blocking copy from a temporary host tensor can read it after it is freed (PyTorch issues #139550,
#189690), and other accelerators are not known to be safe, so they copy as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch._subclasses.fake_tensor import is_fake


__all__ = ["DeviceConstants", "to_device"]

_Constants = TypeVar("_Constants")


def to_device(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`values.to(device)`; from host memory to a CUDA device without waiting for the device."""
    return values.to(device, non_blocking=values.device.type == "cpu" and torch.device(device).type == "cuda")


class DeviceConstants(Generic[_Constants]):
    """
    `make(*arguments)` (hashable arguments, the device among them), made once per arguments in eager mode: the
    constants of a layer (index grids, one-hot grids, resize taps) would otherwise cost a few small kernels, or a
    host-to-device copy, in every forward. Made outside inference mode (a pipeline call may come first), so a later
    training forward can save them for backward; never written to by their users. Traced graphs (`torch.compile`,
    `torch.export`) compute them in the graph, and fake tensors (shapes only, given as `like`) must not fill the
    cache that real ones read: both get `make(*arguments)` each time.

    Call as `constants(*arguments, like=tensor)`; `cache_info` / `cache_clear` as `functools.lru_cache`'s.
    """

    def __init__(self, make: Callable[..., _Constants], maxsize: int = 64):
        self.make = make

        @functools.lru_cache(maxsize=maxsize)
        def cached(*arguments) -> _Constants:
            with torch.inference_mode(False):
                return make(*arguments)

        self._cached = cached
        self.cache_info = cached.cache_info
        self.cache_clear = cached.cache_clear

    def __call__(self, *arguments, like: torch.Tensor) -> _Constants:
        if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing() or is_fake(like):
            return self.make(*arguments)
        return self._cached(*arguments)
