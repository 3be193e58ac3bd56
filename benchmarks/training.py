"""
Target 6: training throughput of the tiny config (the real `training/train.py` loop, CPU) and the data path alone; one
PosSAM-B training step at full size (1024x1024, batch 2, CPU, random weights): seconds per step and peak RSS, in a
fresh subprocess (`python benchmarks/training.py --full-size-step --batch 2`). `make_training_step` is also the GPU
suite's bf16 training step (`gpu.py`).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from common import positive_int


ROOT = Path(__file__).resolve().parents[1]


def _training_script() -> ModuleType:
    """`training/train.py` loaded by path under a private name (`training/` on sys.path would shadow `evaluate`)."""
    spec = importlib.util.spec_from_file_location("possam_training_train", ROOT / "training" / "train.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"{ROOT / 'training' / 'train.py'} cannot be loaded as a Python module.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _loop_seconds(steps: int, folder: str) -> float:
    train = _training_script()
    start = time.perf_counter()
    train.main(
        [
            "--max_steps",
            str(steps),
            "--output_dir",
            folder,
            "--toy_train_size",
            "64",
            "--per_device_train_batch_size",
            "2",
        ]
    )
    return time.perf_counter() - start


def _jpeg_rows(size: int, count: int):
    """Toy panoptic rows at `size` x `size`, images stored as JPEG (like COCO) and labels as PNG."""
    from PIL import Image

    from transformers_possam.data.synthetic import toy_panoptic_rows

    rows = []
    for row in toy_panoptic_rows(count, size=size, seed=1):
        buffer = io.BytesIO()
        row["image"].save(buffer, format="JPEG", quality=90)
        row["image"] = Image.open(io.BytesIO(buffer.getvalue()))
        rows.append(row)
    return rows


def _data_path_images_per_second(size: int, processor_size: int, count: int) -> float:
    from datasets import Dataset

    from transformers_possam import PosSAMImageProcessor
    from transformers_possam.data.stream import PanopticTrainStream
    from transformers_possam.data.synthetic import TOY_CATEGORIES
    from transformers_possam.vocabularies import Vocabulary

    dataset = Dataset.from_list(_jpeg_rows(size, count))
    processor = PosSAMImageProcessor(
        size={"longest_edge": processor_size}, pad_size={"height": processor_size, "width": processor_size}
    )
    stream = PanopticTrainStream(
        dataset, processor, Vocabulary.from_categories(TOY_CATEGORIES).label_map, shuffle_buffer=0
    )
    samples = iter(stream)
    next(samples)  # warm-up
    start = time.perf_counter()
    for _ in range(count - 1):
        next(samples)
    return (count - 1) / (time.perf_counter() - start)


def make_training_batch(
    model, batch_size: int, device: torch.device, num_classes: int = 133, segments: int = 20, seed: int = 0
) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """
    The keyword arguments of one training forward on `device`: `batch_size` random images at the model's input size,
    a normalized random vocabulary of `num_classes` classes (COCO's 133 by default), and `segments` ground-truth masks
    per image (uint8 bands at full resolution, as `PosSAMImageProcessor` gives them) with random classes.
    """
    size = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    class_embeddings = torch.nn.functional.normalize(
        torch.randn(num_classes, 1, model.config.clip_embed_dim, generator=generator), dim=-1
    ).to(device)
    band = torch.arange(size) * segments // size
    masks = (band[None, :, None] == torch.arange(segments)[:, None, None]).expand(segments, size, size)
    return {
        "pixel_values": pixel_values,
        "class_embeddings": class_embeddings,
        "mask_labels": [masks.to(torch.uint8).to(device) for _ in range(batch_size)],
        "class_labels": [
            torch.randint(0, num_classes, (segments,), generator=generator).to(device) for _ in range(batch_size)
        ],
    }


def make_training_step(
    model,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    num_classes: int = 133,
    segments: int = 20,
    seed: int = 0,
) -> Callable[[], float]:
    """
    One training step of `model` as training/train.py runs it with the paper's recipe: forward on
    `make_training_batch(model, batch_size, device, num_classes, segments, seed)`, the loss, backward, full-model
    gradient clipping at 0.01, AdamW over FC-CLIP's parameter groups (frozen encoders excluded). `autocast_dtype`
    runs the forward under `torch.autocast` as accelerate's `--mixed_precision` does (weights and optimizer stay
    float32). Returns `step() -> loss`.
    """
    from transformers_possam.optimization import make_optimizer, parameter_groups

    model.train()
    groups = parameter_groups(model, 1e-4, 0.05)
    optimizer = make_optimizer(groups, 1e-4)
    trainable = [parameter for group in groups for parameter in group["params"]]
    batch = make_training_batch(model, batch_size, device, num_classes, segments, seed)

    def step() -> float:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _full_size_step(batch_size: int, steps: int, variant: str = "vit-b") -> dict:
    """PosSAM-B (`PosSAMConfig()`, SAM-B) training steps at 1024x1024 on CPU: seconds per step, peak RSS."""
    from common import current_rss_bytes, full_size_model, peak_rss_bytes, weight_bytes

    if variant == "tiny":  # the same code on the tiny config, for the tests
        from transformers_possam import PosSAMForPanopticSegmentation, tiny_config

        model = PosSAMForPanopticSegmentation(tiny_config())
    else:
        model = full_size_model()
    step = make_training_step(model, batch_size, torch.device("cpu"))
    rss_before = current_rss_bytes()
    seconds, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        seconds.append(time.perf_counter() - start)
    return {
        "batch": batch_size,
        "image_size": model.config.vision_config.image_size,
        "step_seconds": seconds,
        "losses": losses,
        "weight_bytes": weight_bytes(model),
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
    }


def full_size_step_row(batch_size: int = 2, steps: int = 2, variant: str = "vit-b") -> dict:
    """`_full_size_step` in a fresh subprocess (peak RSS is per process), as a target-6 figure."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--full-size-step",
        "--batch",
        str(batch_size),
        "--steps",
        str(steps),
        "--variant",
        variant,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    # the first step also allocates the optimizer state: the last one is the steady-state figure
    return {
        "target": 6,
        "figure": f"one PosSAM-B training step, batch {batch_size} at 1024x1024 (CPU, fp32, AdamW, random weights)"
        if variant == "vit-b"
        else f"one training step, {variant} config, batch {batch_size} (CPU)",
        "seconds_per_step": measured["step_seconds"][-1],
        "peak_rss_bytes": measured["peak_rss_bytes"],
        "measured": measured,
        "goal": "reported",
        "pass": None,
    }


