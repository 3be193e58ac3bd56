"""
Host-to-device copies that do not wait for the device: the one rule the forward and the post-processing follow
for the small constants they build on the host (sizes, channel statistics, index grids).

A blocking host-to-device copy (`torch.tensor(values, device=cuda)`, `tensor.to(cuda)`, a CUDA tensor indexed with
a CPU index) synchronizes the stream: the host waits for every queued kernel before it goes on queueing, and
`torch.cuda.set_sync_debug_mode("error")` reports it. An asynchronous copy from pageable host memory is staged by
the driver before the call returns, so the source may be freed right after and nothing waits.
"""

from __future__ import annotations

import torch


__all__ = ["to_device"]


def to_device(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`values.to(device)`, without waiting for the device when the copy goes from host memory to an accelerator."""
    return values.to(device, non_blocking=values.device.type == "cpu" and torch.device(device).type != "cpu")
