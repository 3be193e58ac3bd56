"""
Loading files never executes code, and damaged files are errors that name them (issue 11, items 1-3).

Every "payload" below is a pickle whose unpickling would write a marker file (`exec` through `__reduce__`); each test
plants it where a loader reads, runs the loader, and asserts that the marker was never written. A clear refusal is
the expected outcome where the file is needed; an ignored file where it is not.
"""

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from transformers_possam.checkpointing import CheckpointError, write_manifest
from transformers_possam.data import TOY_CATEGORIES
from transformers_possam.data.stream import StreamPosition
from transformers_possam.vocabularies import Vocabulary

from .conftest import load_training_script


REPO = Path(__file__).resolve().parents[1]
train = load_training_script("train")

TRAIN_ARGS = ["--max_steps", "2", "--toy_train_size", "8", "--per_device_train_batch_size", "1"]


class Payload:
    """Unpickling runs `exec(code)`: the classic pickle attack."""

    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').write('code ran')"

    def __reduce__(self):
        return (exec, (self.code,))


def test_the_payload_is_live(tmp_path):
    """Positive control: unpickled without restriction, the payload does write its marker."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "code ran"


def plant_raw_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def plant_torch_file(path: Path, marker: Path) -> None:
    torch.save({"state": Payload(marker)}, path)  # torch's zip format, the payload inside data.pkl


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real 2-step run of training/train.py with checkpoints after steps 1 and 2."""
    output = tmp_path_factory.mktemp("run")
    subprocess.run(
        [
            sys.executable,
            str(REPO / "training" / "train.py"),
            "--output_dir",
            str(output),
            "--checkpointing_steps",
            "1",
            *TRAIN_ARGS,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert [p.name for p in sorted(output.glob("checkpoint-*"))] == ["checkpoint-1", "checkpoint-2"]
    return output


@pytest.fixture()
def copy_of(run_dir, tmp_path):
    """A private copy of the run (the tests damage it)."""
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def resume_in_process(checkpoint: Path) -> tuple[int, Accelerator]:
    """train.py's own resume, in this process, into the model / optimizer / scheduler train.py would build."""
    args = train.parse_args(["--output_dir", str(checkpoint.parent), *TRAIN_ARGS])
    accelerator = Accelerator()
    model, processor = train.build_model_and_processor(args)
    train.record_training_vocabulary(model, processor, Vocabulary.from_categories(TOY_CATEGORIES), accelerator.device)
    _, optimizer, scheduler = train.build_optimization(args, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    stream = SimpleNamespace(position=StreamPosition())
    return train.resume(accelerator, checkpoint, stream, scheduler), accelerator


def test_an_intact_checkpoint_resumes(copy_of):
    step, _ = resume_in_process(copy_of / "checkpoint-2")
    assert step == 2
    # what train.py writes: no pickle beyond accelerate's weights-only files; our states are JSON / safetensors
    names = {p.name for p in (copy_of / "checkpoint-2").iterdir()}
    assert {
        "manifest.json",
        "scheduler.json",
        "rng_state_0.safetensors",
        "rng_state_0.json",
        "stream_0.json",
        "step.json",
    } <= names
    assert not any(name.startswith("custom_checkpoint") for name in names)  # accelerate would unpickle these unsafely


# ----- item 1: planted pickles never run, whether or not the attacker also rewrites the manifest


@pytest.mark.parametrize("rewrite_manifest", [False, True], ids=["manifest-kept", "manifest-rewritten-by-attacker"])
@pytest.mark.parametrize(
    "file,plant",
    [
        ("optimizer.bin", plant_torch_file),  # torch.load(weights_only=True) refuses the global `exec`
        ("optimizer.bin", plant_raw_pickle),  # legacy (non-zip) format: refused as well
        ("random_states_0.pkl", plant_raw_pickle),  # accelerate's RNG pickle: refused (and ours override it anyway)
        ("custom_checkpoint_0.pkl", plant_raw_pickle),  # accelerate unpickles these unsafely: we register none
        ("scheduler.json", plant_raw_pickle),  # JSON only: a pickle there is a parse error
        ("rng_state_0.safetensors", plant_raw_pickle),  # safetensors: a pickle there is a header error
    ],
)
def test_planted_pickles_never_run(copy_of, tmp_path, file, plant, rewrite_manifest):
    checkpoint = copy_of / "checkpoint-2"
    marker = tmp_path / "marker"
    plant(checkpoint / file, marker)
    if rewrite_manifest:
        write_manifest(checkpoint)  # a thorough attacker: the checksums match the planted file
    try:
        resume_in_process(checkpoint)
        outcome = "resumed"
    except CheckpointError as error:
        outcome = str(error)
    assert not marker.exists(), f"code ran through {file}"
    if not rewrite_manifest:
        assert (
            file in outcome and "checkpoint-1" in outcome
        )  # named (changed or unlisted), with the previous checkpoint
    if rewrite_manifest and file in ("optimizer.bin", "scheduler.json", "rng_state_0.safetensors"):
        assert outcome != "resumed" and str(checkpoint) in outcome  # a clear refusal naming the checkpoint


# ----- item 2: damaged checkpoints are errors naming the file and the previous checkpoint


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda c: truncate(c / "model.safetensors"),
            "model.safetensors has .* bytes, .* were written: it is truncated",
        ),
        (lambda c: truncate(c / "optimizer.bin"), "optimizer.bin has .* bytes"),
        (
            lambda c: (c / "rng_state_0.json").write_text("{}"),
            "rng_state_0.json .* truncated or damaged",
        ),  # a shorter file
        (
            lambda c: (c / "random_states_0.pkl").write_bytes(b"x" * (c / "random_states_0.pkl").stat().st_size),
            "random_states_0.pkl does not match the checksum",
        ),
        (lambda c: (c / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda c: (c / "manifest.json").unlink(), "has no manifest.json"),
        (lambda c: (c / "manifest.json").write_text("not json"), "manifest.json is damaged"),
        (
            lambda c: (c / "step.json").write_text('{"step": 9}'),
            "step.json .* truncated or damaged|step.json does not match",
        ),
    ],
    ids=[
        "truncated-weights",
        "truncated-optimizer",
        "damaged-rng-json",
        "flipped-rng-pickle",
        "missing-weights",
        "no-manifest",
        "bad-manifest",
        "edited-step",
    ],
)
def test_damaged_checkpoints_name_the_file_and_the_previous_checkpoint(copy_of, damage, message):
    checkpoint = copy_of / "checkpoint-2"
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=message) as error:
        resume_in_process(checkpoint)
    assert "--resume_from_checkpoint" in str(error.value) and "checkpoint-1" in str(error.value)


