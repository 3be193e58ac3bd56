"""Shared helpers of the benchmark suite: timing, memory readings, the full-size B model, the test image."""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def summary(times: list[float]) -> dict:
    """Median and spread of repeated timings (seconds)."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm", encoding="utf-8") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class StageTimer:
    """Wall time spent inside chosen methods of chosen objects (wrapped on the instance, restored by `restore`)."""

    def __init__(self):
        self.spent: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._wrapped: list[tuple[object, str]] = []

    def wrap(self, owner, method: str, stage: str) -> None:
        original = getattr(owner, method)

        def timed_method(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[stage] += time.perf_counter() - start
                self.calls[stage] += 1

        setattr(owner, method, timed_method)
        self._wrapped.append((owner, method))

    def reset(self) -> None:
        self.spent.clear()
        self.calls.clear()

    def restore(self) -> None:
        for owner, method in self._wrapped:
            delattr(owner, method)  # the instance attribute hid the class method
        self._wrapped.clear()

    @contextmanager
    def active(self):
        try:
            yield self
        finally:
            self.restore()


def test_image(height: int = 683, width: int = 1024, seed: int = 0):
    """A deterministic natural-looking RGB test image (smooth blobs plus noise), PIL."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(12):
        cy, cx, radius = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(40, 250)
        blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius**2))
        image += blob[..., None] * rng.uniform(0, 255, 3)
    image = np.clip(image / image.max() * 230 + rng.normal(0, 8, image.shape), 0, 255)
    return Image.fromarray(image.astype(np.uint8))


def full_size_model(seed: int = 0):
    """PosSAM-B at full size with random weights (no Hub access here), eval mode, SAM attention in sdpa."""
    from transformers_possam import PosSAMConfig, PosSAMForPanopticSegmentation

    torch.manual_seed(seed)
    config = PosSAMConfig()
    config.vision_config._attn_implementation = "sdpa"
    return PosSAMForPanopticSegmentation(config).eval()


def random_vocabulary(model, num_classes: int = 150, seed: int = 0):
    """Unit-norm class embeddings `(K, 1, D)` standing in for an encoded vocabulary (text towers never run per image)."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(num_classes, 1, model.config.clip_embed_dim, generator=generator)
    return torch.nn.functional.normalize(embeddings, dim=-1)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# --- command-line arguments shared by the scripts: a careless value is a usage error naming the flag (argparse adds
# it to an `ArgumentTypeError`'s message), found before anything is built or measured

# what `--variant(s)` accepts: the tiny config, or a model card's config (model_cards/possam-vit-*)
VARIANTS = ("tiny", "vit-b", "vit-l", "vit-h")
# what `--dtype` accepts (torch's names)
FLOAT_DTYPES = ("bfloat16", "float16", "float32")


def positive_int(text: str) -> int:
    """An integer of at least 1 (repeats, steps, batch sizes, rows, threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (at least 1)")
    return value


def positive_seconds(text: str) -> float:
    """A finite number of seconds above 0 (time budgets)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds above 0")
    return value


def device_name(text: str) -> str:
    """A device torch knows (`cpu`, `cuda`, `cuda:1`, ...) that this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text}: CUDA is not available here; use --device cpu (and the tiny variant)"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA devices")
    return text


def output_file(text: str) -> str:
    """A file path whose folder exists and which is not itself a folder (checked before a run, not after it)."""
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)):  # (Path drops a trailing slash)
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    if not path.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder of {text} does not exist; create it first")
    return text
