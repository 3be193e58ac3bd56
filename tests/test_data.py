import io

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import rgb_to_id

from transformers_possam.data import (
    TOY_CATEGORIES,
    BadSample,
    decode_panoptic_sample,
    large_scale_jitter,
    load_category_table,
    save_category_table,
    toy_panoptic_rows,
)


def test_toy_rows_are_deterministic_and_consistent():
    first = list(toy_panoptic_rows(4, seed=3))
    again = list(toy_panoptic_rows(4, seed=3))
    other = list(toy_panoptic_rows(4, seed=3, split="validation"))
    assert [r["image_id"] for r in first] == [r["image_id"] for r in again]
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(first, again))
    assert not np.array_equal(np.asarray(first[0]["image"]), np.asarray(other[0]["image"]))
    for row in first:
        image, ids, segments = decode_panoptic_sample(row)
        assert ids.shape == (128, 128)
        assert {s["id"] for s in segments} == set(np.unique(ids).tolist())  # stuff covers the background: no void
        for segment in segments:
            assert segment["area"] == int((ids == segment["id"]).sum())
        stuff = [s for s in segments if not TOY_CATEGORIES[s["category_id"]]["isthing"]]
        assert len(stuff) == 2 and 1 <= len(segments) - 2 <= 5


def test_bad_samples_name_their_image_id():
    row = next(toy_panoptic_rows(1))
    with pytest.raises(BadSample, match="toy_train_00000.*image does not decode"):
        decode_panoptic_sample(dict(row, image={"bytes": b"not a jpeg", "path": None}))
    with pytest.raises(BadSample, match="PNG does not decode"):
        decode_panoptic_sample(dict(row, label=b"\x89PNG broken"))
    with pytest.raises(BadSample, match="ids \\[999\\]"):
        decode_panoptic_sample(dict(row, segments_info=row["segments_info"] + [{"id": 999, "category_id": 0}]))
    small = row["label"].resize((64, 64))
    with pytest.raises(BadSample, match="differ in size"):
        decode_panoptic_sample(dict(row, label=small))
    buffer = io.BytesIO()
    row["image"].save(buffer, format="PNG")
    image, _, _ = decode_panoptic_sample(dict(row, image={"bytes": buffer.getvalue(), "path": None}, segments_info=[]))
    assert image.size == (128, 128)  # encoded bytes decode; no segments is valid


def test_large_scale_jitter_keeps_geometry_together():
    rng = np.random.default_rng(0)
    ids = np.zeros((60, 80), np.int64)
    ids[10:30, 20:50] = 7
    image = Image.fromarray(np.where(ids[..., None] == 7, 255, 0).astype(np.uint8).repeat(3, -1))
    for _ in range(20):
        out_image, out_ids = large_scale_jitter(image, ids, rng, target_size=64)
        assert out_image.size == out_ids.shape[::-1]
        assert max(out_ids.shape) <= 64
        bright = np.asarray(out_image)[..., 0] > 127
        if (out_ids == 7).sum() > 20:
            agreement = (bright == (out_ids == 7)).mean()
            assert agreement > 0.95


def test_category_table_round_trip(tmp_path):
    path = save_category_table(TOY_CATEGORIES, tmp_path)
    assert path.name == "categories.json"
    table = load_category_table(tmp_path)
    assert [c["name"] for c in table] == [c["name"] for c in TOY_CATEGORIES]
    with pytest.raises(FileNotFoundError, match="categories.json"):
        load_category_table(tmp_path / "missing")
    assert rgb_to_id(np.asarray(next(toy_panoptic_rows(1))["label"])).max() >= 3
