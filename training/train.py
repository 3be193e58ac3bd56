#!/usr/bin/env python
"""Fine-tune PosSAM on panoptic data with Accelerate (no Trainer).

    python training/train.py                                   # tiny model on the embedded toy set
    accelerate launch training/train.py --model_name_or_path <possam checkpoint> --dataset_name <folder | hub id>

Datasets (`transformers_possam.data.stream.load_panoptic_dataset`): COCO panoptic rows (`image`, `label` = panoptic
PNG, `segments_info`, as `nielsr/coco-panoptic-val2017`; categories from the dataset's `categories.json`, else the
built-in COCO-133 table) or the instance-segmentation rows of transformers' `run_instance_segmentation_no_trainer.py`
(`image`, `annotation` = PNG with channel 0 the class id and channel 1 the instance id; classes from `--label_file`,
the `semantic_class_to_id` column or a `ClassLabel` feature; `--do_reduce_labels` as the example), from the Hub, a `save_to_disk` folder or parquet shards. Flags are named as in
`run_instance_segmentation_no_trainer.py` where they mean the same (`--max_train_steps`, `--num_warmup_steps`,
`--lr_scheduler_type`, `--per_device_eval_batch_size`, `--with_tracking`, `--report_to`, `--push_to_hub`,
`--hub_model_id`, `--hub_token`); this script's earlier names (`--max_steps`) remain aliases.

The defaults are the paper's recipe (Appendix A; `transformers_possam.optimization`). Data streams through 🤗 datasets
(`streaming=True`), whole shards per process, read by `--dataloader_num_workers` DataLoader workers (or in the training
process) that build each process's batches (lists of uint8 masks), so no batch dispatching is involved; the stream's
position is resumed without re-reading the consumed rows (`transformers_possam.data.stream`). The scheduler steps once
per optimizer step. Checkpoints
(`output_dir/checkpoint-{step}`) hold model, optimizer, scheduler, RNG states and each process's stream position, with
a manifest of checksums checked on resume; nothing in them is unpickled beyond `torch.load(weights_only=True)`
(`transformers_possam.checkpointing`). A checkpoint is written under a temporary name and renamed when complete, so
`latest` never picks up a half-written one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, broadcast_object_list, gather_object, set_seed
from huggingface_hub import HfApi
from tqdm.auto import tqdm
from transformers import SchedulerType, get_scheduler

from transformers_possam import (
    PosSAMForPanopticSegmentation,
    PosSAMImageProcessor,
    PosSAMProcessor,
    clip_tokenizer_from_bpe,
    tiny_config,
)
from transformers_possam.checkpointing import (
    CheckpointError,
    list_checkpoints,
    load_rng_state,
    load_scheduler,
    save_rng_state,
    save_scheduler,
    verify_manifest,
    write_manifest,
)
from transformers_possam.data.stream import (
    PanopticTrainStream,
    load_panoptic_dataset,
)
from transformers_possam.evaluation import PanopticEvaluator, vocabulary_embeddings
from transformers_possam.evaluation.loop import ALL_DONE, FAILED
from transformers_possam.modeling.loss import accumulation_loss_normalizers
from transformers_possam.optimization import SCHEDULES, make_optimizer, parameter_groups, step_decay
from transformers_possam.vocabularies import Vocabulary


logger = logging.getLogger("possam.train")
# transformers' schedules that run_instance_segmentation_no_trainer.py offers
SCHEDULER_TYPES = (
    SchedulerType.LINEAR,
    SchedulerType.COSINE,
    SchedulerType.COSINE_WITH_RESTARTS,
    SchedulerType.POLYNOMIAL,
    SchedulerType.CONSTANT,
    SchedulerType.CONSTANT_WITH_WARMUP,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model_name_or_path", default=None, help="PosSAM checkpoint (folder or Hub id); default: tiny demo model"
    )
    parser.add_argument(
        "--dataset_name",
        default=None,
        help="Hub id, save_to_disk folder or parquet folder, COCO panoptic (image, label, segments_info) or instance "
        "segmentation (image, annotation) rows; default: the embedded toy set",
    )
    parser.add_argument(
        "--label_file",
        default=None,
        help='JSON category table: id2label ({"0": "cat"}), label2id ({"cat": 0}) or a list of '
        '{"id", "name", "isthing"}; default: the dataset\'s categories.json, its semantic_class_to_id column '
        "(instance rows) or the built-in COCO-133 table (COCO panoptic rows)",
    )
    parser.add_argument(
        "--do_reduce_labels",
        action="store_true",
        help="instance-segmentation rows: leave class 0 (background) unlabeled and shift the other ids down by one, "
        "in the annotations and the label table alike (as run_instance_segmentation_no_trainer.py)",
    )
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="validation")
    parser.add_argument("--output_dir", default="outputs/train")
    parser.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        default="possam",
        help="preset for --max_steps / --lr_drops: 'possam' = the paper's 250K steps, LR x 0.1 at 150K and "
        "200K (Appendix A); 'fcclip' = FC-CLIP's 368,750 steps, drops at 327,778 and 355,092",
    )
    parser.add_argument(
        "--max_train_steps",
        "--max_steps",
        dest="max_steps",
        type=int,
        default=None,
        help="optimizer steps (default: the schedule's)",
    )
    parser.add_argument(
        "--lr_scheduler_type",
        default="step",
        choices=["step", *(kind.value for kind in SCHEDULER_TYPES)],
        help="'step' (default): the --schedule's step decay (LR x 0.1 at --lr_drops); the others are transformers' "
        "get_scheduler schedules over --max_train_steps, as in run_instance_segmentation_no_trainer.py",
    )
    parser.add_argument(
        "--num_warmup_steps", type=int, default=0, help="linear warmup from 0 over this many optimizer steps"
    )
    parser.add_argument("--per_device_train_batch_size", type=int, default=2, help="paper: 2 per GPU x 8 GPUs = 16")
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="DataLoader worker processes per training process that read, decode, jitter and collate samples (0: in "
        "the training process). Resume with the same number: it fixes the sample order.",
    )
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--weight_decay_norm", type=float, default=0.0, help="normalization layers (FC-CLIP: 0)")
    parser.add_argument("--weight_decay_embed", type=float, default=0.0, help="nn.Embedding weights (FC-CLIP: 0)")
    parser.add_argument(
        "--backbone_lr_multiplier",
        type=float,
        default=0.1,
        help="LR factor of the SAM encoder when it is trained (--train_encoders; FC-CLIP's BACKBONE_MULTIPLIER)",
    )
    parser.add_argument(
        "--lr_drops",
        type=float,
        nargs="*",
        default=None,
        help="fractions of max_steps where the LR is multiplied by 0.1 (default: the schedule's, "
        "i.e. 0.6 0.8 for 'possam')",
    )
    parser.add_argument(
        "--max_grad_norm", type=float, default=0.01, help="full-model gradient clipping (paper / FC-CLIP: 0.01)"
    )
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--checkpointing_steps", type=int, default=None)
    parser.add_argument("--checkpoints_total_limit", type=int, default=3)
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    parser.add_argument("--eval_steps", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=64)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=4, help="images per evaluation forward pass")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no_augmentation", action="store_true", help="turn large-scale jitter off")
    parser.add_argument(
        "--min_scale", type=float, default=0.1, help="large-scale jitter's smallest scale (FC-CLIP: 0.1)"
    )
    parser.add_argument(
        "--max_scale", type=float, default=2.0, help="large-scale jitter's largest scale (FC-CLIP: 2.0)"
    )
    parser.add_argument(
        "--drop_cropped_segments",
        action="store_true",
        help="give no target to segments the jitter's crop removed (FC-CLIP keeps them as empty masks)",
    )
    parser.add_argument("--max_bad_fraction", type=float, default=0.01)
    parser.add_argument(
        "--train_encoders",
        action="store_true",
        help="also train the SAM encoder (only sensible for tiny random demo models)",
    )
    parser.add_argument("--toy_train_size", type=int, default=512)
    parser.add_argument("--toy_eval_size", type=int, default=32)
    parser.add_argument("--record_sample_ids", action="store_true", help="write each process's sample ids (for tests)")
    parser.add_argument(
        "--with_tracking", action="store_true", help="log to experiment trackers (accelerate; see --report_to)"
    )
    parser.add_argument(
        "--report_to",
        default=None,
        help="trackers for accelerate's log_with: 'all' (the default with --with_tracking: every installed one), "
        "'tensorboard', 'wandb', ... Given alone it turns tracking on, as before --with_tracking existed",
    )
    parser.add_argument("--push_to_hub", action="store_true", help="upload the model to the Hub (end and checkpoints)")
    parser.add_argument("--hub_model_id", default=None, help="Hub repo to push to (default: output_dir's name)")
    parser.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one)")
    args = parser.parse_args(argv)
    schedule = SCHEDULES[args.schedule]
    if args.max_steps is None:
        args.max_steps = schedule.max_steps
    if args.lr_drops is None:
        args.lr_drops = list(schedule.lr_drop_fractions)
    if args.max_steps < 1:
        parser.error(f"--max_steps must be >= 1, got {args.max_steps}.")
    if any(not 0 < fraction <= 1 for fraction in args.lr_drops):
        parser.error(f"--lr_drops are fractions of --max_steps in (0, 1], got {args.lr_drops}.")
    if not 0 <= args.num_warmup_steps <= args.max_steps:
        parser.error(
            f"--num_warmup_steps must be in [0, --max_train_steps = {args.max_steps}], got {args.num_warmup_steps}."
        )
    if args.per_device_eval_batch_size < 1:
        parser.error(f"--per_device_eval_batch_size must be >= 1, got {args.per_device_eval_batch_size}.")
    if args.dataloader_num_workers < 0:
        parser.error(
            f"--dataloader_num_workers must be >= 0 (0: read in the training process), got {args.dataloader_num_workers}."
        )
    if args.with_tracking and args.report_to is None:
        args.report_to = "all"
    if args.report_to is not None:
        args.with_tracking = True
        check_trackers(parser, args.report_to)
    return args


def check_trackers(parser: argparse.ArgumentParser, report_to: str) -> None:
    """Refuse tracking with no installed tracker (accelerate would only warn and log nowhere)."""
    from accelerate import PartialState
    from accelerate.tracking import filter_trackers

    PartialState()  # accelerate's logger, which filter_trackers uses, needs it (Accelerator() reuses it)
    try:
        available = filter_trackers(report_to)
    except ValueError as error:
        parser.error(f"--report_to {report_to}: {error}")
    if not available:
        missing = "no experiment tracker is installed" if report_to == "all" else f"{report_to} is not installed"
        parser.error(
            f"--with_tracking / --report_to {report_to}: {missing}, so nothing would be logged. Install one "
            "(pip install tensorboard, or wandb, comet_ml, clearml, ...) or drop --with_tracking / --report_to."
        )


def build_model_and_processor(args):
    if args.model_name_or_path is None:
        config = tiny_config()
        model = PosSAMForPanopticSegmentation(config)
        size = config.vision_config.image_size
        image_processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
        processor = PosSAMProcessor(image_processor, clip_tokenizer_from_bpe())
    else:
        model = PosSAMForPanopticSegmentation.from_pretrained(args.model_name_or_path)
        processor = PosSAMProcessor.from_pretrained(args.model_name_or_path)
    if args.train_encoders:
        model.model.vision_encoder.requires_grad_(True)
    return model, processor


def record_training_vocabulary(model, processor, vocabulary: Vocabulary, device) -> None:
    """
    The saved model records what it was trained on: MASE's seen / unseen split (evaluation, pipeline) reads
    `training_vocabulary`, and its default vocabulary (`id2label`, the text embeddings forward uses when given none)
    follows. Called before the model is wrapped (the default embeddings change shape with the vocabulary).
    """
    model.config.set_training_vocabulary(list(vocabulary.names))
    model.to(device)
    model.set_default_vocabulary(processor)


def build_optimization(args, model):
    """(parameter groups, AdamW, step-decay scheduler) of the recipe in `args` (the scheduler is not prepared)."""
    groups = parameter_groups(
        model,
        args.learning_rate,
        args.weight_decay,
        weight_decay_norm=args.weight_decay_norm,
        weight_decay_embed=args.weight_decay_embed,
        backbone_multiplier=args.backbone_lr_multiplier,
    )
    optimizer = make_optimizer(groups, args.learning_rate)
    if args.lr_scheduler_type != "step":
        # transformers' schedules, as the instance-segmentation example builds them (one step per optimizer step)
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=args.num_warmup_steps,
            num_training_steps=args.max_steps,
        )
        return groups, optimizer, scheduler
    decay = step_decay(args.max_steps, args.lr_drops)
    warmup = args.num_warmup_steps

    def warmed_up_step_decay(step: int) -> float:
        # transformers' linear warmup (step / warmup below it), times the paper's step decay
        return decay(step) * (step / warmup if step < warmup else 1.0)

    return groups, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmed_up_step_decay)


def find_checkpoint(output_dir: Path, spec: str) -> Path:
    if spec != "latest":
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {spec}: no such folder.")
        return path
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}.")
    return checkpoints[-1]


def save_checkpoint(accelerator, output_dir: Path, step: int, stream, scheduler, limit: int) -> None:
    """
    Model and optimizer through `accelerator.save_state`; scheduler, random generators (per process), stream
    positions and the step as JSON / safetensors; a manifest of every file's checksum; all under a temporary name
    renamed when complete, so `latest` only ever sees complete, checkable checkpoints.
    """
    final = output_dir / f"checkpoint-{step}"
    temporary = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    rank = accelerator.process_index
    (temporary / f"stream_{rank}.json").write_text(json.dumps(stream.position.state_dict()))
    save_rng_state(temporary, rank)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / "step.json").write_text(json.dumps({"step": step}))
        save_scheduler(temporary, scheduler)
        write_manifest(temporary)
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)  # atomic: `latest` only ever sees complete checkpoints
        checkpoints = list_checkpoints(output_dir)
        for old in checkpoints[: max(0, len(checkpoints) - limit)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resume(accelerator, checkpoint: Path, stream, scheduler) -> int:
    """
    Check every file of `checkpoint` against its manifest, then restore model, optimizer, scheduler, this process's
    random generators and stream position; returns the step. Nothing is unpickled beyond `torch.load(weights_only=True)`
    of the optimizer; a damaged file is a `CheckpointError` naming it and the previous checkpoint.
    """
    # one process reads and hashes the files; every process gets its verdict (no N-fold reads of shared storage)
    problem = None
    if accelerator.is_main_process:
        try:
            verify_manifest(checkpoint)
        except CheckpointError as error:
            problem = str(error)
    problem = broadcast_object_list([problem])[0]
    if problem is not None:
        raise CheckpointError(problem)
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.FSDP):
        logger.warning(
            "Resuming under %s: its own checkpoint loader reads the model / optimizer files, and it may unpickle them "
            "without PyTorch's weights-only restriction. Resume only from checkpoints you wrote yourself.",
            accelerator.distributed_type,
        )
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as error:
        raise CheckpointError(
            f"Cannot load the model / optimizer state of {checkpoint}: {type(error).__name__}: {error}"
        ) from error
    load_scheduler(checkpoint, scheduler)
    # ours, after accelerate's: its RNG pickle is read with weights_only=True and silently skipped when unreadable
    load_rng_state(checkpoint, accelerator.process_index)
    try:
        step = int(json.loads((checkpoint / "step.json").read_text())["step"])
        stream.position.load_state_dict(
            json.loads((checkpoint / f"stream_{accelerator.process_index}.json").read_text())
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"The step or stream position of {checkpoint} cannot be read ({error}).") from None
    return step


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False),
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    # the same seed everywhere for the model's initialization ...
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    hub = HubUploader.create(args, accelerator) if args.push_to_hub else None

    model, processor = build_model_and_processor(args)
    # ... then one stream of randomness per process: the loss's point sampling (and anything else drawn from the
    # global generators) differs between ranks, as in FC-CLIP's per-worker seeding. Saved and restored per process
    # by save_state / load_state.
    set_seed(args.seed, device_specific=True)
    train_set, categories, category_source = load_panoptic_dataset(
        args.dataset_name,
        args.train_split,
        toy_size=args.toy_train_size,
        seed=args.seed,
        label_file=args.label_file,
        return_source=True,
        do_reduce_labels=args.do_reduce_labels,
    )
    logger.info("%d classes from %s", len(categories), category_source)
    vocabulary = Vocabulary.from_categories(categories)
    record_training_vocabulary(model, processor, vocabulary, accelerator.device)
    # Everything the frozen text tower computes is taken here, before prepare: FSDP / DeepSpeed ZeRO-3 shard the
    # weights of the wrapped model, so the text tower cannot run outside the wrapper's forward afterwards (and FSDP's
    # mixed precision casts buffers). The vocabulary was encoded once, by record_training_vocabulary.
    class_embeddings, synonym_mask = model.default_vocabulary()
    evaluation_vocabulary = (
        EvaluationVocabulary.compute(args, model, processor, vocabulary, class_embeddings, synonym_mask)
        if args.eval_steps
        else None
    )
    stream = PanopticTrainStream(
        train_set,
        processor.image_processor,
        vocabulary.label_map,
        seed=args.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        augment=not args.no_augmentation,
        max_bad_fraction=args.max_bad_fraction,
        drop_cropped_segments=args.drop_cropped_segments,
        min_scale=args.min_scale,
        max_scale=args.max_scale,
        category_source=category_source,
    )

    if args.record_sample_ids:
        stream.record_ids = []
    groups, optimizer, scheduler = build_optimization(args, model)
    configure_deepspeed(accelerator, args.max_grad_norm, args.per_device_train_batch_size)
    replicated_trained = configure_fsdp(accelerator, model)
    model_config = model.config  # read before prepare: the wrapper hides it
    model, optimizer = accelerator.prepare(model, optimizer)
    # pixels in the frozen SAM encoder's dtype: bf16 under DeepSpeed's bf16, which casts the whole model and runs no
    # autocast; float32 otherwise (DDP / FSDP mixed precision: autocast casts inside)
    pixel_dtype = accelerator.unwrap_model(model).model.vision_encoder.patch_embed.projection.weight.dtype
    if args.record_sample_ids:  # for tests: each process's point-sampling generator state and its optimizer groups
        state = torch.random.get_rng_state()
        (output_dir / f"rng_{accelerator.process_index}.json").write_text(
            json.dumps(
                {
                    "torch_rng_sha256": hashlib.sha256(state.numpy().tobytes()).hexdigest(),
                    "groups": [
                        {"lr": g["lr"], "weight_decay": g["weight_decay"], "names": g["names"]} for g in groups
                    ],
                }
            )
        )

    step = 0
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(output_dir, args.resume_from_checkpoint)
        step = resume(accelerator, checkpoint, stream, scheduler)
        logger.info("Resumed from %s at step %d", checkpoint, step)

    if args.with_tracking:
        accelerator.init_trackers(
            "possam", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )
    batches = stream.batches(
        args.per_device_train_batch_size,
        args.dataloader_num_workers,
        pin_memory=pins_batches(accelerator.device),
    )
    model.train()
    start_step, metrics = step, {}
    progress = tqdm(
        total=args.max_steps, initial=step, desc="train", disable=not accelerator.is_main_process, dynamic_ncols=True
    )
    while step < args.max_steps:
        # One optimizer step = one window of gradient_accumulation_steps micro-batches, drawn first: the loss is
        # normalized by the whole window's mask count and class-weight sum (accumulation_loss_normalizers), so the
        # accumulated gradients are those of one batch of all the window's images, whatever each micro-batch holds.
        window = [next(batches) for _ in range(args.gradient_accumulation_steps)]
        loss_normalizers = accumulation_loss_normalizers(
            [batch["class_labels"] for batch in window],
            num_queries=model_config.num_queries,
            no_object_weight=model_config.no_object_weight,
            device=accelerator.device,
        )
        window_loss = torch.zeros((), device=accelerator.device)
        for batch in window:
            with accelerator.accumulate(model):  # syncs, steps and zeroes only at the window's last micro-batch
                outputs = model(
                    pixel_values=to_training_device(batch["pixel_values"], accelerator.device, pixel_dtype),
                    pixel_mask=to_training_device(batch["pixel_mask"], accelerator.device),
                    class_embeddings=class_embeddings,
                    synonym_mask=synonym_mask,
                    **targets_on_device(batch, accelerator.device),
                    loss_normalizers=loss_normalizers,
                )
                accelerator.backward(outputs.loss)  # divided by gradient_accumulation_steps, as the normalizers expect
                if accelerator.sync_gradients:
                    average_gradients(accelerator, replicated_trained)
                    if args.max_grad_norm:
                        clip_gradients(accelerator, model, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            window_loss += outputs.loss.detach() / args.gradient_accumulation_steps  # = the whole window's loss
        scheduler.step()
        step += 1
        # the loss (averaged) and the bad-sample count (summed) in one all-reduce and one read of the device: each
        # read waits for the step's queued work on a GPU
        summed_loss, bad = accelerator.reduce(
            torch.stack([window_loss.float(), torch.full((), float(stream.position.bad), device=accelerator.device)]),
            reduction="sum",
        ).tolist()
        loss = summed_loss / accelerator.num_processes
        metrics = {"train/loss": loss, "train/lr": scheduler.get_last_lr()[0], "train/bad_samples": bad}
        accelerator.log(metrics, step=step)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.3f}", lr=f"{metrics['train/lr']:.1e}", bad=int(bad))
        if args.checkpointing_steps and step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, step, stream, scheduler, args.checkpoints_total_limit)
            if hub is not None:  # as the example: the model so far, in output_dir, pushed at each checkpoint
                save_model(accelerator, model, processor, output_dir)
                hub.upload(accelerator, output_dir, f"Training in progress, step {step}")
        if args.eval_steps and step % args.eval_steps == 0:
            evaluation = run_evaluation(args, accelerator, model, processor, evaluation_vocabulary)
            if accelerator.is_main_process:  # the evaluation history, one JSON line per evaluation
                with open(output_dir / "eval_history.jsonl", "a", encoding="utf-8") as history:
                    history.write(
                        json.dumps({"step": step, "failed": evaluation is None, **(evaluation or {})}) + "\n"
                    )
            if evaluation is None:
                metrics["eval/failed"] = 1.0
            else:
                metrics.update(evaluation)
                progress.write(
                    f"step {step} eval: PQ {100 * evaluation['eval/all_pq']:.1f}  SQ {100 * evaluation['eval/all_sq']:.1f}  "
                    f"RQ {100 * evaluation['eval/all_rq']:.1f}  mIoU {100 * evaluation['eval/miou']:.1f}  "
                    f"AP {100 * evaluation['eval/mask_ap']:.1f}  bad {int(evaluation['eval/bad_samples'])}"
                )
            accelerator.log(metrics, step=step)

    if args.record_sample_ids:
        (output_dir / f"sample_ids_{accelerator.process_index}.json").write_text(json.dumps(stream.record_ids))
    progress.close()
    logger.info("trained steps %d-%d", start_step, step)
    save_model(accelerator, model, processor, output_dir)
    if hub is not None:
        hub.upload(accelerator, output_dir, "End of training")
    accelerator.end_training()
    return metrics


def pins_batches(device: torch.device) -> bool:
    """Whether the DataLoader workers' batches are page-locked: training on CUDA (fast, asynchronous copies there)."""
    return device.type == "cuda"


