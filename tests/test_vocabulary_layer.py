"""
The vocabulary layer (issue 12, item 4): one `Vocabulary` type for label lists, presets, category tables, thing / stuff
ids, label maps and the seen-class mask, and transformers' `rgb_to_id` / `id_to_rgb` for panoptic PNG colours.

References are independent of the package: panopticapi's COCO panoptic category JSON and sample PNGs
(`/work/shared/data/coco-panoptic-sample/`), the shipped tsv files read with `csv`, Mask2Former's id map (the i-th
category -> class i), FC-CLIP's seen-class rule written out here, panopticapi's `rgb2id` / `id2rgb`, and literals.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import id_to_rgb, rgb_to_id

import transformers_possam
from transformers_possam import processing_possam
from transformers_possam.data import TOY_CATEGORIES, decode_panoptic_sample, toy_panoptic_rows
from transformers_possam.evaluation.panoptic import segment_id_map
from transformers_possam.image_processing_possam import encode_panoptic_annotation
from transformers_possam.vocabularies import Vocabulary, load_vocabulary, resolve_vocabulary, seen_class_mask


ROOT = Path(__file__).resolve().parents[1]
VOCABULARY_FOLDER = ROOT / "src" / "transformers_possam" / "vocabularies"
SAMPLE = Path(os.environ.get("POSSAM_COCO_PANOPTIC_SAMPLE", "/work/shared/data/coco-panoptic-sample"))
needs_sample = pytest.mark.skipif(
    not (SAMPLE / "panoptic_examples.json").is_file(), reason=f"the COCO panoptic sample is not at {SAMPLE}"
)


def coco_categories() -> list[dict]:
    return json.loads((SAMPLE / "panoptic_coco_categories.json").read_text())


def tsv_rows(file_name: str) -> list[dict]:
    """A shipped vocabulary file, read here with `csv` (not through the package), in class-index order."""
    text = (VOCABULARY_FOLDER / file_name).read_text(encoding="utf-8")
    return sorted(csv.DictReader(text.splitlines(), delimiter="\t"), key=lambda row: int(row["id"]))


# --- a vocabulary from panopticapi's COCO category table ------------------------------------------------------------


@needs_sample
def test_from_categories_on_panopticapis_coco_table():
    categories = coco_categories()
    vocabulary = Vocabulary.from_categories(categories)  # color / supercategory accepted as they are
    assert len(vocabulary) == 133 and len(vocabulary.thing_ids) == 80 and len(vocabulary.stuff_ids) == 53
    assert vocabulary.names == tuple(category["name"] for category in categories)
    assert vocabulary.category_ids == tuple(category["id"] for category in categories)
    # Mask2Former's id map: the i-th category of the table is class i
    assert vocabulary.label_map == {category["id"]: index for index, category in enumerate(categories)}
    assert vocabulary.thing_ids == [index for index, category in enumerate(categories) if category["isthing"] == 1]
    assert vocabulary.stuff_ids == [index for index, category in enumerate(categories) if category["isthing"] == 0]
    assert vocabulary.to_categories() == [
        {"id": category["id"], "name": category["name"], "isthing": category["isthing"]} for category in categories
    ]
    assert Vocabulary.from_categories(vocabulary.to_categories()) == vocabulary


@needs_sample
def test_coco_preset_carries_cocos_category_ids_and_flags():
    categories = coco_categories()
    coco = load_vocabulary("coco_panoptic_133")
    assert coco.category_ids == tuple(category["id"] for category in categories)
    assert coco.is_thing == tuple(bool(category["isthing"]) for category in categories)


@needs_sample
def test_coco_preset_label_map_gives_mask2formers_classes_on_real_annotations():
    """Panoptic PNG + segments_info -> masks and classes through the preset's label_map, against panopticapi."""
    from panopticapi.utils import rgb2id

    categories = coco_categories()
    reference_map = {category["id"]: index for index, category in enumerate(categories)}
    label_map = load_vocabulary("coco_panoptic_133").label_map
    annotations = json.loads((SAMPLE / "panoptic_examples.json").read_text())["annotations"]
    for annotation in annotations:
        png = Image.open(SAMPLE / "panoptic_examples" / annotation["file_name"])
        ids = rgb2id(np.asarray(png))
        size = ids.shape
        masks, classes = encode_panoptic_annotation(
            {"panoptic_map": png, "segments_info": annotation["segments_info"]}, size, size, label_map
        )
        kept = [segment for segment in annotation["segments_info"] if not segment["iscrowd"]]
        assert classes.tolist() == [reference_map[segment["category_id"]] for segment in kept]
        expected = np.stack([ids == segment["id"] for segment in kept])
        assert np.array_equal(masks.numpy().astype(bool), expected)