@pytest.mark.parametrize(
    "entry,message",
    [
        (
            "../../etc/hostname",
            "outside the checkpoint folder",
        ),  # a planted manifest must not make us read other files
        ("/etc/hostname", "outside the checkpoint folder"),
        ([1, 2], "is not {'bytes': int, 'sha256': str}"),  # a malformed entry: no raw AttributeError
    ],
    ids=["parent-path", "absolute-path", "malformed-entry"],
)
def test_planted_manifest_entries_are_refused(copy_of, entry, message):
    checkpoint = copy_of / "checkpoint-2"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    if isinstance(entry, str):
        manifest["files"][entry] = {"bytes": 1, "sha256": "0" * 64}
    else:
        manifest["files"]["step.json"] = entry
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message):
        resume_in_process(checkpoint)


def test_symlinked_checkpoint_files_are_refused(copy_of, tmp_path):
    checkpoint = copy_of / "checkpoint-2"
    outside = tmp_path / "elsewhere.json"
    outside.write_text((checkpoint / "step.json").read_text())
    (checkpoint / "step.json").unlink()
    (checkpoint / "step.json").symlink_to(outside)  # same content, but not a file of the checkpoint
    with pytest.raises(
        CheckpointError, match="'step.json', which is outside the checkpoint folder"
    ):  # the link leaves it
        resume_in_process(checkpoint)


def test_damaged_first_checkpoint_says_there_is_no_earlier_one(copy_of):
    truncate(copy_of / "checkpoint-1" / "model.safetensors")
    with pytest.raises(CheckpointError, match="No earlier checkpoint of this run exists"):
        resume_in_process(copy_of / "checkpoint-1")