def to_training_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """
    `tensor.to(device, dtype)`, without waiting when it comes from page-locked memory (the DataLoader's pinned
    batches on CUDA): the copy is queued on the current stream, ahead of the kernels that read it, and PyTorch's
    caching host allocator keeps the page-locked block until the copy has run. Pageable tensors copy as before.
    """
    return tensor.to(device, dtype, non_blocking=tensor.is_pinned())


def targets_on_device(batch: dict, device: torch.device) -> dict[str, list[torch.Tensor]]:
    """
    The batch's `mask_labels` and `class_labels` on `device`, each image's segment count (dim 0) marked dynamic for
    `torch.compile` (`accelerate launch --dynamo_backend ...`): unmarked, the whole forward is recompiled when the
    counts first change (dynamo's automatic dynamic shapes; usually once, at worst once per image position). Counts
    of 0 and 1 are still specialized by dynamo: each pattern of {0, 1, more} over the batch's positions is a
    compilation of its own, and past dynamo's recompile limit (8) the forward runs eagerly. No effect in eager mode.
    """
    targets = {
        "mask_labels": [to_training_device(masks, device) for masks in batch["mask_labels"]],
        "class_labels": [to_training_device(labels, device) for labels in batch["class_labels"]],
    }
    for tensor in (*targets["mask_labels"], *targets["class_labels"]):
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
    return targets


