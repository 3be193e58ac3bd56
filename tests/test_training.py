import collections
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import IterableDataset
from safetensors.torch import load_file

from transformers_possam import PosSAMForPanopticSegmentation, PosSAMImageProcessor, tiny_config
from transformers_possam.data import TOY_CATEGORIES, toy_panoptic_rows
from transformers_possam.data.stream import PanopticTrainStream, TooManyBadSamples, collate_panoptic


REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(REPO / "training" / "train.py")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def image_processor():
    return PosSAMImageProcessor(size={"longest_edge": 128}, pad_size={"height": 128, "width": 128})


def toy_stream(rows, **kwargs):
    dataset = IterableDataset.from_generator(lambda: iter(rows))
    return PanopticTrainStream(dataset, image_processor(), {i: i for i in range(6)}, shuffle_buffer=0, **kwargs)


def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config(train_num_points=512)).train()
    stream = iter(toy_stream(list(toy_panoptic_rows(4)), augment=False))
    batch = collate_panoptic([next(stream) for _ in range(4)])
    class_embeddings = torch.nn.functional.normalize(torch.randn(6, 1, 32), dim=-1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)  # same sampled points every step: the loss change is the optimisation's
        loss = model(**batch, class_embeddings=class_embeddings).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # the first Adam steps can overshoot (how much depends on the random init): judge the settled end
    assert sum(losses[-5:]) / 5 < 0.95 * losses[0], losses


def test_bad_samples_are_skipped_counted_and_stop_the_run():
    rows = list(toy_panoptic_rows(6))
    rows[2] = dict(rows[2], image={"bytes": b"broken", "path": None})
    rows[4] = dict(
        rows[4],
        segments_info=rows[4]["segments_info"]
        + [{"id": 999, "category_id": 0, "iscrowd": 0, "area": 1, "bbox": [0, 0, 1, 1]}],
    )
    stream = toy_stream(rows, max_bad_fraction=0.5, min_seen=1)
    stream.record_ids = []
    iterator = iter(stream)
    [next(iterator) for _ in range(4)]
    assert stream.position.bad == 2 and stream.position.seen == 6
    assert stream.record_ids == ["toy_train_00000", "toy_train_00001", "toy_train_00003", "toy_train_00005"]
    assert stream.position.bad_ids == ["toy_train_00002", "toy_train_00004"]
    strict = iter(toy_stream(rows, max_bad_fraction=0.01, min_seen=1))
    with pytest.raises(TooManyBadSamples, match="toy_train_00002"):
        [next(strict) for _ in range(4)]
    empty = dict(rows[0], segments_info=[])
    sample = next(iter(toy_stream([empty])))  # an image without segments is valid
    assert sample["mask_labels"].shape[0] == 0