def test_unreadable_states_with_a_matching_manifest_are_errors_too(copy_of):
    """Damage that a rewritten manifest hides is still caught where the file is parsed."""
    checkpoint = copy_of / "checkpoint-2"
    (checkpoint / "rng_state_0.json").write_text('{"python": {}}')
    write_manifest(checkpoint)
    with pytest.raises(
        CheckpointError, match="random-generator state of process 0 .*rng_state_0.json.* cannot be restored"
    ):
        resume_in_process(checkpoint)
    save_file({"weights": torch.zeros(3)}, str(checkpoint / "model.safetensors"))  # another model's weights
    write_manifest(checkpoint)
    with pytest.raises(CheckpointError, match="Cannot load the model / optimizer state of .*checkpoint-2"):
        resume_in_process(checkpoint)


# ----- the other loaders: conversion inputs, transformers checkpoints, processor files


def test_conversion_loaders_refuse_pickled_code(tmp_path):
    from transformers_possam.conversion import load_checkpoint, load_fcclip_checkpoint

    marker = tmp_path / "marker"
    for name, plant in (
        ("sam.pth", plant_torch_file),
        ("sam_legacy.pth", plant_raw_pickle),
        ("open_clip_pytorch_model.bin", plant_torch_file),
    ):
        plant(tmp_path / name, marker)
        with pytest.raises(ValueError, match=f"{name}.*weights-only"):  # refused, with the file named
            load_checkpoint(tmp_path / name)
    plant_torch_file(tmp_path / "fcclip_cocopan.pth", marker)
    with pytest.raises(ValueError, match="fcclip_cocopan.pth.*weights-only"):
        load_fcclip_checkpoint(tmp_path / "fcclip_cocopan.pth")
    assert not marker.exists()


def test_transformers_loading_runs_no_planted_code(tmp_path):
    """A pickled `pytorch_model.bin` and remote-code hooks in config / processor files: refused, never run."""
    from transformers import AutoModelForUniversalSegmentation, pipeline

    from transformers_possam import PosSAMForPanopticSegmentation

    from .conftest import save_tiny_checkpoint

    marker = tmp_path / "marker"
    folder = save_tiny_checkpoint(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    plant_torch_file(folder / "pytorch_model.bin", marker)
    with pytest.raises(
        Exception, match="(?i)weights.only|unsupported global|pickle"
    ):  # transformers' weights-only refusal
        PosSAMForPanopticSegmentation.from_pretrained(folder)
    # remote code: a module in the folder that config.json and processor_config.json point at
    evil = f"open({str(marker)!r}, 'w').write('code ran')\n"
    (folder / "evil.py").write_text(evil + "class EvilModel: pass\nclass EvilProcessor: pass\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForUniversalSegmentation": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    processor = json.loads((folder / "processor_config.json").read_text())
    processor["auto_map"] = {"AutoProcessor": "evil.EvilProcessor"}
    (folder / "processor_config.json").write_text(json.dumps(processor))
    for load in (
        lambda: AutoModelForUniversalSegmentation.from_pretrained(folder),
        lambda: pipeline("open-vocabulary-panoptic-segmentation", model=str(folder)),
    ):
        # the load may fail or succeed (without the remote code); only whether the payload ran matters
        with contextlib.suppress(Exception):
            load()
    assert not marker.exists()


# ----- item 3: loading gaps are clear errors


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "is not valid JSON"),  # a broken file: named, with the expected form
        ("", "is not valid JSON"),  # an empty file
        ('{"id": 1}', "must be a non-empty JSON list"),  # an object instead of a list
        ("[]", "must be a non-empty JSON list"),  # no category
        ('[{"id": 1, "name": "cat"}]', "Category 0 .* needs 'id', 'name' and 'isthing'"),  # a key missing
        ('["cat"]', "Category 0 .* needs"),  # bare strings
        ('[{"id": "1", "name": "cat", "isthing": 1}]', "'id' must be an integer"),
        ('[{"id": 1, "name": "cat", "isthing": 1}, {"id": 1, "name": "dog", "isthing": 1}]', "id 1 appears twice"),
        ('[{"id": 1, "name": null, "isthing": 1}]', "'name' must be a non-empty string"),
        ('[{"id": 1, "name": " , ", "isthing": 1}]', "'name' must be a non-empty string"),
        ('[{"id": 1, "name": "cat", "isthing": "false"}]', "'isthing' must be 0 or 1"),  # a string is not a flag
        ('[{"id": 1, "name": "cat", "isthing": 0.5}]', "'isthing' must be 0 or 1"),
    ],
)
def test_invalid_category_tables_are_named(tmp_path, content, message):
    from transformers_possam.data import load_category_table

    (tmp_path / "categories.json").write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_category_table(tmp_path)
    assert "categories.json" in str(error.value)