@needs_sample
def test_prepare_script_builds_its_table_through_the_vocabulary():
    """`prepare_panoptic_parquet.py`: the JSON's categories are checked, then renamed from a preset by category id."""
    from .conftest import load_training_script

    prepare = load_training_script("prepare_panoptic_parquet")
    categories = coco_categories()
    coco_rows = tsv_rows("coco_panoptic_133.tsv")
    assert prepare.category_table(categories, "coco") == [
        {"id": category["id"], "name": row["names"], "isthing": category["isthing"]}
        for category, row in zip(categories, coco_rows, strict=True)
    ]
    assert prepare.category_table(categories, None) == [
        {"id": category["id"], "name": category["name"], "isthing": category["isthing"]} for category in categories
    ]
    ade_rows = tsv_rows("ade20k_150.tsv")
    ade_json = [{"id": 0, "name": "wall", "isthing": 0}, {"id": 2, "name": "sky", "isthing": 0}]
    assert [c["name"] for c in prepare.category_table(ade_json, "ade20k")] == [
        ade_rows[0]["names"],
        ade_rows[2]["names"],
    ]
    # a category id given twice used to be written to categories.json as it was, and only failed in training
    duplicated = [{"id": 5, "name": "cat", "isthing": 1}, {"id": 5, "name": "dog", "isthing": 1}]
    with pytest.raises(prepare.PreparationError, match=r"categories\[1\]\['id'\] = 5 repeats"):
        prepare.category_table(duplicated, None)


# --- the shipped tsv files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, file_name, things, stuff",
    [("coco_panoptic_133", "coco_panoptic_133.tsv", 80, 53), ("ade20k_150", "ade20k_150.tsv", 100, 50)],
)
def test_presets_equal_their_tsv_files(preset, file_name, things, stuff):
    rows = tsv_rows(file_name)
    vocabulary = load_vocabulary(preset)
    assert vocabulary.names == tuple(row["names"] for row in rows)
    assert vocabulary.is_thing == tuple(row["isthing"] == "1" for row in rows)
    assert (len(vocabulary.thing_ids), len(vocabulary.stuff_ids)) == (things, stuff)
    coco_ids = [row["coco_category_id_or_empty"] for row in rows]
    # COCO: the COCO panoptic ids; ADE20K (no COCO id): its panoptic ids, which are the class indices 0..149
    expected_ids = [int(i) for i in coco_ids] if all(coco_ids) else list(range(len(rows)))
    assert list(vocabulary.category_ids) == expected_ids
    assert vocabulary.label_map == {identifier: index for index, identifier in enumerate(expected_ids)}
    assert vocabulary.display_names == [row["names"].split(",")[0] for row in rows]


def test_seen_mask_follows_fcclips_overlap_rule_on_the_tsv_files():
    """FC-CLIP: an ADE class is seen when one of its synonyms is a synonym of some COCO class (64 of 150)."""
    coco_synonyms = {synonym for row in tsv_rows("coco_panoptic_133.tsv") for synonym in row["names"].split(",")}
    expected = [any(s in coco_synonyms for s in row["names"].split(",")) for row in tsv_rows("ade20k_150.tsv")]
    ade = load_vocabulary("ade20k_150")
    for training_vocabulary in ("coco", load_vocabulary("coco_panoptic_133"), list(coco_synonyms)):
        assert ade.seen_mask(training_vocabulary).tolist() == expected
    assert sum(expected) == 64
    assert seen_class_mask("ade20k", "coco").tolist() == expected


# --- the Vocabulary type's own rules --------------------------------------------------------------------------------