def save_model(accelerator, model, processor, output_dir: Path) -> None:
    """
    `save_pretrained` of the prepared `model` (weights, config, remote code, training vocabulary) and the processor
    into `output_dir`. The weights come from `accelerator.get_state_dict`, which every process calls: under FSDP /
    DeepSpeed ZeRO-3 it gathers the shards into one full state dict (on the main process), under DDP it is the model's
    own. Only the main process writes (a shared filesystem, or node 0's disk, across machines).
    """
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(
            output_dir, state_dict=state_dict, is_main_process=accelerator.is_main_process
        )
        processor.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


def configure_deepspeed(accelerator, max_grad_norm: float, per_device_train_batch_size: int) -> None:
    """
    Fills the DeepSpeed config (a no-op under any other setup) before `prepare`:

    - `gradient_clipping` from `--max_grad_norm`. DeepSpeed clips inside its own step, by the global gradient norm
      over all processes, and `accelerator.clip_grad_norm_` clips nothing; accelerate fills an "auto" value with 1.0
      (100 times FC-CLIP's 0.01) and an absent one means no clipping, both silently. A config that sets another
      value is refused rather than one of the two silently winning.
    - `train_micro_batch_size_per_gpu` from `--per_device_train_batch_size` when "auto" or absent: accelerate infers it
      from a prepared DataLoader only, and refuses to prepare without one otherwise.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = float(max_grad_norm) if max_grad_norm else 0.0  # DeepSpeed's 0: no clipping
    given = config.get("gradient_clipping", "auto")
    if given == "auto":
        config["gradient_clipping"] = wanted
    elif float(given) != wanted:
        raise ValueError(
            f"The DeepSpeed config sets gradient_clipping = {given}, but --max_grad_norm is {max_grad_norm}: "
            "DeepSpeed clips inside its own step, so only one of them can be applied. Set gradient_clipping to "
            f'"auto" (or remove it) to use --max_grad_norm, or pass --max_grad_norm {given}.'
        )
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = per_device_train_batch_size


def clip_gradients(accelerator, model, max_grad_norm: float) -> torch.Tensor | None:
    """
    FC-CLIP's FULL_MODEL clip: the gradients of all trained parameters scaled together so that their global L2 norm
    (one vector over every parameter and every process's shard) is at most `max_grad_norm`; returns the norm before
    clipping. Given the prepared model's own `parameters()`, accelerate turns this into FSDP's global-norm clip
    (`FullyShardedDataParallel.clip_grad_norm_`, or the DTensor-aware one of FSDP2); any other list would clip each
    process's shard by its local norm. DDP: gradients are already averaged, so the local norm is the global one; frozen
    parameters have no gradient and do not count. DeepSpeed: its engine clips (`configure_deepspeed`), this
    only returns the norm.
    """
    return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)


def configure_fsdp(accelerator, model) -> list[torch.nn.Parameter]:
    """
    Under FSDP (a no-op returning [] otherwise), before `prepare`; returns the trained parameters FSDP leaves to us.

    training/accelerate_configs/fsdp.yaml keeps the frozen SAM encoder and CLIP, and the classifier (its temperature
    is a 0-d parameter, which FSDP cannot shard), out of FSDP (`fsdp_ignored_modules`): they stay whole on every
    process, and FSDP neither shards nor averages their gradients. The classifier's gradients (and the encoders',
    with --train_encoders) are therefore averaged here, by `average_gradients` at every optimizer step, as DDP would.

    FSDP's bf16 policy casts the root module's floating inputs to bf16, but the ignored frozen encoders keep float32
    weights, which the model checks its pixels against: inputs stay float32 here, and autocast (which accelerate
    turns on with mixed precision) runs the encoders in bf16 all the same.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        return []
    plugin = accelerator.state.fsdp_plugin
    policy = plugin.mixed_precision_policy
    if policy is not None:
        # FSDP1's MixedPrecision casts the root's inputs (cast_root_forward_inputs), FSDP2's policy every module's
        names = {field.name for field in dataclasses.fields(policy)}
        plugin.mixed_precision_policy = dataclasses.replace(
            policy, **{name: False for name in ("cast_root_forward_inputs", "cast_forward_inputs") if name in names}
        )
    pattern = plugin.ignored_modules
    if not isinstance(pattern, str) or not pattern:
        return []
    matcher = re.compile(pattern)
    trained: dict[int, torch.nn.Parameter] = {}
    for name, module in model.named_modules():
        if matcher.fullmatch(name):
            trained.update({id(p): p for p in module.parameters() if p.requires_grad})
    return list(trained.values())


