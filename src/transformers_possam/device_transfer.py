"""
Host-to-device copies that do not wait for the device: the one rule the forward and the post-processing follow
for the small constants they build on the host (sizes, channel statistics, index grids).

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

import torch


__all__ = ["to_device"]


def to_device(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`values.to(device)`; from host memory to a CUDA device without waiting for the device."""
    return values.to(device, non_blocking=values.device.type == "cpu" and torch.device(device).type == "cuda")
