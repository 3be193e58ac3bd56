#!/usr/bin/env python
"""Evaluate a PosSAM checkpoint on a panoptic dataset with that dataset's vocabulary, as the paper's Table 1: PQ / SQ /
RQ (All, Things, Stuff, Seen, Unseen), mask AP and mIoU; writes `metrics.json`.

    python training/evaluate.py --model_name_or_path outputs/possam-b-coco --dataset_name path/to/ade20k_panoptic_parquet \\
        --split validation --output_dir outputs/eval-ade20k

The vocabulary is the dataset's category table (names with synonyms); seen/unseen classes are derived against the
checkpoint's training vocabulary (FC-CLIP's rule), giving PQ_seen / PQ_unseen as in the paper's Table 3. mIoU is
scored against the dataset's own semantic ground truth when its rows have a `semantic_label` column (ADE20K prepared
with `--semantic_folder`), else against the semantic map derived from the panoptic PNGs (crowd pixels labelled by
their category); `metrics.json` says which (`mIoU_ground_truth`). Bad rows are skipped and counted (`bad_samples`).
MASE's alpha / beta default to the checkpoint's image processor (`preprocessor_config.json`).
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import islice
from pathlib import Path

import torch

from transformers_possam import PosSAMForPanopticSegmentation, PosSAMProcessor
from transformers_possam.data.stream import load_panoptic_dataset
from transformers_possam.evaluation import PanopticEvaluator


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument(
        "--dataset_name",
        default=None,
        help="Hub id, save_to_disk or parquet folder (schemas as training/train.py); default: the toy set",
    )
    parser.add_argument(
        "--label_file",
        default=None,
        help="JSON category table (id2label, label2id or a list of {id, name, isthing}); as training/train.py",
    )
    parser.add_argument(
        "--do_reduce_labels", action="store_true", help="instance-segmentation rows: as training/train.py"
    )
    parser.add_argument("--split", default="validation")
    parser.add_argument("--output_dir", default="outputs/eval")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument(
        "--no_mase", action="store_true", help="FC-CLIP's fixed geometric ensemble instead of MASE (Table 7)"
    )
    parser.add_argument(
        "--mase_alpha", type=float, default=None, help="CLIP's weight on seen classes (default: the image processor's)"
    )
    parser.add_argument(
        "--mase_beta",
        type=float,
        default=None,
        help="CLIP's weight on unseen classes (default: the image processor's)",
    )
    parser.add_argument(
        "--max_bad_fraction", type=float, default=0.01, help="bad rows tolerated before stopping (as training)"
    )
    parser.add_argument("--no_mask_ap", action="store_true", help="skip instance inference and mask AP")
    args = parser.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max_samples must be >= 1, got {args.max_samples}.")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = PosSAMForPanopticSegmentation.from_pretrained(args.model_name_or_path).to(device).eval()
    processor = PosSAMProcessor.from_pretrained(args.model_name_or_path)
    dataset, categories = load_panoptic_dataset(
        args.dataset_name, args.split, label_file=args.label_file, do_reduce_labels=args.do_reduce_labels
    )
    evaluator = PanopticEvaluator(
        model,
        processor.image_processor,
        categories,
        processor=processor,
        batch_size=args.batch_size,
        use_mase=not args.no_mase,
        mase_alpha=args.mase_alpha,
        mase_beta=args.mase_beta,
        max_bad_fraction=args.max_bad_fraction,
        compute_ap=not args.no_mask_ap,
    )
    evaluator.process(islice(dataset, args.max_samples) if args.max_samples else dataset)
    results = evaluator.results()
    if results["images"] == 0:
        sys.exit(
            f"error: no row of {args.dataset_name or 'the toy set'} ({args.split}) could be scored: {results['bad_samples']} bad rows, "
            f"e.g. {results['bad_sample_ids'][:5]} (see the warnings above)."
        )
    image_processor = processor.image_processor
    results["settings"] = {
        "use_mase": not args.no_mase,
        "mase_alpha": image_processor.mase_alpha if args.mase_alpha is None else args.mase_alpha,
        "mase_beta": image_processor.mase_beta if args.mase_beta is None else args.mase_beta,
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(results, indent=1, default=float))
    for split in ("All", "Things", "Stuff", "Seen", "Unseen"):
        values = results[split]
        print(
            f"{split:8s} PQ {100 * values['pq']:5.1f}  SQ {100 * values['sq']:5.1f}  RQ {100 * values['rq']:5.1f}  n {values['n']}"
        )
    if results["mask_AP"] is not None:
        print("mask AP " + "  ".join(f"{key} {100 * value:.1f}" for key, value in results["mask_AP"].items()))
    print(f"mIoU {100 * results['mIoU']:.1f} (ground truth: {results['mIoU_ground_truth']})")
    print(
        f"{results['images']} images scored, {results['bad_samples']} bad rows skipped; wrote {output_dir / 'metrics.json'}"
    )
    return results


if __name__ == "__main__":
    main()