def average_gradients(accelerator, parameters: list[torch.nn.Parameter]) -> None:
    """
    Replaces the gradients of `parameters` (replicated on every process, outside DDP / FSDP: `configure_fsdp`) by
    their mean over all processes, in one all-reduce. A parameter without a gradient counts as a zero gradient.
    """
    if not parameters or accelerator.num_processes == 1:
        return
    gradients = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([gradient.reshape(-1) for gradient in gradients])
    torch.distributed.all_reduce(flat)  # SUM: gloo has no AVG
    flat /= accelerator.num_processes
    offset = 0
    for parameter, gradient in zip(parameters, gradients):
        parameter.grad = flat[offset : offset + gradient.numel()].view_as(gradient).clone()
        offset += gradient.numel()


class HubUploader:
    """
    `--push_to_hub` as run_instance_segmentation_no_trainer.py does it: the main process creates the repo
    (`--hub_model_id`, default the output folder's name) and uploads `output_dir` with `HfApi.upload_folder` after each
    checkpoint and at the end, leaving out the resumable checkpoints (optimizer and RNG states, not the model).
    """

    IGNORE_PATTERNS = ["checkpoint-*", ".tmp-checkpoint-*", "checkpoint-*/**", ".tmp-checkpoint-*/**"]

    def __init__(self, api: HfApi | None, repo_id: str | None, token: str | None):
        self.api, self.repo_id, self.token = api, repo_id, token

    @classmethod
    def create(cls, args, accelerator) -> HubUploader:
        api = repo_id = None
        if accelerator.is_main_process:
            api = HfApi()
            repo_name = args.hub_model_id or Path(args.output_dir).absolute().name
            repo_id = api.create_repo(repo_name, exist_ok=True, token=args.hub_token).repo_id
        accelerator.wait_for_everyone()
        return cls(api, repo_id, args.hub_token)

    def upload(self, accelerator, folder: Path, message: str) -> None:
        if accelerator.is_main_process and self.api is not None:
            self.api.upload_folder(
                repo_id=self.repo_id,
                folder_path=str(folder),
                commit_message=message,
                repo_type="model",
                token=self.token,
                ignore_patterns=self.IGNORE_PATTERNS,
            )
        accelerator.wait_for_everyone()