def test_category_ids_default_to_class_indices_and_are_checked():
    assert Vocabulary(names=("cat", "sky"), is_thing=(True, False)).category_ids == (0, 1)
    vocabulary = Vocabulary(names=("cat", "sky"), is_thing=(True, False), category_ids=[np.int64(17), 3])
    assert vocabulary.category_ids == (17, 3) and all(type(i) is int for i in vocabulary.category_ids)
    assert vocabulary.label_map == {17: 0, 3: 1}
    assert (vocabulary.thing_ids, vocabulary.stuff_ids) == ([0], [1])
    with pytest.raises(ValueError, match=r"2 names but 1 category_ids"):
        Vocabulary(names=("cat", "sky"), is_thing=(True, False), category_ids=(1,))
    with pytest.raises(ValueError, match=r"category_ids\[1\] = 4 repeats category_ids\[0\]"):
        Vocabulary(names=("cat", "sky"), is_thing=(True, False), category_ids=(4, 4))
    with pytest.raises(TypeError, match=r"category_ids\[0\] = True has type bool"):
        Vocabulary(names=("cat",), is_thing=(True,), category_ids=(True,))


@pytest.mark.parametrize(
    "categories, error, message",
    [
        ([{"name": "cat", "isthing": 1}], ValueError, r"categories\[0\] = .* has no 'id'"),
        (["cat"], TypeError, r"categories\[0\] = 'cat' has type str; a category is a dict"),
        ([{"id": "1", "name": "cat"}], TypeError, r"categories\[0\]\['id'\] = '1' has type str"),
        ([{"id": 1.0, "name": "cat"}], TypeError, r"categories\[0\]\['id'\] = 1.0 has type float"),
        (
            [{"id": 5, "name": "cat"}, {"id": 5, "name": "dog"}],
            ValueError,
            r"categories\[1\]\['id'\] = 5 repeats categories\[0\]\['id'\]",
        ),
        ([{"id": 1, "name": "cat", "isthing": "false"}], TypeError, r"categories\[0\]\['isthing'\] = 'false'"),
        (
            [{"id": 1, "name": "cat", "is_thing": True}],
            ValueError,
            r"categories\[0\] .* unknown key\(s\) \['is_thing'\]",
        ),
        ([{"id": 1, "name": "cat"}, {"id": 2, "name": "Cat"}], ValueError, r"Duplicate label"),
        ({"id": 1, "name": "cat"}, TypeError, r"categories is a single dict"),
        ([], ValueError, r"categories is empty"),
    ],
)
def test_from_categories_names_the_bad_entry(categories, error, message):
    with pytest.raises(error, match=message):
        Vocabulary.from_categories(categories)


def test_a_missing_isthing_counts_as_a_thing_as_for_labels():
    vocabulary = Vocabulary.from_categories([{"id": 3, "name": "cat"}, {"id": 9, "name": "sky", "isthing": 0}])
    assert vocabulary.is_thing == (True, False) and vocabulary == Vocabulary(
        names=("cat", "sky"), is_thing=(True, False), category_ids=(3, 9)
    )


def test_label_lists_keep_ignoring_category_ids():
    """resolve_vocabulary's class ids are positions: a COCO dict's `id` does not become a category id there."""
    vocabulary = resolve_vocabulary([{"id": 7, "name": "person", "isthing": 1}, {"id": 187, "name": "sky"}])
    assert vocabulary.category_ids == (0, 1)


def test_toy_table_through_the_vocabulary():
    vocabulary = Vocabulary.from_categories(TOY_CATEGORIES)
    assert vocabulary.display_names == ["ball", "box", "tent", "sky", "grass", "sand"]
    assert (vocabulary.thing_ids, vocabulary.stuff_ids) == ([0, 1, 2], [3, 4, 5])
    assert vocabulary.label_map == {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5}


def test_public_names_stay_importable_and_are_the_layers():
    assert processing_possam.resolve_vocabulary is resolve_vocabulary
    assert processing_possam.seen_class_mask is seen_class_mask
    assert transformers_possam.Vocabulary is Vocabulary and transformers_possam.load_vocabulary is load_vocabulary


# --- RGB <-> id: transformers' helpers on real panoptic PNGs --------------------------------------------------------


