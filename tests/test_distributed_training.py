"""
Distributed training by construction (issue 14, items 3 and 4), tested on CPU as far as CPU allows.

accelerate runs FSDP and DeepSpeed only on accelerators; what is tested here:
- the shipped accelerate configs, read by accelerate's own loader and launcher (the environment its launcher gives
  the script, and the plugins it builds from it);
- the DeepSpeed config fixing (`configure_deepspeed`) on accelerate's real `DeepSpeedPlugin` (DeepSpeed itself is
  not installed: the plugin only holds the config);
- torch's own FSDP (version 1, as training/accelerate_configs/fsdp.yaml) over the trained parts, with 2 gloo
  processes on CPU, wrapped as accelerate wraps it from that config, stepping an optimizer built before wrapping (as
  train.py does): gradients clipped by the global norm and weights after the step equal a single-process reference
  on the whole batch (torch.nn.utils.clip_grad_norm_ over all trained parameters, FC-CLIP's FULL_MODEL clip);
- the same under 2-process DDP through accelerate (`Accelerator` on gloo);
- evaluation spread over 2 processes through the prepared model with unequal numbers of rows (padding forwards),
  merged, equals one process's evaluation of the same real COCO rows;
- two `accelerate launch --num_machines 2` "machines" on this host train, checkpoint, resume and shard data.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from PIL import Image
from safetensors.torch import load_file

from transformers_possam import PosSAMForPanopticSegmentation, tiny_config

from .conftest import load_training_script


REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "accelerate_configs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
SAMPLE = Path(os.environ.get("POSSAM_COCO_PANOPTIC_SAMPLE", "/work/shared/data/coco-panoptic-sample"))
# the modules fsdp.yaml keeps out of FSDP: the frozen encoders, and the classifier with its 0-d temperature
FSDP_IGNORED = ["model.vision_encoder", "clip", "classifier"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher_environment(config_name: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file <config>` gives the training script (no process started)."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{config_name}.yaml"), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


# ----------------------------------------------------------------------------------------------------------------------
# The shipped configs
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, distributed_type", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")]
)
def test_configs_load_with_accelerates_loader(name, distributed_type):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert (config.distributed_type, config.mixed_precision, config.num_processes) == (distributed_type, "bf16", 8)
    assert config.num_machines == 1 and not config.use_cpu


def test_fsdp_config_keeps_the_frozen_encoders_out_and_the_papers_groups_valid():
    with mock.patch.dict(os.environ, launcher_environment("fsdp")):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1 and plugin.use_orig_params  # AdamW's groups are built before prepare
    assert plugin.sharding_strategy.name == "FULL_SHARD" and plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.auto_wrap_policy is None  # NO_WRAP: one unit holding every trained weight
    assert not plugin.cpu_ram_efficient_loading  # the ignored encoders must be real on every process
    model = PosSAMForPanopticSegmentation(tiny_config())
    # accelerate matches the pattern against module names with re.fullmatch
    import re

    matched = [name for name, _ in model.named_modules() if re.fullmatch(plugin.ignored_modules, name)]
    assert matched == FSDP_IGNORED
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    outside = {name for name, _ in model.named_parameters() if name.split(".")[0] in ("clip", "classifier")}
    outside |= {name for name, _ in model.named_parameters() if name.startswith("model.vision_encoder.")}
    assert frozen <= outside  # every frozen weight stays out of FSDP
    # the 0-d classifier temperature, the reason the classifier is ignored (FSDP refuses scalar parameters)
    assert model.classifier.logit_scale.dim() == 0

    # configure_fsdp: the trained parameters FSDP leaves alone (the classifier's) are returned to be averaged, and
    # the bf16 policy no longer casts the float32 pixels the frozen encoders check against
    train = load_training_script("train")
    with mock.patch.dict(os.environ, launcher_environment("fsdp")):
        plugin = FullyShardedDataParallelPlugin()
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does with mixed_precision: bf16
    assert plugin.mixed_precision_policy.cast_root_forward_inputs
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))
    replicated = train.configure_fsdp(accelerator, model)
    assert {id(p) for p in replicated} == {id(p) for p in model.classifier.parameters()}
    assert not plugin.mixed_precision_policy.cast_root_forward_inputs
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16


# what Accelerator._prepare_deepspeed fills "auto" values with (its config_kwargs, batch 2 x 8 processes)
PREPARE_FILLS = {
    "gradient_clipping": 1.0,
    "train_micro_batch_size_per_gpu": 2,
    "train_batch_size": 16,
    "gradient_accumulation_steps": 1,
}


def deepspeed_accelerator(environment: dict[str, str]):
    with mock.patch.dict(os.environ, environment):
        plugin = DeepSpeedPlugin()
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))


def test_deepspeed_config_clips_at_max_grad_norm_or_refuses():
    train = load_training_script("train")
    environment = launcher_environment("deepspeed_zero2")
    accelerator = deepspeed_accelerator(environment)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    assert config["zero_optimization"]["stage"] == 2 and config["gradient_clipping"] == 0.01
    assert config["gradient_accumulation_steps"] == "auto"  # train.py's --gradient_accumulation_steps decides
    train.configure_deepspeed(accelerator, 0.01, 2)
    assert (config["gradient_clipping"], config["train_micro_batch_size_per_gpu"]) == (0.01, 2)
    with pytest.raises(ValueError, match=r"gradient_clipping = 0.01, but --max_grad_norm is 0.1"):
        train.configure_deepspeed(deepspeed_accelerator(environment), 0.1, 2)

    # a DeepSpeed config without a clip ("auto"): accelerate alone fills in 1.0 at prepare ...
    unset = {key: value for key, value in environment.items() if key != "ACCELERATE_GRADIENT_CLIPPING"}
    accelerator = deepspeed_accelerator(unset)
    plugin = accelerator.state.deepspeed_plugin
    assert plugin.deepspeed_config["gradient_clipping"] == "auto"
    untouched = deepspeed_accelerator(unset).state.deepspeed_plugin
    untouched.deepspeed_config_process(must_match=False, **PREPARE_FILLS)
    assert untouched.deepspeed_config["gradient_clipping"] == 1.0
    # ... train.py puts --max_grad_norm there first, which prepare then keeps
    train.configure_deepspeed(accelerator, 0.01, 2)
    plugin.deepspeed_config_process(must_match=False, **PREPARE_FILLS)
    assert plugin.deepspeed_config["gradient_clipping"] == 0.01
    accelerator = deepspeed_accelerator(unset)
    train.configure_deepspeed(accelerator, 0.0, 2)  # --max_grad_norm 0: no clipping, DeepSpeed's 0
    assert accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Clipping and FSDP, 2 gloo processes against one process on the whole batch
# ----------------------------------------------------------------------------------------------------------------------
MAX_GRAD_NORM = 0.01


def fixed_inputs():
    """A batch of 4 images and a vocabulary, the same in every process."""
    generator = torch.Generator().manual_seed(1)
    size = tiny_config().vision_config.image_size
    pixel_values = torch.randn(4, 3, size, size, generator=generator)
    class_embeddings = torch.nn.functional.normalize(torch.randn(6, 1, 32, generator=generator), dim=-1)
    return pixel_values, class_embeddings


def deterministic_loss(model, pixel_values, class_embeddings) -> torch.Tensor:
    """
    A loss reaching every trained module (masks: FPN, pixel and transformer decoders; classes: LDP and classifier;
    IoU head), a mean over images (so that the mean of two half-batch losses is the whole batch's), without the
    matching loss's random point sampling.
    """
    outputs = model(pixel_values=pixel_values, class_embeddings=class_embeddings)
    return (
        outputs.masks_queries_logits.float().sigmoid().mean()
        + outputs.class_queries_logits.float().softmax(-1)[..., 0].mean()
        + outputs.iou_scores.float().mean()
    )


def fresh_model_and_optimizer(train):
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config()).train()
    args = train.parse_args(["--max_steps", "10"])
    assert args.max_grad_norm == MAX_GRAD_NORM  # the recipe's default
    groups, optimizer, _ = train.build_optimization(args, model)
    return model, groups, optimizer


def reference_step(train) -> dict:
    """One process, whole batch: FC-CLIP's clip (torch's clip_grad_norm_ over every trained parameter), one step."""
    model, groups, optimizer = fresh_model_and_optimizer(train)
    pixel_values, class_embeddings = fixed_inputs()
    deterministic_loss(model, pixel_values, class_embeddings).backward()
    trained = [p for group in groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(trained, MAX_GRAD_NORM)
    names = {id(p): name for name, p in model.named_parameters()}
    clipped = {names[id(p)]: p.grad.clone() for p in trained}
    optimizer.step()
    return {"norm": float(norm), "clipped": clipped, "weights": {names[id(p)]: p.detach().clone() for p in trained}}


def join_process_group_environment(rank: int, world_size: int, port: int) -> None:
    """The environment torchrun gives a CPU process of a `world_size`-process group on this host (gloo)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
    )