def load_evaluation_split(args):
    """`(rows, categories)` of `--eval_split` as `load_panoptic_dataset` reads it (the rows stream: read anew per call)."""
    return load_panoptic_dataset(
        args.dataset_name,
        args.eval_split,
        toy_size=args.toy_eval_size,
        seed=args.seed,
        label_file=args.label_file,
        do_reduce_labels=args.do_reduce_labels,
    )


class EvaluationVocabulary:
    """
    The evaluation split's categories and their text embeddings, computed before `prepare` (the text tower of a
    sharded model cannot run outside the wrapper's forward), or the error that prevented it: every evaluation then
    fails with it, logged, and training goes on.
    """

    def __init__(self, categories=None, class_embeddings=None, synonym_mask=None, error: Exception | None = None):
        self.categories, self.class_embeddings, self.synonym_mask, self.error = (
            categories,
            class_embeddings,
            synonym_mask,
            error,
        )

    @classmethod
    def compute(cls, args, model, processor, training_vocabulary, class_embeddings, synonym_mask):
        try:
            _, categories = load_evaluation_split(args)
            if Vocabulary.from_categories(categories).names != training_vocabulary.names:
                class_embeddings, synonym_mask = vocabulary_embeddings(model, processor, categories)
            return cls(categories, class_embeddings, synonym_mask)
        except Exception as error:
            logger.exception("Evaluation cannot be prepared; training continues, every evaluation will fail")
            return cls(error=error)