def run_training(output_dir, *extra):
    args = [
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "6",
        "--toy_train_size",
        "24",
        "--per_device_train_batch_size",
        "2",
        *extra,
    ]
    subprocess.run([*TRAIN, *args], check=True, env=ENV, capture_output=True, text=True, timeout=300)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    run_training(tmp_path / "full", "--checkpointing_steps", "3")
    assert sorted(p.name for p in (tmp_path / "full").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (tmp_path / "full" / "checkpoint-3").rename(resumed / "checkpoint-3")
    (resumed / ".tmp-checkpoint-5").mkdir()  # a half-written checkpoint must never be picked up
    run_training(resumed, "--resume_from_checkpoint", "latest")
    full, again = load_file(tmp_path / "full" / "model.safetensors"), load_file(resumed / "model.safetensors")
    # the saved config names the classes trained on (the toy set's), which MASE's seen / unseen split reads
    saved_vocabulary = json.loads((resumed / "config.json").read_text(encoding="utf-8"))["training_vocabulary"]
    assert saved_vocabulary == [category["name"] for category in TOY_CATEGORIES]
    saved_labels = json.loads((resumed / "config.json").read_text(encoding="utf-8"))["id2label"]
    assert saved_labels == {
        str(index): category["name"].split(",")[0] for index, category in enumerate(TOY_CATEGORIES)
    }
    assert full.keys() == again.keys()
    assert all(torch.equal(full[key], again[key]) for key in full)
    # the saved model and processor load with the pipeline
    from transformers import pipeline
    from transformers.core_model_loading import revert_weight_conversion

    segmenter = pipeline("open-vocabulary-panoptic-segmentation", model=str(resumed))
    # the trained weights, not a fresh model; compared in the file's layout, which transformers' save_pretrained
    # writes through the registered key renamings (docs/design.md, class prediction)
    loaded = revert_weight_conversion(segmenter.model, segmenter.model.state_dict())
    assert loaded.keys() == again.keys()
    assert all(torch.equal(loaded[key], again[key]) for key in again)
    # the default vocabulary (used when forward gets none) is the toy one, computed: one real embedding per class
    defaults = segmenter.model.default_class_embeddings
    assert defaults.shape[0] == len(TOY_CATEGORIES) and bool((defaults[:, 0].norm(dim=-1) > 0).all())
    picture = next(toy_panoptic_rows(1))["image"]
    results = segmenter(picture, candidate_labels=["ball", "sky"], subtask="semantic")
    assert results and {segment["label"] for segment in results} <= {"ball", "sky"}
    coverage = sum((np.asarray(segment["mask"]) == 255).astype(int) for segment in results)
    assert coverage.shape == (picture.height, picture.width) and (coverage == 1).all()  # a partition of the image
    # and training/evaluate.py scores it, writing metrics.json
    subprocess.run(
        [
            sys.executable,
            str(REPO / "training" / "evaluate.py"),
            "--model_name_or_path",
            str(resumed),
            "--max_samples",
            "3",
            "--output_dir",
            str(tmp_path / "eval"),
        ],
        check=True,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"All", "Things", "Stuff", "Seen", "Unseen", "mIoU", "per_class"} <= set(metrics)
    assert 0.0 <= metrics["All"]["pq"] <= 1.0


def test_resume_with_dataloader_workers_gives_the_same_samples_and_weights(tmp_path):
    """train.py with 2 DataLoader workers: a run resumed at step 3 trains on the same batches, to the same weights."""
    workers = ("--dataloader_num_workers", "2", "--record_sample_ids")
    run_training(tmp_path / "full", "--checkpointing_steps", "3", *workers)
    full_ids = json.loads((tmp_path / "full" / "sample_ids_0.json").read_text())
    assert len(full_ids) == 12 and full_ids[:6] != sorted(full_ids[:6])  # 6 steps x 2, shuffled
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (tmp_path / "full" / "checkpoint-3").rename(resumed / "checkpoint-3")
    run_training(resumed, "--resume_from_checkpoint", "latest", *workers)
    assert json.loads((resumed / "sample_ids_0.json").read_text()) == full_ids[6:]
    full, again = load_file(tmp_path / "full" / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert full.keys() == again.keys() and all(torch.equal(full[name], again[name]) for name in full)
    # the sample order depends on the worker count: resuming with another is refused, naming the flag
    with pytest.raises(subprocess.CalledProcessError) as refused:
        run_training(
            resumed, "--resume_from_checkpoint", str(resumed / "checkpoint-3"), "--dataloader_num_workers", "0"
        )
    assert "same --dataloader_num_workers" in refused.value.stderr


def test_accelerate_launch_two_processes_see_disjoint_samples(tmp_path):
    # `accelerate launch --cpu --num_processes 2` needs mpirun; torchrun's launcher with ACCELERATE_USE_CPU=1 gives
    # 2-process DDP on CPU (gloo) with nothing extra installed.
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "training" / "train.py"),
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        "3",
        "--toy_train_size",
        "16",
        "--record_sample_ids",
        "--eval_steps",
        "3",
        "--max_eval_samples",
        "5",
    ]
    result = subprocess.run(
        command, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [set(json.loads((tmp_path / f"sample_ids_{rank}.json").read_text())) for rank in (0, 1)]
    assert all(len(ids) == 6 for ids in ranks)  # 3 steps x batch 2 each, no epoch wrapped
    assert not ranks[0] & ranks[1]
    # each process draws its own point-sampling randomness (FC-CLIP seeds each worker differently) ...
    states = [json.loads((tmp_path / f"rng_{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0]["torch_rng_sha256"] != states[1]["torch_rng_sha256"]
    # ... over the same optimizer groups: no weight decay on norms and embeddings
    assert states[0]["groups"] == states[1]["groups"]
    no_decay = {name for group in states[0]["groups"] if group["weight_decay"] == 0.0 for name in group["names"]}
    assert {
        "classifier.void_embedding.weight",
        "model.transformer_module.queries_features.weight",
        "ldp.norm.weight",
    } <= no_decay
    assert (tmp_path / "model.safetensors").exists()
    # the evaluation ran on both processes (rows 0, 2, 4 and 1, 3) and their statistics were gathered
    (history,) = [json.loads(line) for line in (tmp_path / "eval_history.jsonl").read_text().splitlines()]
    assert (history["step"], history["failed"], history["eval/images"], history["eval/bad_samples"]) == (
        3,
        False,
        5.0,
        0.0,
    )


def test_prepare_parquet_from_coco_format_and_stream_it(tmp_path):

    from transformers_possam.data import decode_panoptic_sample
    from transformers_possam.data.stream import load_panoptic_dataset

    source = tmp_path / "coco"
    (source / "images").mkdir(parents=True)
    (source / "panoptic_val").mkdir()
    images, annotations = [], []
    for index, row in enumerate(toy_panoptic_rows(3)):
        row["image"].save(source / "images" / f"{index}.jpg")
        row["label"].save(source / "panoptic_val" / f"{index}.png")
        images.append({"id": 100 + index, "file_name": f"{index}.jpg", "height": 128, "width": 128})
        segments = [dict(s, category_id=[1, 2, 3, 119, 125, 154][s["category_id"]]) for s in row["segments_info"]]
        annotations.append({"image_id": 100 + index, "file_name": f"{index}.png", "segments_info": segments})
    categories = [{"id": i, "name": f"cat{i}", "isthing": int(i < 100)} for i in (1, 2, 3, 119, 125, 154)]
    (source / "panoptic_val.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    output = tmp_path / "parquet" / "validation"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "training" / "prepare_panoptic_parquet.py"),
            "--annotations_json",
            str(source / "panoptic_val.json"),
            "--images_folder",
            str(source / "images"),
            "--output_dir",
            str(output),
            "--vocabulary",
            "coco",
        ],
        check=True,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    dataset, table = load_panoptic_dataset(str(tmp_path / "parquet"), split="validation")
    assert [c["id"] for c in table] == [1, 2, 3, 119, 125, 154]
    assert table[0]["name"].startswith("person,") and table[0]["isthing"] == 1  # COCO synonyms by category id
    rows = list(dataset)
    assert [r["image_id"] for r in rows] == ["100", "101", "102"]
    image, ids, segments = decode_panoptic_sample(rows[1])
    assert image.size == (128, 128) and {s["id"] for s in segments} <= set(np.unique(ids).tolist())


def test_stream_resumed_at_the_end_of_an_epoch_continues_and_all_bad_epochs_stop():
    rows = list(toy_panoptic_rows(3))
    first = toy_stream(rows, augment=False)
    samples = iter(first)
    [next(samples) for _ in range(3)]
    stream = toy_stream(rows, augment=False)
    stream.load_state_dict(first.state_dict())  # checkpoint taken right after the last row of epoch 0
    stream.record_ids = []
    next(iter(stream))
    assert stream.position.epoch == 1 and stream.record_ids == ["toy_train_00000"]
    broken = [dict(row, image={"bytes": b"broken", "path": None}) for row in rows]
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(toy_stream(broken, max_bad_fraction=1.0)))


def test_batches_go_to_the_device_without_waiting_only_from_page_locked_memory():
    """train.py's `to_training_device`: a pinned tensor (the DataLoader's batches on CUDA) is copied with
    `non_blocking=True`, a pageable one as before (a non-blocking copy from pageable memory would be no faster, and
    CUDA may read it after it is freed); the dtype is applied in the same call."""
    from unittest import mock

    from .conftest import load_script

    train = load_script("training/train.py")
    pinned = mock.MagicMock()
    pinned.is_pinned.return_value = True
    train.to_training_device(pinned, torch.device("cuda"), torch.bfloat16)
    pinned.to.assert_called_once_with(torch.device("cuda"), torch.bfloat16, non_blocking=True)
    pageable = torch.arange(6.0).view(2, 3)
    moved = train.to_training_device(pageable, torch.device("cpu"), torch.float64)
    assert moved.dtype == torch.float64 and torch.equal(moved, pageable.double())
    with mock.patch.object(torch.Tensor, "to", autospec=True, return_value=pageable) as to:
        train.to_training_device(pageable, torch.device("cpu"))
    assert to.call_args.args[-2:] == (torch.device("cpu"), None) and to.call_args.kwargs == {"non_blocking": False}


def test_train_py_asks_for_pinned_batches_on_cuda_and_copies_every_batch_tensor_through_the_helper(
    tmp_path, monkeypatch
):
    """train.py's wiring, run in this process for 2 steps with one DataLoader worker: the stream is asked for pinned
    batches exactly when `pins_batches` says so (CUDA; forced here, where the DataLoader then pins nothing), and the
    pixels, pixel mask, masks and class ids of every batch reach the model through `to_training_device`."""
    import warnings

    from accelerate.state import AcceleratorState, PartialState

    from .conftest import load_script

    train = load_script("training/train.py")
    assert train.pins_batches(torch.device("cuda")) and not train.pins_batches(torch.device("cpu"))
    asked, moved = [], collections.Counter()
    real_batches, real_move = PanopticTrainStream.batches, train.to_training_device

    def recording_batches(self, *args, **kwargs):
        asked.append(kwargs.get("pin_memory"))
        return real_batches(self, *args, **kwargs)

    def counting_move(tensor, device, dtype=None):
        moved[(tensor.dtype, tensor.dim())] += 1
        return real_move(tensor, device, dtype)

    monkeypatch.setattr(PanopticTrainStream, "batches", recording_batches)
    monkeypatch.setattr(train, "to_training_device", counting_move)
    monkeypatch.setattr(train, "pins_batches", lambda device: True)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # train.py seeds the global generators, sets the thread count and starts accelerate's process state: all put back
    random_state, numpy_state, threads = random.getstate(), np.random.get_state(), torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            train.main(
                ["--output_dir", str(tmp_path), "--max_train_steps", "2", "--toy_train_size", "8", "--toy_eval_size"]
                + ["2", "--per_device_train_batch_size", "2", "--dataloader_num_workers", "1"]
            )
    finally:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        random.setstate(random_state)
        np.random.set_state(numpy_state)
        torch.set_num_threads(threads)
    assert asked == [True]
    # per step: pixels (float, 4-d), pixel mask (3-d), and per image its masks (3-d) and class ids (1-d)
    assert moved[(torch.float32, 4)] == 2 and moved[(torch.int64, 1)] == 2 * 2
    assert sum(moved.values()) == 2 * (2 + 2 * 2)
