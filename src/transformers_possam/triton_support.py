"""What this package's Triton kernels share: whether Triton can run on a device, and the device to launch on."""

from __future__ import annotations

import contextlib
import os

import torch


__all__ = ["on_launch_device", "triton_runs_on"]


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on `device`: CUDA with Triton installed (or Triton's CPU interpreter,
    `TRITON_INTERPRET=1`, which runs them on CPU tensors for testing)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def on_launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context to launch a kernel for tensors on `device` in: Triton launches on the current CUDA device, which
    need not be the tensors'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
