#!/usr/bin/env python
"""Turn a COCO-format panoptic download into parquet shards for `training/train.py` (streamable, pushable to the Hub).

    # COCO panoptic (official zips: panoptic_annotations_trainval2017 + train2017/val2017 images)
    python training/prepare_panoptic_parquet.py --annotations_json annotations/panoptic_train2017.json \\
        --images_folder train2017 --vocabulary coco --output_dir data/coco_panoptic/train
    # ADE20K panoptic, as prepared by Mask2Former's datasets/prepare_ade20k_pan_seg.py
    python training/prepare_panoptic_parquet.py --annotations_json ADEChallengeData2016/ade20k_panoptic_val.json \\
        --images_folder ADEChallengeData2016/images/validation --vocabulary ade20k --output_dir data/ade20k_panoptic/validation

Rows follow `nielsr/coco-panoptic-val2017`: `image` and `label` (the RGB panoptic PNG) as encoded bytes, `image_id`
(string), `segments_info` [{id, category_id, iscrowd, area, bbox}]. `categories.json` ({"id", "name" with synonyms,
"isthing"}, in class-index order) is written next to the shards (and one level up, where train.py looks for it
when given the dataset root). `--vocabulary coco|ade20k` takes the prompt-engineered names with synonyms from this
package's vocabularies; otherwise the JSON's names are used. Upload with `huggingface_hub.upload_folder` or
`Dataset.push_to_hub`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasets import Dataset, Features, Image, List, Value

from transformers_possam.data import save_category_table
from transformers_possam.vocabularies import load_vocabulary

FEATURES = Features({
    "image": Image(),
    "label": Image(),
    "image_id": Value("string"),
    "segments_info": List({
        "id": Value("int64"), "category_id": Value("int64"), "iscrowd": Value("int64"), "area": Value("int64"),
        "bbox": List(Value("int64")),
    }),
})


def category_table(categories: list[dict], vocabulary: str | None) -> list[dict]:
    table = [{"id": int(c["id"]), "name": c["name"], "isthing": int(c.get("isthing", 1))} for c in categories]
    if vocabulary == "coco":
        import csv
        from importlib import resources

        text = resources.files("transformers_possam.vocabularies").joinpath("coco_panoptic_133.tsv").read_text()
        by_coco_id = {int(r["coco_category_id_or_empty"]): r["names"] for r in csv.DictReader(text.splitlines(), delimiter="\t")}
        table = [dict(c, name=by_coco_id.get(c["id"], c["name"])) for c in table]
    elif vocabulary == "ade20k":
        names = load_vocabulary("ade20k_150").names
        table = [dict(c, name=names[c["id"]] if 0 <= c["id"] < len(names) else c["name"]) for c in table]
    return table


def rows(annotations: dict, png_folder: Path, images_folder: Path):
    images = {image["id"]: image for image in annotations["images"]}
    for annotation in annotations["annotations"]:
        image = images[annotation["image_id"]]
        yield {
            "image": {"bytes": (images_folder / image["file_name"]).read_bytes(), "path": None},
            "label": {"bytes": (png_folder / annotation["file_name"]).read_bytes(), "path": None},
            "image_id": str(annotation["image_id"]),
            "segments_info": [
                {"id": s["id"], "category_id": s["category_id"], "iscrowd": s.get("iscrowd", 0), "area": s.get("area", 0),
                 "bbox": [int(v) for v in s.get("bbox", [0, 0, 0, 0])]}
                for s in annotation["segments_info"]
            ],
        }


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations_json", required=True)
    parser.add_argument("--png_folder", default=None, help="default: the JSON path without .json (panopticapi's rule)")
    parser.add_argument("--images_folder", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--vocabulary", choices=["coco", "ade20k"], default=None)
    parser.add_argument("--rows_per_shard", type=int, default=1000)
    args = parser.parse_args(argv)

    annotations_path = Path(args.annotations_json)
    annotations = json.loads(annotations_path.read_text())
    png_folder = Path(args.png_folder) if args.png_folder else annotations_path.with_suffix("")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    dataset = Dataset.from_generator(
        rows, gen_kwargs={"annotations": annotations, "png_folder": png_folder, "images_folder": Path(args.images_folder)},
        features=FEATURES,
    )
    num_shards = max(1, -(-len(dataset) // args.rows_per_shard))
    for index in range(num_shards):
        dataset.shard(num_shards, index, contiguous=True).to_parquet(str(output_dir / f"data-{index:05d}-of-{num_shards:05d}.parquet"))
    table = category_table(annotations["categories"], args.vocabulary)
    save_category_table(table, output_dir)
    save_category_table(table, output_dir.parent)
    print(f"wrote {len(dataset)} rows in {num_shards} shard(s) and categories.json ({len(table)} classes) to {output_dir}")
    return output_dir


if __name__ == "__main__":
    main()
