"""Reading public checkpoints without running code: safetensors, or `torch.load(weights_only=True)`."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch


__all__ = ["load_weights_file"]


def load_weights_file(path, what: str = "checkpoint") -> dict:
    """
    A `.safetensors` file, or a PyTorch file read with `weights_only=True` (PyTorch's restricted unpickler: tensors,
    containers and numbers, never arbitrary objects or code). detectron2-style `{"model": state_dict}` wrappers are
    unwrapped. Any failure is a `ValueError` naming the file; the result is checked to be a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"The {what} {path} does not exist or is not a file.")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    checkpoint: object
    try:
        if path.suffix == ".safetensors":
            checkpoint = load_file(str(path))
        else:
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zipfile.BadZipFile,
        AttributeError,
        SafetensorError,
    ) as error:
        raise ValueError(
            f"The {what} {path} cannot be read as safetensors or as a weights-only PyTorch file ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Only plain tensors are loaded, never pickled objects or code: "
            "convert the file to safetensors, or re-save its state dict with torch.save(model.state_dict(), ...)."
        ) from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not all(
        isinstance(key, str) and torch.is_tensor(value) for key, value in checkpoint.items()
    ):
        raise ValueError(
            f"The {what} {path} does not hold a state dict (a mapping of names to tensors), got {type(checkpoint).__name__}."
        )
    return checkpoint