class ProcessAgreement:
    """
    `PanopticEvaluator.process`'s `any_process`: the maximum of a status code over all processes (through
    `accelerator.gather`). Remembers whether the processes reached a final decision (all done, or someone failed),
    after which no process may call it again.
    """

    def __init__(self, accelerator):
        self.accelerator, self.decided = accelerator, False

    def __call__(self, status: int) -> int:
        statuses = self.accelerator.gather(torch.tensor([status], device=self.accelerator.device))
        decision = int(statuses.max())
        self.decided = decision in (ALL_DONE, FAILED)
        return decision


def run_evaluation(args, accelerator, model, processor, vocabulary: EvaluationVocabulary) -> dict | None:
    """
    PQ / SQ / RQ (All, Things, Stuff, Seen, Unseen), mask AP and mIoU on the first `--max_eval_samples` rows of the
    evaluation split, the rows spread over all processes (row i on process i % world size) and the statistics summed.
    Every process runs the prepared (possibly sharded) `model` the same number of times: a process out of rows runs
    padding batches until all are done (`PanopticEvaluator.process`).

    Never costs training progress: bad rows are skipped and counted (as in training), and any failure on any process
    (too many bad rows, a missing split, ...) is logged and gives `None` on every process; training goes on.
    """
    state = None
    agreement = ProcessAgreement(accelerator)
    try:
        if vocabulary.error is not None:
            raise RuntimeError(f"the evaluation could not be prepared: {vocabulary.error}") from vocabulary.error
        eval_set, _ = load_evaluation_split(args)
        rank, world_size = accelerator.process_index, accelerator.num_processes
        rows = (row for index, row in zip(range(args.max_eval_samples), eval_set) if index % world_size == rank)
        evaluator = PanopticEvaluator(
            model,
            processor.image_processor,
            vocabulary.categories,
            class_embeddings=vocabulary.class_embeddings,
            synonym_mask=vocabulary.synonym_mask,
            max_bad_fraction=args.max_bad_fraction,
            batch_size=args.per_device_eval_batch_size,
        )
        evaluator.process(rows, any_process=agreement)
        state = evaluator.state()
    except Exception:
        logger.exception("Evaluation failed on process %d; training continues", accelerator.process_index)
        if not agreement.decided:  # the others wait for this process's word before their next forward pass
            agreement(FAILED)
    states = gather_object([state])  # every process gets here, failed or not: no process waits forever
    if any(item is None for item in states):
        logger.error(
            "Evaluation at this step is skipped: it failed on %d process(es).", sum(item is None for item in states)
        )
        return None
    try:  # identical inputs on every process, so every process takes the same branch
        results = PanopticEvaluator.summarize(PanopticEvaluator.merge_states(states))
        if results["images"] == 0:
            raise RuntimeError(
                f"no evaluation row could be scored ({results['bad_samples']} bad: {results['bad_sample_ids'][:5]})"
            )
        scores = {
            f"eval/{split.lower()}_{key}": results[split][key]
            for split in ("All", "Things", "Stuff", "Seen", "Unseen")
            for key in ("pq", "sq", "rq")
        }
        return scores | {
            "eval/miou": results["mIoU"],
            "eval/mask_ap": results["mask_AP"]["AP"],
            "eval/images": float(results["images"]),
            "eval/bad_samples": float(results["bad_samples"]),
        }
    except Exception:
        logger.exception("Evaluation failed while summarizing; training continues")
        return None


if __name__ == "__main__":
    main()
