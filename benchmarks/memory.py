"""
Target 5, each measurement in a fresh subprocess (peak RSS is per process):

- PosSAM-B inference at 1024x1024 on CPU (forward + MASE panoptic post-processing, vocabulary already encoded):
  peak RSS <= 2x the fp32 weight bytes;
- one training step (forward, loss, backward, optimizer step) of the tiny config at 1024x1024 with 10 and with 100
  ground-truth segments (uint8 labels): the step's memory (peak RSS minus the RSS before the step, which already
  holds the labels) stays flat.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from common import (
    current_rss_bytes,
    full_size_model,
    peak_rss_bytes,
    positive_int,
    random_vocabulary,
    test_image,
    weight_bytes,
)


HERE = Path(__file__).resolve().parent


def _inference() -> dict:
    from transformers_possam import PosSAMImageProcessor

    model = full_size_model()
    processor = PosSAMImageProcessor()
    image = test_image()
    inputs = processor(image, return_tensors="pt")
    class_embeddings = random_vocabulary(model)
    before = current_rss_bytes()
    with torch.inference_mode():
        outputs = model(inputs["pixel_values"], pixel_mask=inputs["pixel_mask"], class_embeddings=class_embeddings)
        processor.post_process_panoptic_segmentation(
            outputs,
            target_sizes=[image.size[::-1]],
            reshaped_input_sizes=[tuple(int(v) for v in inputs["reshaped_input_sizes"][0])],
        )
    return {"weight_bytes": weight_bytes(model), "rss_before_bytes": before, "peak_rss_bytes": peak_rss_bytes()}


def _training_step(segments: int) -> dict:
    from transformers_possam import PosSAMForPanopticSegmentation, tiny_config

    size = 1024
    torch.manual_seed(0)
    config = tiny_config(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "mlp_dim": 64,
            "image_size": size,
            "patch_size": 16,
            "output_channels": 32,
            "window_size": 8,
            "global_attn_indexes": [1],
            "initializer_range": 0.02,
        }
    )
    model = PosSAMForPanopticSegmentation(config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 3, size, size, generator=generator)
    class_embeddings = torch.nn.functional.normalize(
        torch.randn(5, 1, config.clip_embed_dim, generator=generator), dim=-1
    )
    # non-overlapping horizontal bands, one per segment, as uint8 masks (what PosSAMImageProcessor produces)
    band = torch.arange(size) * segments // size
    mask_labels = [
        (band[None, :, None] == torch.arange(segments)[:, None, None]).expand(segments, size, size).to(torch.uint8)
    ]
    class_labels = [torch.randint(0, 5, (segments,), generator=generator)]

    def step():
        loss = model(
            pixel_values, class_embeddings=class_embeddings, mask_labels=mask_labels, class_labels=class_labels
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    step()  # allocates the optimizer state and gradients once
    before = current_rss_bytes()
    step()
    return {
        "segments": segments,
        "label_bytes": mask_labels[0].numel(),
        "rss_before_bytes": before,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _subprocess(*arguments: str) -> dict:
    command = [sys.executable, str(HERE / "memory.py"), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run() -> list[dict]:
    inference = _subprocess("--inference")
    ratio = inference["peak_rss_bytes"] / inference["weight_bytes"]
    rows = [
        {
            "target": 5,
            "figure": "peak RSS of PosSAM-B inference at 1024x1024 (CPU, fp32) / fp32 weight bytes",
            "measured": inference,
            "ratio": ratio,
            "goal": "<= 2x",
            "pass": ratio <= 2.0,
        }
    ]
    steps = [_subprocess("--train-step", str(segments)) for segments in (10, 100)]
    step_bytes = [s["peak_rss_bytes"] - s["rss_before_bytes"] for s in steps]
    growth = step_bytes[1] / max(step_bytes[0], 1)
    rows.append(
        {
            "target": 5,
            "figure": "training-step memory (tiny config, 1024x1024): 100 vs 10 ground-truth segments",
            "measured": steps,
            "step_bytes": step_bytes,
            "ratio": growth,
            "goal": "flat: <= 1.1x (+16 MiB)",
            "pass": step_bytes[1] <= 1.1 * step_bytes[0] + 16 * 2**20,
        }
    )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    measured = parser.add_mutually_exclusive_group(required=True)
    measured.add_argument("--inference", action="store_true")
    measured.add_argument("--train-step", type=positive_int, metavar="SEGMENTS")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(json.dumps(_inference() if args.inference else _training_step(args.train_step)))
