"""`make demo`: run PosSAM end to end on a synthetic image with the tiny random configuration.

No pretrained weights can be downloaded here, so the predictions are those of a random model: the demo shows the
data flow and the outputs' shapes and meaning, not accuracy. With network access, load a converted checkpoint instead.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image, ImageDraw

from .configuration_possam import tiny_config
from .modeling_possam import PosSAMForPanopticSegmentation
from .vocabularies import split_synonyms

LABELS = ["sky,clouds", "grass,lawn", "red ball,ball", "tree,trees", "house,building"]


def synthetic_image(size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (120, 170, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, size * 0.6, size, size], fill=(60, 150, 60))
    draw.ellipse([size * 0.1, size * 0.45, size * 0.35, size * 0.7], fill=(220, 30, 30))
    draw.rectangle([size * 0.55, size * 0.3, size * 0.9, size * 0.65], fill=(150, 110, 80))
    return image


def sam_pixels(image: Image.Image, size: int, mean: list[float], std: list[float]) -> torch.Tensor:
    array = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    pixels = (torch.from_numpy(array).permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return pixels[None]


def tokenize_vocabulary(labels: list[str], context_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, S, 1, L) prompt ids "a photo of a {synonym}." with open_clip's offline BPE tokenizer."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer(context_length=context_length)
    synonyms = [split_synonyms(label) for label in labels]
    slots = max(len(s) for s in synonyms)
    padded = [s + [s[0]] * (slots - len(s)) for s in synonyms]
    ids = tokenizer([f"a photo of a {name}." for names in padded for name in names])
    synonym_mask = torch.tensor([[i < len(s) for i in range(slots)] for s in synonyms])
    return ids.view(len(labels), slots, 1, -1), synonym_mask


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    config = tiny_config()
    model = PosSAMForPanopticSegmentation(config).eval()
    size = config.vision_config.image_size
    pixel_values = sam_pixels(synthetic_image(size), size, config.sam_image_mean, config.sam_image_std)
    input_ids, synonym_mask = tokenize_vocabulary(LABELS)

    with torch.no_grad():
        class_embeddings, synonym_mask = model.get_class_embeddings(input_ids, synonym_mask=synonym_mask)
        outputs = model(pixel_values, class_embeddings=class_embeddings, synonym_mask=synonym_mask)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(f"PosSAM (tiny random config): {trainable / 1e6:.2f}M trainable, {frozen / 1e6:.2f}M frozen parameters")
    print(f"input {tuple(pixel_values.shape)} -> masks {tuple(outputs.masks_queries_logits.shape)}, "
          f"LDP logits {tuple(outputs.class_queries_logits.shape)}, CLIP logits {tuple(outputs.clip_class_logits.shape)}")
    ldp_probs = outputs.class_queries_logits.softmax(-1)[0, :, :-1]
    clip_probs = outputs.clip_class_logits.softmax(-1)[0]
    masks = outputs.masks_queries_logits[0] > 0
    names = [split_synonyms(label)[0] for label in LABELS]
    print(f"{'query':>5} {'IoU':>5} {'area %':>7}  {'LDP label':<10} {'p':>5}  {'CLIP label':<10} {'p':>5}")
    for query in outputs.iou_scores[0].argsort(descending=True).tolist():
        ldp_p, ldp_k = ldp_probs[query].max(0)
        clip_p, clip_k = clip_probs[query].max(0)
        print(
            f"{query:>5} {outputs.iou_scores[0, query]:5.2f} {100 * masks[query].float().mean():7.1f}  "
            f"{names[ldp_k]:<10} {ldp_p:5.2f}  {names[clip_k]:<10} {clip_p:5.2f}"
        )
    print("(random weights: labels are arbitrary until a trained checkpoint is loaded)")


if __name__ == "__main__":
    main()
