"""`make demo`: PosSAM end to end through `pipeline("open-vocabulary-panoptic-segmentation")`.

No pretrained weights can be downloaded here, so the demo saves the tiny random configuration (with its processor
and an offline CLIP tokenizer) to a folder, loads it with `pipeline(...)` by path and segments a synthetic image:
it shows the data flow and the output format, not accuracy. With a converted checkpoint, pass its path or Hub id
as `--model`.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import pipeline

from .configuration_possam import tiny_config
from .image_processing_possam import PosSAMImageProcessor
from .modeling_possam import PosSAMForPanopticSegmentation
from .processing_possam import PosSAMProcessor
from .tokenization import clip_tokenizer_from_bpe
from .vocabularies import resolve_vocabulary


LABELS: list[str | list[str] | dict[str, object]] = [
    {"name": "sky,clouds", "isthing": False},
    {"name": "grass,lawn", "isthing": False},
    ["ball", "red ball"],
    ["house", "building"],
    ["tree", "trees"],
]


def synthetic_image(size: int = 320) -> Image.Image:
    image = Image.new("RGB", (size, size * 3 // 4), (120, 170, 230))
    draw = ImageDraw.Draw(image)
    width, height = image.size
    draw.rectangle([0, height * 0.6, width, height], fill=(60, 150, 60))
    draw.ellipse([width * 0.1, height * 0.45, width * 0.3, height * 0.7], fill=(220, 30, 30))
    draw.rectangle([width * 0.55, height * 0.25, width * 0.9, height * 0.65], fill=(150, 110, 80))
    return image


def save_tiny_checkpoint(path: str, seed: int) -> None:
    torch.manual_seed(seed)
    config = tiny_config()
    size = config.sam_vision_config.image_size
    PosSAMForPanopticSegmentation(config).save_pretrained(path)
    image_processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    PosSAMProcessor(image_processor, clip_tokenizer_from_bpe()).save_pretrained(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: a tiny random model)")
    parser.add_argument("--image", default=None, help="image path or URL (default: a synthetic scene)")
    parser.add_argument("--subtask", default="panoptic", choices=["panoptic", "semantic", "instance"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if model is None:
            save_tiny_checkpoint(folder, args.seed)
            model = folder
        # transformers' pipeline() overloads list only its built-in tasks, without the plain `task: str` form that
        # tasks registered with PIPELINE_REGISTRY (this one, see pipeline_possam.register_pipeline) are called with
        segmenter = pipeline("open-vocabulary-panoptic-segmentation", model=model)  # type: ignore[call-overload]
        image = args.image or synthetic_image()
        results = segmenter(image, candidate_labels=LABELS, subtask=args.subtask)

    trainable = sum(p.numel() for p in segmenter.model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in segmenter.model.parameters() if not p.requires_grad)
    print(
        f"model: {'tiny random PosSAM' if args.model is None else args.model} "
        f"({trainable / 1e6:.2f}M trainable, {frozen / 1e6:.2f}M frozen parameters)"
    )
    print(f"labels: {list(resolve_vocabulary(LABELS).names)}")
    print(f"{args.subtask} segments: {len(results)}")
    print(f"{'label':<8} {'score':>7} {'area %':>7}")
    for segment in results:
        mask = np.asarray(segment["mask"]) > 0
        score = "-" if segment["score"] is None else f"{segment['score']:.3f}"
        print(f"{segment['label']:<8} {score:>7} {100 * mask.mean():7.1f}")
    if args.model is None:
        print("(random weights: labels and masks are arbitrary until a trained checkpoint is loaded)")


if __name__ == "__main__":
    main()