def run(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as short, tempfile.TemporaryDirectory() as long:
        # the difference of two runs removes start-up (model, toy data, vocabulary encoding, saving)
        seconds_short, seconds_long = _loop_seconds(5, short), _loop_seconds(45, long)
    steps_per_second = 40 / (seconds_long - seconds_short)
    coco = _data_path_images_per_second(640, 1024, 24)
    toy = _data_path_images_per_second(128, 128, 64)
    training_images = 2 * steps_per_second
    return [
        {
            "target": 6,
            "figure": "training throughput, tiny config, batch 2 at 128x128 (training/train.py loop, CPU, 2 threads)",
            "steps_per_second": steps_per_second,
            "images_per_second": training_images,
            "data_path_images_per_second_toy_128": toy,
            "goal": "data path faster than training",
            "pass": toy > training_images,
        },
        {
            "target": 6,
            "figure": "data path alone per worker: JPEG + PNG decode, large-scale jitter, processor to 1024x1024 (640x640 COCO-size images)",
            "images_per_second": coco,
            "goal": "reported (one worker per GPU keeps up with the ~1 image/s/GPU training step)",
            "pass": None,
        },
        full_size_step_row(batch_size=2),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--full-size-step", action="store_true", help="print _full_size_step's JSON")
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--steps", type=positive_int, default=2)
    parser.add_argument("--variant", default="vit-b", choices=["vit-b", "tiny"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not args.full_size_step:
        parser.error("nothing to do: pass --full-size-step (the suite runs through benchmarks/run.py)")
    print(json.dumps(_full_size_step(args.batch, args.steps, args.variant)))