def clipping_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    join_process_group_environment(rank, world_size, port)
    import re

    from accelerate import Accelerator
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    train = load_training_script("train")
    pixel_values, class_embeddings = fixed_inputs()
    half = slice(2 * rank, 2 * rank + 2)
    results = {}

    # DDP through accelerate, as train.py runs it
    accelerator = Accelerator()
    assert accelerator.distributed_type == DistributedType.MULTI_CPU and accelerator.num_processes == 2
    model, groups, optimizer = fresh_model_and_optimizer(train)
    names = {id(p): name for name, p in model.named_parameters()}
    trained = [p for group in groups for p in group["params"]]
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.backward(deterministic_loss(model, pixel_values[half], class_embeddings))
    norm = train.clip_gradients(accelerator, model, MAX_GRAD_NORM)
    clipped = {names[id(p)]: p.grad.clone() for p in trained}
    optimizer.step()
    results["ddp"] = {
        "norm": float(norm),
        "clipped": clipped,
        "weights": {names[id(p)]: p.detach().clone() for p in trained},
    }

    # torch's FSDP1 as accelerate wraps the model from fsdp.yaml (its plugin, built from its launcher environment)
    with mock.patch.dict(os.environ, launcher_environment("fsdp")):
        plugin = FullyShardedDataParallelPlugin()
    model, groups, optimizer = fresh_model_and_optimizer(train)  # before wrapping, as train.py
    names = {id(p): name for name, p in model.named_parameters()}
    fsdp = SimpleNamespace(
        distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin), num_processes=world_size
    )
    replicated = train.configure_fsdp(fsdp, model)
    ignored = [module for name, module in model.named_modules() if re.fullmatch(plugin.ignored_modules, name)]
    wrapped = FSDP(
        model,
        sharding_strategy=plugin.sharding_strategy,
        auto_wrap_policy=plugin.auto_wrap_policy,
        use_orig_params=plugin.use_orig_params,
        ignored_modules=ignored,
        device_id=torch.device("cpu"),
    )
    # accelerator.clip_grad_norm_ as accelerate runs it under FSDP (its own code, on this wrapped model)
    fsdp.unscale_gradients, fsdp._models, fsdp.is_fsdp2 = (lambda: None), [wrapped], False
    fsdp.clip_grad_norm_ = lambda parameters, max_norm: Accelerator.clip_grad_norm_(fsdp, parameters, max_norm)
    deterministic_loss(wrapped, pixel_values[half], class_embeddings).backward()
    train.average_gradients(fsdp, replicated)
    trained = [p for group in groups for p in group["params"]]
    # each process holds a shard: its own norm is not the global one (why the pre-prepare subset was wrong)
    local = torch.nn.utils.get_total_norm([p.grad for p in trained if p.grad is not None])
    norm = train.clip_gradients(fsdp, wrapped, MAX_GRAD_NORM)
    with FSDP.summon_full_params(wrapped, with_grads=True):
        clipped = {names[id(p)]: p.grad.clone() for p in trained}
    optimizer.step()
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
        state = wrapped.state_dict()
    results["fsdp"] = {
        "norm": float(norm),
        "local_norm": float(local),
        "clipped": clipped,
        "weights": {names[id(p)]: state[names[id(p)]].clone() for p in trained},
        "local_sizes": {names[id(p)]: p.numel() for p in trained},
        "state_keys": sorted(state),
    }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_clip_is_fcclips_global_norm_clip_under_ddp_and_fsdp(tmp_path):
    train = load_training_script("train")
    mp.spawn(clipping_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    reference = reference_step(train)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for kind in ("ddp", "fsdp"):
        for result in ranks:
            assert result[kind]["norm"] == pytest.approx(reference["norm"], rel=1e-5), kind
            assert reference["norm"] > 10 * MAX_GRAD_NORM  # the clip is active
            assert result[kind]["clipped"].keys() == reference["clipped"].keys()
            for name, gradient in reference["clipped"].items():
                torch.testing.assert_close(result[kind]["clipped"][name], gradient, rtol=1e-4, atol=1e-9, msg=name)
            for name, weight in reference["weights"].items():
                torch.testing.assert_close(result[kind]["weights"][name], weight, rtol=1e-5, atol=1e-7, msg=name)
    # the full state dict (what save_model saves) holds every weight, the ignored modules' included
    assert ranks[0]["fsdp"]["state_keys"] == sorted(PosSAMForPanopticSegmentation(tiny_config()).state_dict())
    # FSDP really split the trained weights between the processes (the classifier, ignored, is whole on both), and a
    # process's own norm is not the global one
    sizes = {name: weight.numel() for name, weight in reference["weights"].items()}
    held = {name: ranks[0]["fsdp"]["local_sizes"][name] + ranks[1]["fsdp"]["local_sizes"][name] for name in sizes}
    assert {name for name in sizes if held[name] == 2 * sizes[name]} == {
        name for name in sizes if name.startswith("classifier.")
    }
    assert sum(held.values()) - sum(sizes[name] for name in sizes if name.startswith("classifier.")) == sum(
        sizes.values()
    )
    assert all(abs(r["fsdp"]["local_norm"] - reference["norm"]) > 1e-3 * reference["norm"] for r in ranks)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation on every process, through the prepared model
# ----------------------------------------------------------------------------------------------------------------------
def coco_rows() -> list[dict]:
    """The real COCO panoptic sample as dataset rows (A, B, A again under another id) and one undecodable row."""
    annotations = json.loads((SAMPLE / "panoptic_examples.json").read_text())["annotations"]
    rows = [
        {
            "image": Image.open(SAMPLE / "input_images" / annotation["file_name"].replace(".png", ".jpg")),
            "label": Image.open(SAMPLE / "panoptic_examples" / annotation["file_name"]),
            "segments_info": annotation["segments_info"],
            "image_id": annotation["image_id"],
        }
        for annotation in annotations
    ]
    return [rows[0], rows[1], dict(rows[0], image_id="again"), dict(rows[1], image={"bytes": b"broken", "path": None})]


def coco_evaluator(model, class_embeddings, synonym_mask, **kwargs):
    from transformers_possam import PosSAMImageProcessor
    from transformers_possam.evaluation import PanopticEvaluator

    size = tiny_config().vision_config.image_size
    image_processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    categories = json.loads((SAMPLE / "panoptic_coco_categories.json").read_text())
    return PanopticEvaluator(
        model, image_processor, categories, class_embeddings, synonym_mask, batch_size=1, min_seen=1, **kwargs
    )


def coco_model_and_vocabulary():
    """A tiny model trained on nothing, with the COCO vocabulary's text embeddings (computed before any wrapping)."""
    from transformers_possam import PosSAMImageProcessor, PosSAMProcessor, clip_tokenizer_from_bpe
    from transformers_possam.evaluation import vocabulary_embeddings

    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config()).eval()
    categories = json.loads((SAMPLE / "panoptic_coco_categories.json").read_text())
    processor = PosSAMProcessor(PosSAMImageProcessor(), clip_tokenizer_from_bpe())
    return (model, *vocabulary_embeddings(model, processor, categories))


