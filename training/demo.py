#!/usr/bin/env python
"""`make demo`: train a tiny PosSAM on the embedded toy panoptic set on CPU, evaluate it on held-out images.

Writes `outputs/demo/model/` (model + processor, loadable by the pipeline), `outputs/demo/metrics.json` and
`outputs/demo/prediction.png` (a held-out image | its predicted segments | its ground truth). The tiny model's SAM encoder
is random, so the demo trains it too (`--train_encoders`); real checkpoints keep it frozen.

It trains on one CPU thread (unless OMP_NUM_THREADS or `--threads` says otherwise) and writes a resumable checkpoint
every `--checkpointing_steps` steps into `outputs/demo/model/`: rerun after an interruption and it resumes from the
latest one (train.py's resume is exact, so the model is the one an uninterrupted run gives). Rerun after it finished and
it evaluates the trained model again without training; `--fresh` deletes `outputs/demo/model/` and trains from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import train  # training/train.py: `make demo` runs this file as a script, so its folder is on sys.path
from PIL import Image
from transformers.image_transforms import rgb_to_id

from transformers_possam import PosSAMForPanopticSegmentation, PosSAMProcessor
from transformers_possam.checkpointing import list_checkpoints
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


# `make demo`'s training recipe: 1,200 steps of batch 8 at LR 6e-4 (x 0.1 at 85%), against 2,500 steps at 3e-4 before
# issue 15, to stay under 5 minutes on one thread (README, "The demo", gives the PQ of both)
DEFAULT_STEPS = 1200
DEFAULT_LEARNING_RATE = 6e-4
DEFAULT_LR_DROPS = (0.85,)
BATCH_SIZE = 8
# one thread unless OMP_NUM_THREADS says otherwise: the tiny model gains little from a second thread (about 10%), and
# two OpenMP threads spin-wait whenever another process holds a core, which made a busy machine 3-20x slower
DEFAULT_THREADS = 1
SETTINGS_FILE = "demo_settings.json"


def default_threads() -> int:
    """OMP_NUM_THREADS when the user set it, else `DEFAULT_THREADS`."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    try:
        threads = int(value)
    except ValueError:
        return DEFAULT_THREADS
    return threads if threads >= 1 else DEFAULT_THREADS


def training_arguments(args: argparse.Namespace, model_dir: Path) -> list[str]:
    """train.py's command line for the demo (without the resume flag)."""
    return [
        "--output_dir",
        str(model_dir),
        "--max_steps",
        str(args.max_steps),
        "--per_device_train_batch_size",
        str(BATCH_SIZE),
        "--learning_rate",
        str(args.learning_rate),
        "--max_grad_norm",
        "0",
        "--lr_drops",
        *(str(fraction) for fraction in args.lr_drops),
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
        "--checkpointing_steps",
        str(args.checkpointing_steps),
        "--checkpoints_total_limit",
        "2",
        "--dataloader_num_workers",
        str(args.dataloader_num_workers),
    ]


def prepare_training(model_dir: Path, train_arguments: list[str], fresh: bool) -> tuple[str, int]:
    """
    What this run does with `model_dir`: ("train", 0) from scratch, ("resume", step) from its latest checkpoint, or
    ("reuse", step) of a finished demo with the same settings (no training; `--fresh` retrains).

    A folder holding checkpoints of other settings (or of a demo older than its settings file) is refused rather than
    resumed with the wrong recipe or silently deleted: `--fresh` starts over.
    """
    settings_path = model_dir / SETTINGS_FILE
    if fresh and model_dir.exists():
        shutil.rmtree(model_dir)
    checkpoints = list_checkpoints(model_dir) if model_dir.exists() else []
    saved = json.loads(settings_path.read_text()) if settings_path.exists() else None
    if saved is not None and saved.get("train_arguments") != train_arguments:
        raise SystemExit(
            f"{model_dir} holds a demo trained with other settings ({saved.get('train_arguments')}), not "
            f"{train_arguments}. Rerun with --fresh to start over (it deletes {model_dir}), or pick another "
            "--output_dir."
        )
    if saved is not None and saved.get("finished"):
        return "reuse", int(saved["steps"])
    if checkpoints:
        if saved is None:
            raise SystemExit(
                f"{model_dir} holds checkpoints ({checkpoints[-1].name}) but no {SETTINGS_FILE}, so their settings "
                f"are unknown. Rerun with --fresh to start over (it deletes {model_dir})."
            )
        return "resume", int(checkpoints[-1].name.split("-")[-1])
    model_dir.mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps({"train_arguments": train_arguments, "finished": False}, indent=1))
    return "train", 0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--max_steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--learning_rate", type=float, default=DEFAULT_LEARNING_RATE)
    parser.add_argument(
        "--lr_drops", type=float, nargs="*", default=list(DEFAULT_LR_DROPS), help="fractions of --max_steps, LR x 0.1"
    )
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
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=100,
        help="a resumable checkpoint every this many steps: an interrupted demo, rerun, resumes from the latest",
    )
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="train.py's data worker processes (0: the samples are prepared in the training process)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="delete OUTPUT_DIR/model (checkpoints, trained model) and train from scratch; without it a rerun "
        "resumes an interrupted demo, and re-evaluates a finished one without training",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help=f"CPU threads (default: OMP_NUM_THREADS, else {DEFAULT_THREADS})",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}.")
    if args.checkpointing_steps < 1:
        parser.error(f"--checkpointing_steps must be >= 1, got {args.checkpointing_steps}.")
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    model_dir = output_dir / "model"

    start = time.time()
    train_arguments = training_arguments(args, model_dir)
    action, start_step = prepare_training(model_dir, train_arguments, args.fresh)
    if action == "reuse":
        print(f"{model_dir} holds the finished demo ({start_step} steps): evaluating it (--fresh retrains)")
    else:
        resumed = f", resuming from checkpoint-{start_step}" if action == "resume" else ""
        print(
            f"training the tiny PosSAM for {args.max_steps} steps on {args.threads} thread(s){resumed}; a checkpoint "
            f"every {args.checkpointing_steps} steps in {model_dir}/ (interrupt and rerun to resume)",
            flush=True,
        )
        train.main(train_arguments + (["--resume_from_checkpoint", "latest"] if action == "resume" else []))
        (model_dir / SETTINGS_FILE).write_text(
            json.dumps({"train_arguments": train_arguments, "finished": True, "steps": args.max_steps}, indent=1)
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
        "steps_trained_in_this_run": 0 if action == "reuse" else args.max_steps - start_step,
        "resumed_from_step": start_step if action == "resume" else None,
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads,
        "mixed_precision": args.mixed_precision,
        "per_class_pq": {names[int(k)]: 100 * v["pq"] for k, v in results["per_class"].items()},
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(
        f"\nheld-out toy panoptic ({len(rows)} images): PQ {metrics['PQ']:.1f}  SQ {metrics['SQ']:.1f}  RQ {metrics['RQ']:.1f}  "
        f"(things {metrics['PQ_things']:.1f}, stuff {metrics['PQ_stuff']:.1f}), mIoU {metrics['mIoU']:.1f}, "
        f"mask AP {metrics['mask_AP']:.1f}; "
        f"trained {metrics['steps_trained_in_this_run']} of {args.max_steps} steps in {train_seconds:.0f}s"
    )
    print(f"wrote {model_dir}/, {output_dir / 'metrics.json'}, {output_dir / 'prediction.png'}")
    return metrics


if __name__ == "__main__":
    main()