def test_valid_category_tables_load_as_written(tmp_path):
    from transformers_possam.data import load_category_table

    table = [{"id": 1, "name": "cat,kitty", "isthing": True}, {"id": 7, "name": "sky", "isthing": 0}]
    (tmp_path / "categories.json").write_text(json.dumps(table))
    assert load_category_table(tmp_path) == table


@pytest.mark.parametrize(
    "state_dict,message",
    [
        (
            {"model.layer.weight": torch.zeros(2)},
            "Not a segment-anything image-encoder checkpoint: it lacks",
        ),  # another model
        ({}, "Not a segment-anything image-encoder checkpoint"),  # empty
        (
            {"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)},
            "lacks \\['pos_embed'",
        ),  # a partial SAM
    ],
)
def test_conversion_of_a_wrong_checkpoint_is_a_clear_error(state_dict, message):
    from transformers_possam.conversion import infer_sam_vision_config

    with pytest.raises(ValueError, match=message):
        infer_sam_vision_config(state_dict)


def test_conversion_loader_checks_the_content(tmp_path):
    from transformers_possam.conversion import load_checkpoint

    torch.save([torch.zeros(2)], tmp_path / "list.pth")  # weights-only but not a state dict
    with pytest.raises(ValueError, match="list.pth does not hold a state dict"):
        load_checkpoint(tmp_path / "list.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pth cannot be read"):
        load_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="missing.pth does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="bad.safetensors cannot be read"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_a_checkpoint_without_its_tokenizer_is_refused(tmp_path):
    """Without tokenizer.json, transformers builds a 2-token CLIP tokenizer: every label would embed identically."""
    from transformers import pipeline

    from transformers_possam import PosSAMProcessor

    from .conftest import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "ckpt")
    assert len(PosSAMProcessor.from_pretrained(folder).tokenizer) == 49408  # intact: CLIP's vocabulary
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer has 2 tokens .* vocabulary is missing .*tokenizer.json"):
        PosSAMProcessor.from_pretrained(folder)
    with pytest.raises(ValueError, match="vocabulary is missing"):
        pipeline("open-vocabulary-panoptic-segmentation", model=str(folder))


def test_a_checkpoint_without_config_is_refused_at_once(tmp_path):
    """transformers would build a default full-size model for seconds before failing: refused before anything is built."""
    import time

    from transformers_possam import PosSAMForPanopticSegmentation, tiny_config

    from .conftest import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "ckpt")
    (folder / "config.json").unlink()
    start = time.perf_counter()
    with pytest.raises(OSError, match="ckpt has no config.json"):
        PosSAMForPanopticSegmentation.from_pretrained(folder)
    assert time.perf_counter() - start < 2.0  # no default model was constructed
    loaded = PosSAMForPanopticSegmentation.from_pretrained(
        folder, config=tiny_config()
    )  # an explicit config still works
    assert loaded.config.num_queries == tiny_config().num_queries


def test_pipeline_without_images_and_processor_vocabulary_size_mismatch(tmp_path):
    """An empty image list is named (transformers' pipeline would raise IndexError); a vocabulary of the wrong size too."""
    from types import SimpleNamespace as Outputs

    from transformers import pipeline

    from transformers_possam import PosSAMProcessor

    from .conftest import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "ckpt")
    segmenter = pipeline("open-vocabulary-panoptic-segmentation", model=str(folder))
    for images in ([], (), None):
        with pytest.raises(ValueError, match="No image given"):
            segmenter(images, candidate_labels=["cat"])
    processor = PosSAMProcessor.from_pretrained(folder)
    outputs = Outputs(
        masks_queries_logits=torch.zeros(1, 2, 8, 8),
        class_queries_logits=torch.zeros(1, 2, 4),  # K = 3 classes
        clip_class_logits=torch.zeros(1, 2, 3),
        iou_scores=torch.ones(1, 2),
    )
    for method in (
        "post_process_panoptic_segmentation",
        "post_process_semantic_segmentation",
        "post_process_instance_segmentation",
    ):
        with pytest.raises(ValueError, match="seen_mask"):  # 2 labels for outputs of 3 classes
            getattr(processor, method)(outputs, candidate_labels=["cat", "dog"])
        assert getattr(processor, method)(outputs, candidate_labels=["cat", "dog", "sky"])  # the right size works