def evaluation_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    join_process_group_environment(rank, world_size, port)
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from transformers_possam.data import TooManyBadSamples

    train = load_training_script("train")
    accelerator = Accelerator()
    model, class_embeddings, synonym_mask = coco_model_and_vocabulary()
    model = accelerator.prepare(model)  # DDP: every forward broadcasts buffers, a collective
    forwards = []
    accelerator.unwrap_model(model).register_forward_pre_hook(lambda *_: forwards.append(1))
    rows = [row for index, row in enumerate(coco_rows()) if index % world_size == rank]  # as run_evaluation
    evaluator = coco_evaluator(model, class_embeddings, synonym_mask, max_bad_fraction=0.6)
    evaluator.process(rows, any_process=train.ProcessAgreement(accelerator))
    states = gather_object([evaluator.state()])
    outcome = {"forwards": len(forwards), "merged": None}
    if rank == 0:
        from transformers_possam.evaluation import PanopticEvaluator

        state = PanopticEvaluator.merge_states(states)
        outcome["merged"] = PanopticEvaluator.summarize(state)
        outcome["statistics"] = {key: state[key].tolist() for key in ("panoptic", "confusion")}

    # a process that fails (here: too many bad rows) stops every process at the next forward pass, none hangs
    rows = coco_rows()[:3] if rank == 0 else coco_rows()[3:] * 3
    evaluator = coco_evaluator(model, class_embeddings, synonym_mask, max_bad_fraction=0.01)
    agreement = train.ProcessAgreement(accelerator)
    try:
        evaluator.process(rows, any_process=agreement)
    except (TooManyBadSamples, RuntimeError) as error:
        outcome["failure"] = type(error).__name__
    outcome["decided"] = agreement.decided
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(outcome, default=str))
    torch.distributed.destroy_process_group()


