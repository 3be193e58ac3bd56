"""How the input checks that read tensor *values* run (NaN, 0/1 masks, empty synonym rows, IoU range).

Reading a value of a tensor on an accelerator (`bool(t)`, `.item()`, `.tolist()`) waits for the device to finish all
queued work: a host synchronization, which stalls the CPU's kernel queue and breaks CUDA graphs. Three modes:

- `"eager"`: the check reads its condition at once and raises the detailed `ValueError` (naming the input and the
  offending values). One host synchronization per check; the default on CPU, where it costs nothing.
- `"async"`: the condition is computed on the device and handed to `torch._assert_async`; nothing waits. On CPU it
  raises at once (a `RuntimeError` with the check's message); on CUDA a failed check is a device-side assert that
  surfaces at the next synchronization, without the message or the offending values, and leaves the process's CUDA
  context unusable (restart the process; rerun the input with `value_checks("eager")` to see which check failed).
  The default on CUDA devices.
- `"auto"` (the default): `"eager"` on CPU and on devices without an asynchronous assert kernel (MPS), `"async"` on
  CUDA (and ROCm, which PyTorch calls "cuda"); except the training targets' checks, eager everywhere under "auto":
  the loss's Hungarian matching reads the device a moment later anyway (`require(..., synchronizes_anyway=True)`).

While `torch.compile`, `torch.export` or TorchScript trace the model the value checks are skipped: they are
data-dependent branches (`_checking_values` in `modeling_possam`); shape and dtype checks always run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch


__all__ = ["ValueCheckMode", "all_finite", "require", "resolved_mode", "value_checks"]

ValueCheckMode = Literal["auto", "eager", "async"]
_MODES = ("auto", "eager", "async")
_mode: ContextVar[str] = ContextVar("possam_value_checks", default="auto")


@contextmanager
def value_checks(mode: ValueCheckMode) -> Iterator[None]:
    """
    Runs the block with PosSAM's value checks in `mode` ("auto", "eager" or "async", see the module doc), e.g.
    `with value_checks("eager"): model(**inputs)` to get the detailed error messages on a GPU.

    Raises:
        ValueError: `mode` is not one of the three.
    """
    if mode not in _MODES:
        raise ValueError(f"value_checks mode must be one of {_MODES}, got {mode!r}.")
    token = _mode.set(mode)
    try:
        yield
    finally:
        _mode.reset(token)


def resolved_mode(device: torch.device, synchronizes_anyway: bool = False) -> Literal["eager", "async"]:
    """
    The mode the checks of tensors on `device` run in now: `"auto"` resolved by the device type, except for checks
    whose caller synchronizes soon anyway (`synchronizes_anyway`: the training targets' checks, before the loss's
    Hungarian matching reads its costs on the host), which `"auto"` keeps eager on every device: their detailed
    error costs one short wait, where a device-side assert would cost the process its CUDA context.
    """
    mode = _mode.get()
    if mode == "auto":
        return "async" if device.type == "cuda" and not synchronizes_anyway else "eager"
    return "async" if mode == "async" else "eager"


def require(
    condition: torch.Tensor,
    message: str,
    error: Callable[[], Exception] | None = None,
    synchronizes_anyway: bool = False,
) -> None:
    """
    Checks a 0-d bool `condition` computed on the tensors' device. Eager mode: raises `error()` (default:
    `ValueError(message)`) when it is False, after one host synchronization. Async mode: `torch._assert_async`
    with `message`, no synchronization. `synchronizes_anyway`: see `resolved_mode`.
    """
    if resolved_mode(condition.device, synchronizes_anyway) == "async":
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise error() if error is not None else ValueError(message)


def all_finite(values: torch.Tensor) -> torch.Tensor:
    """
    0-d bool on `values`' device: no NaN and no infinity in `values`, for `require`. One reduction pass without a
    full-size temporary: `torch.aminmax` propagates NaN, and an infinity is the minimum or the maximum.
    (`torch.isfinite(values).all()` builds full-size temporaries: for a batch of mask logits that was most of the
    panoptic inference's time on CPU.)
    """
    if values.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=values.device)
    low, high = torch.aminmax(values)
    return torch.isfinite(low) & torch.isfinite(high)