@needs_sample
def test_transformers_rgb_helpers_equal_panopticapis_on_real_pngs():
    from panopticapi.utils import id2rgb, rgb2id

    annotations = json.loads((SAMPLE / "panoptic_examples.json").read_text())["annotations"]
    for annotation in annotations:
        png = np.asarray(Image.open(SAMPLE / "panoptic_examples" / annotation["file_name"]))
        ids = rgb2id(png)
        assert np.array_equal(rgb_to_id(png), ids)
        assert {segment["id"] for segment in annotation["segments_info"]} <= set(np.unique(ids).tolist())
        assert np.array_equal(id_to_rgb(ids.astype(np.int64)), id2rgb(ids.astype(np.int64)))
        assert np.array_equal(id_to_rgb(ids.astype(np.int64)), png)  # round trip
        # the package's readers of panoptic PNGs: evaluation's id map and the training / evaluation row decoder
        assert segment_id_map(png).dtype == np.int64 and np.array_equal(segment_id_map(png), ids)
        image_file = SAMPLE / "input_images" / annotation["file_name"].replace(".png", ".jpg")
        row = {
            "image": image_file.read_bytes(),
            "label": (SAMPLE / "panoptic_examples" / annotation["file_name"]).read_bytes(),
            "segments_info": annotation["segments_info"],
        }
        _, decoded, _ = decode_panoptic_sample(row)
        assert decoded.dtype == np.int64 and np.array_equal(decoded, ids)


def test_colours_beyond_uint8_sums_are_not_overflowed():
    """uint16 colour arrays: the package casts before transformers' rgb_to_id (which keeps non-uint8 dtypes)."""
    from panopticapi.utils import rgb2id

    colours = np.array([[[255, 255, 255], [1, 2, 3]]], dtype=np.uint16)
    expected = rgb2id(colours.astype(np.int64))
    assert expected.tolist() == [[256**3 - 1, 1 + 2 * 256 + 3 * 256**2]]
    assert segment_id_map(colours).tolist() == expected.tolist()
    masks, _ = encode_panoptic_annotation(
        {"panoptic_map": colours, "segments_info": [{"id": int(expected[0, 1]), "category_id": 0}]}, (1, 2), (1, 2)
    )
    assert masks.tolist() == [[[0, 1]]]


def test_toy_rows_are_coloured_by_transformers_id_to_rgb():
    from panopticapi.utils import rgb2id

    row = next(toy_panoptic_rows(1))
    ids = rgb2id(np.asarray(row["label"]))
    assert {segment["id"] for segment in row["segments_info"]} <= set(np.unique(ids).tolist())
    assert np.array_equal(np.asarray(row["label"]), id_to_rgb(ids.astype(np.int64)))


# --- the old copies are gone ----------------------------------------------------------------------------------------

# Idioms that belong to the vocabulary layer or to transformers' rgb_to_id / id_to_rgb, and so must not be written out
# anywhere else in the package, the training scripts or the benchmarks.
DUPLICATED_IDIOMS = {
    "thing / stuff ids from flags (Vocabulary.thing_ids / stuff_ids)": r"enumerate\([^)]*is_?thing",
    "thing / stuff ids from a category table (Vocabulary.thing_ids / stuff_ids)": (
        r"for \w+, \w+ in enumerate\([^)]*\) if (not )?\w+\[[\"']isthing[\"']\]"
    ),
    "label dicts from a category table (Vocabulary.from_categories)": r"[\"']name[\"']\s*:\s*\w+\[[\"']name[\"']\]",
    "a category id -> class index map (Vocabulary.label_map)": (
        r"\w+\[[\"']id[\"']\]\)?\s*:\s*\w+\s+for\s+\w+\s*,\s*\w+\s+in\s+enumerate"
    ),
    "the panoptic colour sum (transformers' rgb_to_id)": r"256\s*\*\s*\w+\[",
    "the panoptic colour split (transformers' id_to_rgb)": r"(%|//)\s*(256|65536)\b",
    "an RGB <-> id helper of our own": r"def\s+(rgb2id|id2rgb|rgb_to_id|id_to_rgb)\b",
}
SCANNED = ["src/transformers_possam", "training", "benchmarks", "conversion", "tools"]


def test_vocabulary_and_rgb_logic_lives_in_one_place():
    python_files = [path for folder in SCANNED for path in sorted((ROOT / folder).rglob("*.py"))]
    assert len(python_files) > 30  # the scan sees the source tree
    found = []
    for path in python_files:
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("src/transformers_possam/vocabularies/"):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for what, pattern in DUPLICATED_IDIOMS.items():
                if re.search(pattern, line):
                    found.append(f"{relative}:{number}: {what}: {line.strip()}")
    assert not found, "\n".join(found)
    # the tests' own RGB helpers are gone too (they use panopticapi's or transformers')
    test_helpers = [
        f"{path.name}: {match.group(0)}"
        for path in sorted((ROOT / "tests").glob("*.py"))
        for match in re.finditer(DUPLICATED_IDIOMS["an RGB <-> id helper of our own"], path.read_text())
    ]
    assert not test_helpers, test_helpers
