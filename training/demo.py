#!/usr/bin/env python
"""`make demo`: train a tiny PosSAM on the embedded toy panoptic set on CPU, evaluate it on held-out images.

Writes `outputs/demo/model/` (model + processor, loadable by the pipeline), `outputs/demo/metrics.json` and
`outputs/demo/prediction.png` (a held-out image | its predicted segments | its ground truth). The tiny model's SAM encoder
is random, so the demo trains it too (`--train_encoders`); real checkpoints keep it frozen.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import train  # training/train.py: `make demo` runs this file as a script, so its folder is on sys.path
from PIL import Image
from transformers.image_transforms import rgb_to_id

from transformers_possam import PosSAMForPanopticSegmentation, PosSAMProcessor
from transformers_possam.data import TOY_CATEGORIES, toy_panoptic_rows
from transformers_possam.evaluation import evaluate_panoptic
from transformers_possam.visualization import draw_segmentation, side_by_side
from transformers_possam.vocabularies import Vocabulary


def ground_truth_result(row: dict) -> dict:
    """A toy row's panoptic ground truth in the form of `post_process_panoptic_segmentation`'s result (the toy
    category ids are the class indices of `TOY_CATEGORIES`)."""
    segment_ids = rgb_to_id(np.asarray(row["label"], dtype=np.int64))
    segments_info = [{"id": info["id"], "label_id": info["category_id"]} for info in row["segments_info"]]
    return {"segmentation": segment_ids, "segments_info": segments_info}


def prediction_panel(image: Image.Image, prediction: dict, ground_truth: dict, names: list[str]) -> Image.Image:
    """input | prediction | ground truth, side by side, with one colour per class in both pictures."""
    pictures = [
        draw_segmentation(
            image,
            {"segmentation": np.zeros(image.size[::-1], np.int64), "segments_info": []},
            names,
            show_legend=False,
        ),
        draw_segmentation(image, prediction, names),
        draw_segmentation(image, ground_truth, names, show_scores=False),
    ]
    return side_by_side(pictures, ["input", "prediction", "ground truth"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--max_steps", type=int, default=2500)
    parser.add_argument("--eval_images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min_scale", type=float, default=0.5, help="jitter's smallest scale (the real recipe: 0.1 at 1024 px)"
    )
    parser.add_argument(
        "--mixed_precision",
        default="no",
        choices=["no", "bf16"],
        help="train.py's --mixed_precision: 'bf16' trains under autocast (evaluation stays in float32)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    output_dir = Path(args.output_dir)
    model_dir = output_dir / "model"

    start = time.time()
    train.main(
        [
            "--output_dir",
            str(model_dir),
            "--max_steps",
            str(args.max_steps),
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "3e-4",
            "--max_grad_norm",
            "0",
            "--lr_drops",
            "0.9",
            "--train_encoders",
            "--toy_train_size",
            "512",
            "--seed",
            str(args.seed),
            # the toy images are 128 px, not 1024: FC-CLIP's smallest scale 0.1 would shrink them to 13 px
            "--min_scale",
            str(args.min_scale),
            "--mixed_precision",
            args.mixed_precision,
        ]
    )
    train_seconds = time.time() - start

    model = PosSAMForPanopticSegmentation.from_pretrained(model_dir).eval()
    processor = PosSAMProcessor.from_pretrained(model_dir)
    vocabulary = Vocabulary.from_categories(TOY_CATEGORIES)
    tokens = processor.encode_vocabulary(vocabulary)
    class_embeddings, synonym_mask = model.get_class_embeddings(
        tokens["input_ids"], tokens["attention_mask"], tokens["synonym_mask"]
    )
    rows = list(toy_panoptic_rows(args.eval_images, seed=args.seed, split="validation"))
    results = evaluate_panoptic(model, processor.image_processor, rows, vocabulary, class_embeddings, synonym_mask)

    with torch.no_grad():
        inputs = processor(images=rows[0]["image"], return_tensors="pt")
        outputs = model(
            pixel_values=inputs["pixel_values"],
            pixel_mask=inputs["pixel_mask"],
            class_embeddings=class_embeddings,
            synonym_mask=synonym_mask,
        )
    (prediction,) = processor.post_process_panoptic_segmentation(
        outputs,
        target_sizes=inputs["original_sizes"],
        reshaped_input_sizes=inputs["reshaped_input_sizes"],
        candidate_labels=vocabulary,
        training_vocabulary=model.config.training_vocabulary,
    )
    names = vocabulary.display_names
    output_dir.mkdir(parents=True, exist_ok=True)
    prediction_panel(rows[0]["image"], prediction, ground_truth_result(rows[0]), names).save(
        output_dir / "prediction.png"
    )

    metrics = {
        "PQ": 100 * results["All"]["pq"],
        "SQ": 100 * results["All"]["sq"],
        "RQ": 100 * results["All"]["rq"],
        "PQ_things": 100 * results["Things"]["pq"],
        "PQ_stuff": 100 * results["Stuff"]["pq"],
        "mIoU": 100 * results["mIoU"],
        "mask_AP": 100 * results["mask_AP"]["AP"],
        "eval_images": len(rows),
        "train_steps": args.max_steps,
        "train_seconds": round(train_seconds, 1),
        "mixed_precision": args.mixed_precision,
        "per_class_pq": {names[int(k)]: 100 * v["pq"] for k, v in results["per_class"].items()},
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(
        f"\nheld-out toy panoptic ({len(rows)} images): PQ {metrics['PQ']:.1f}  SQ {metrics['SQ']:.1f}  RQ {metrics['RQ']:.1f}  "
        f"(things {metrics['PQ_things']:.1f}, stuff {metrics['PQ_stuff']:.1f}), mIoU {metrics['mIoU']:.1f}, "
        f"mask AP {metrics['mask_AP']:.1f}; "
        f"trained {args.max_steps} steps in {train_seconds:.0f}s"
    )
    print(f"wrote {model_dir}/, {output_dir / 'metrics.json'}, {output_dir / 'prediction.png'}")
    return metrics


if __name__ == "__main__":
    main()