def assert_same_results(merged, single, path="results"):
    """Equal counts; sums of floats equal up to their summation order."""
    if isinstance(single, dict):
        assert merged.keys() == single.keys(), path
        for key in single:
            assert_same_results(merged[key], single[key], f"{path}.{key}")
    elif isinstance(single, (list, tuple)):
        assert len(merged) == len(single), path
        for index, (a, b) in enumerate(zip(merged, single)):
            assert_same_results(a, b, f"{path}[{index}]")
    elif isinstance(single, float):
        assert merged == pytest.approx(single, rel=1e-9, abs=1e-12, nan_ok=True), path
    else:
        assert merged == single, path


def run_two_processes(worker, out_dir: Path, timeout: float = 400) -> None:
    """mp.spawn of 2 gloo processes, failed if they do not finish within `timeout` seconds (a hang)."""
    import time

    context = mp.spawn(worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} did not finish in {timeout} s: the processes hang")


@pytest.mark.skipif(not (SAMPLE / "panoptic_examples.json").is_file(), reason="the COCO panoptic sample is missing")
def test_evaluation_split_over_processes_equals_one_process_on_real_coco(tmp_path):
    run_two_processes(evaluation_worker, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # rank 0 scores two rows, rank 1 one row and one bad row: it runs a padding forward to keep in step
    assert [r["forwards"] for r in ranks] == [2, 2]
    model, class_embeddings, synonym_mask = coco_model_and_vocabulary()
    evaluator = coco_evaluator(model, class_embeddings, synonym_mask, max_bad_fraction=0.6)
    evaluator.process(coco_rows())
    single = json.loads(json.dumps(evaluator.results(), default=str))
    assert (single["images"], single["bad_samples"]) == (3, 1)
    assert single["All"]["n"] > 0 and single["mask_AP"] is not None  # (an untrained model: scores near 0)
    merged = ranks[0]["merged"]
    merged["bad_sample_ids"], single["bad_sample_ids"] = (
        sorted(merged["bad_sample_ids"]),
        sorted(single["bad_sample_ids"]),
    )
    assert_same_results(merged, single)
    # the sufficient statistics themselves: PQ's per-class TP / FP / FN counts and IoU sums, mIoU's confusion counts
    state = evaluator.state()
    statistics = ranks[0]["statistics"]
    assert np.asarray(statistics["confusion"]).sum() > 0 and np.asarray(statistics["panoptic"]).sum() > 0
    np.testing.assert_array_equal(statistics["confusion"], state["confusion"])
    np.testing.assert_allclose(statistics["panoptic"], state["panoptic"], rtol=1e-12)
    # the failing process raised its own error, the other one stopped too; both reached the final decision
    assert (ranks[0]["failure"], ranks[1]["failure"]) == ("RuntimeError", "TooManyBadSamples")
    assert ranks[0]["decided"] and ranks[1]["decided"]


# ----------------------------------------------------------------------------------------------------------------------
# Two machines
# ----------------------------------------------------------------------------------------------------------------------
def launch_two_machines(output_dir: Path, *extra: str, timeout: float = 600) -> None:
    """
    `accelerate launch --num_machines 2 --machine_rank R` for R = 0, 1 on this host, one process each (world size 2),
    as two nodes would run it (README, "Training"); CPU DDP through torchrun's launcher (ACCELERATE_USE_CPU=1), as
    tests/test_training.py launches 2 processes on one machine. The output folder is shared, as across real nodes
    it has to be (a shared filesystem).
    """
    port = str(free_port())
    launches = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_machines",
                "2",
                "--num_processes",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                port,
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                str(REPO / "training" / "train.py"),
                "--output_dir",
                str(output_dir),
                "--max_steps",
                "6",
                "--toy_train_size",
                "40",
                "--record_sample_ids",
                *extra,
            ],
            env={**ENV, "ACCELERATE_USE_CPU": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [launch.communicate(timeout=timeout)[0] for launch in launches]
    finally:
        for launch in launches:
            launch.kill()
    for rank, (launch, output) in enumerate(zip(launches, outputs)):
        assert launch.returncode == 0, f"machine {rank}:\n{output[-3000:]}"


@pytest.mark.slow
def test_two_machines_train_checkpoint_resume_and_shard_data(tmp_path):
    full = tmp_path / "full"
    launch_two_machines(full, "--checkpointing_steps", "3")
    ids = [json.loads((full / f"sample_ids_{rank}.json").read_text()) for rank in (0, 1)]
    assert [len(rank_ids) for rank_ids in ids] == [12, 12]  # 6 steps x batch 2 on each machine
    assert not set(ids[0]) & set(ids[1])  # each machine reads its own shard
    # one checkpoint per step written once, with each machine's stream position and random state
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    for rank in (0, 1):
        assert (full / "checkpoint-3" / f"stream_{rank}.json").is_file()
        assert any((full / "checkpoint-3").glob(f"*_{rank}.*")), rank  # random states
    assert (full / "model.safetensors").is_file()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (full / "checkpoint-3").rename(resumed / "checkpoint-3")
    launch_two_machines(resumed, "--resume_from_checkpoint", "latest")
    again = [json.loads((resumed / f"sample_ids_{rank}.json").read_text()) for rank in (0, 1)]
    assert again == [rank_ids[6:] for rank_ids in ids]  # each machine goes on where it stopped
    weights, resumed_weights = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert weights.keys() == resumed_weights.keys()
    assert all(torch.equal(weights[key], resumed_weights[key]) for key in weights)
