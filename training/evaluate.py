#!/usr/bin/env python
"""Evaluate a PosSAM checkpoint on a panoptic dataset with that dataset's vocabulary; writes `metrics.json`.

    python training/evaluate.py --model_name_or_path outputs/possam-b-coco --dataset_name path/to/ade20k_panoptic_parquet \\
        --split validation --output_dir outputs/eval-ade20k

The vocabulary is the dataset's category table (names with synonyms); seen/unseen classes are derived against the
checkpoint's training vocabulary (FC-CLIP's rule), giving PQ_seen / PQ_unseen as in the paper's Table 3.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from transformers_possam import PosSAMForPanopticSegmentation, PosSAMProcessor  # noqa: E402
from transformers_possam.data.stream import load_panoptic_dataset  # noqa: E402
from transformers_possam.evaluation import evaluate_panoptic  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--dataset_name", default=None, help="local parquet folder or Hub id; default: the toy set")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--output_dir", default="outputs/eval")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--no_mase", action="store_true", help="fixed geometric ensemble instead of MASE")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = PosSAMForPanopticSegmentation.from_pretrained(args.model_name_or_path).to(device).eval()
    processor = PosSAMProcessor.from_pretrained(args.model_name_or_path)
    dataset, categories = load_panoptic_dataset(args.dataset_name, args.split)
    tokens = processor.encode_vocabulary([{"name": c["name"], "isthing": bool(c["isthing"])} for c in categories])
    class_embeddings, synonym_mask = model.get_class_embeddings(
        tokens["input_ids"].to(device), tokens["attention_mask"].to(device), tokens["synonym_mask"].to(device)
    )
    rows = islice(dataset, args.max_samples) if args.max_samples else dataset
    results = evaluate_panoptic(model, processor.image_processor, rows, categories, class_embeddings, synonym_mask,
                                batch_size=args.batch_size, use_mase=not args.no_mase)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(results, indent=1, default=float))
    for split in ("All", "Things", "Stuff", "Seen", "Unseen"):
        values = results[split]
        print(f"{split:8s} PQ {100 * values['pq']:5.1f}  SQ {100 * values['sq']:5.1f}  RQ {100 * values['rq']:5.1f}  n {values['n']}")
    print(f"mIoU {100 * results['mIoU']:.1f}; wrote {output_dir / 'metrics.json'}")
    return results


if __name__ == "__main__":
    main()
