"""Training checkpoints that never run code when loaded and never resume silently from damaged files.

Accelerate's `save_state` writes the model (safetensors), the optimizer (`optimizer.bin`, read back with
`torch.load(weights_only=True)`) and its own RNG pickle; everything else a PosSAM checkpoint holds is written here as
JSON or safetensors: the LR scheduler (`scheduler.json`; accelerate would pickle a registered object and unpickle it
with `weights_only=False`, i.e. run whatever a planted file says), each process's random generators
(`rng_state_{rank}.safetensors` + `.json`, which override accelerate's pickle on resume, so a damaged or refused pickle
cannot change the run) and a manifest of every file's size and SHA-256 (`manifest.json`), checked before anything is
loaded: a truncated or altered file is an error naming it and the previous checkpoint, not a run that drifts.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import cast

import numpy as np
import torch


__all__ = [
    "CHECKPOINT_PATTERN",
    "MANIFEST_FILE",
    "SCHEDULER_FILE",
    "CheckpointError",
    "list_checkpoints",
    "load_rng_state",
    "load_scheduler",
    "save_rng_state",
    "save_scheduler",
    "verify_manifest",
    "write_manifest",
]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MANIFEST_FILE = "manifest.json"
SCHEDULER_FILE = "scheduler.json"
_HASH_CHUNK = 16 * 1024 * 1024


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: missing, damaged or altered files (the message names them)."""


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (half-written ones have a temporary name)."""
    found = [
        (int(match.group(1)), path)
        for path in Path(output_dir).glob("checkpoint-*")
        if (match := CHECKPOINT_PATTERN.match(path.name))
    ]
    return [path for _, path in sorted(found)]


def _previous_hint(folder: Path) -> str:
    older = [path for path in list_checkpoints(folder.parent) if path.name != folder.name]
    match = CHECKPOINT_PATTERN.match(folder.name)
    if match:
        step = int(match.group(1))
        older = [
            path
            for path in older
            if (older_match := CHECKPOINT_PATTERN.match(path.name)) and int(older_match.group(1)) < step
        ]
    if older:
        return f" Resume from the previous checkpoint instead: --resume_from_checkpoint {older[-1]}"
    return " No earlier checkpoint of this run exists: start again from the model."


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> Path:
    """Record the size and SHA-256 of every file under `folder` (call once all processes have written theirs)."""
    folder = Path(folder)
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST_FILE)
    manifest = {
        str(path.relative_to(folder)): {"bytes": path.stat().st_size, "sha256": _sha256(path)} for path in files
    }
    target = folder / MANIFEST_FILE
    target.write_text(json.dumps({"format": 1, "files": manifest}, indent=1))
    return target


def verify_manifest(folder: Path) -> None:
    """
    Raise `CheckpointError` naming the first problem of a checkpoint folder: a damaged manifest, a listed file that is
    missing, truncated or altered, a name that leaves the folder or a symbolic link (a planted manifest must not make
    us read other files), or a file that the manifest does not list (a planted file).
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    hint = _previous_hint(folder)
    try:
        files = json.loads(path.read_text())["files"]
    except FileNotFoundError:
        raise CheckpointError(
            f"{folder} has no {MANIFEST_FILE}: it was not written by this version of training/train.py or is incomplete, "
            f"so its files cannot be checked.{hint}"
        ) from None
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is damaged ({type(error).__name__}: {error}).{hint}") from None
    if not isinstance(files, dict):
        raise CheckpointError(f"{path} is damaged (its 'files' entry is not a mapping).{hint}")
    root = folder.resolve()
    for name, expected in files.items():
        if (
            not isinstance(expected, dict)
            or not isinstance(expected.get("bytes"), int)
            or not isinstance(expected.get("sha256"), str)
        ):
            raise CheckpointError(
                f"{path} is damaged (the entry of {name!r} is not {{'bytes': int, 'sha256': str}}).{hint}"
            )
        file = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not file.resolve().is_relative_to(root):
            raise CheckpointError(f"{path} names {name!r}, which is outside the checkpoint folder: refused.{hint}")
        if file.is_symlink() or not file.is_file():
            raise CheckpointError(f"{file} is missing from the checkpoint (or is not a regular file).{hint}")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"{file} has {size} bytes, {expected['bytes']} were written: it is truncated or damaged.{hint}"
            )
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(
                f"{file} does not match the checksum recorded when it was written: it is damaged.{hint}"
            )
    unlisted = sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.name != MANIFEST_FILE and str(p.relative_to(folder)) not in files
    )
    if unlisted:
        raise CheckpointError(
            f"{folder} holds files its manifest does not list: {unlisted[:5]}. Remove them or resume from another checkpoint.{hint}"
        )


def save_scheduler(folder: Path, scheduler) -> None:
    """The LR scheduler's state as JSON (its lambdas are rebuilt from the command line, not stored)."""
    state = {key: value for key, value in scheduler.state_dict().items() if key != "lr_lambdas"}
    (Path(folder) / SCHEDULER_FILE).write_text(json.dumps(state))


def load_scheduler(folder: Path, scheduler) -> None:
    path = Path(folder) / SCHEDULER_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}).{_previous_hint(Path(folder))}") from None
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})


def _rng_paths(folder: Path, rank: int) -> tuple[Path, Path]:
    return Path(folder) / f"rng_state_{rank}.safetensors", Path(folder) / f"rng_state_{rank}.json"


def save_rng_state(folder: Path, rank: int) -> None:
    """This process's Python, NumPy (global) and torch (CPU and CUDA) generator states, as safetensors + JSON."""
    from safetensors.torch import save_file

    version, python_state, gauss = random.getstate()
    # The global generator is always MT19937, whose legacy state is this tuple (never the dict numpy's stubs allow).
    kind, keys, position, has_gauss, cached_gaussian = cast(
        tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True)
    )
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    tensor_path, json_path = _rng_paths(folder, rank)
    save_file(tensors, str(tensor_path))
    json_path.write_text(
        json.dumps(
            {
                "python": {"version": version, "state": list(python_state), "gauss": gauss},
                "numpy": {
                    "kind": kind,
                    "position": int(position),
                    "has_gauss": int(has_gauss),
                    "cached_gaussian": float(cached_gaussian),
                },
            }
        )
    )


def load_rng_state(folder: Path, rank: int) -> None:
    """Restore what `save_rng_state` wrote; any problem is a `CheckpointError` naming the file (never a silent skip)."""
    from safetensors.torch import load_file

    tensor_path, json_path = _rng_paths(folder, rank)
    hint = _previous_hint(Path(folder))
    try:
        tensors = load_file(str(tensor_path))
        meta = json.loads(json_path.read_text())
        python, numpy_meta = meta["python"], meta["numpy"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
        np.random.set_state(
            (
                numpy_meta["kind"],
                tensors["numpy_keys"].numpy().astype(np.uint32),
                numpy_meta["position"],
                numpy_meta["has_gauss"],
                numpy_meta["cached_gaussian"],
            )
        )
        torch.set_rng_state(tensors["torch_cpu"])
        cuda_keys = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
        cuda_states = [tensors[key] for key in cuda_keys]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
    except Exception as error:
        raise CheckpointError(
            f"The random-generator state of process {rank} ({tensor_path.name}, {json_path.name} in {folder}) cannot be "
            f"restored ({type(error).__name__}: {error}); resuming without it would not reproduce the run.{hint}"
        ) from None
