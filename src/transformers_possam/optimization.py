"""The training recipe: optimizer parameter groups and learning-rate schedules (paper Appendix A, FC-CLIP's solver).

PosSAM (Appendix A): "trained PosSAM for 250K iterations ... effective batch size of 16 ... AdamW optimizer with a
learning rate of 1e-4 and a weight decay of 0.05. The learning rate was scheduled to reduce by a factor of 10 at the
150,000th and 200,000th iterations." Everything the paper leaves out follows FC-CLIP's solver (`train_net.py::
build_optimizer`, `configs/coco/panoptic-segmentation/Base-COCO-PanopticSegmentation.yaml`): no weight decay on
normalization layers and embeddings (`WEIGHT_DECAY_NORM = 0`, `WEIGHT_DECAY_EMBED = 0`), backbone LR x 0.1, full-model
gradient clipping at 0.01.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


__all__ = [
    "SCHEDULES",
    "NORM_MODULE_TYPES",
    "Schedule",
    "group_of",
    "make_optimizer",
    "parameter_groups",
    "step_decay",
]

# detectron2's / FC-CLIP's `norm_module_types` (timm's LayerNorm2d is an nn.LayerNorm subclass)
NORM_MODULE_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


@dataclass(frozen=True)
class Schedule:
    """A multi-step schedule: `max_steps` optimizer steps, LR x 0.1 at each of `lr_drop_steps`."""

    max_steps: int
    lr_drop_steps: tuple[int, ...]

    @property
    def lr_drop_fractions(self) -> tuple[float, ...]:
        return tuple(step / self.max_steps for step in self.lr_drop_steps)


SCHEDULES = {
    # paper Appendix A: 250K iterations, drops at 150K and 200K (batch 16)
    "possam": Schedule(250_000, (150_000, 200_000)),
    # FC-CLIP / Mask2Former COCO panoptic, 50 epochs at batch 16 (MAX_ITER 368750, STEPS (327778, 355092))
    "fcclip": Schedule(368_750, (327_778, 355_092)),
}


def step_decay(max_steps: int, drop_fractions: Sequence[float], gamma: float = 0.1) -> Callable[[int], float]:
    """LR multiplier for `LambdaLR`: gamma ** (number of milestones reached), milestones at `fraction * max_steps`."""
    milestones = sorted(int(round(fraction * max_steps)) for fraction in drop_fractions)
    return lambda step: gamma ** sum(step >= milestone for milestone in milestones)


def _is_backbone(name: str, backbone_prefixes: Sequence[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in backbone_prefixes)


def parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
    backbone_prefixes: Sequence[str] = ("model.vision_encoder",),
    backbone_multiplier: float = 0.1,
) -> list[dict]:
    """
    AdamW parameter groups of the trainable parameters, by FC-CLIP's rules (`build_optimizer`, decided per module):

    - parameters of normalization modules (`NORM_MODULE_TYPES`) get `weight_decay_norm` (0);
    - `nn.Embedding` weights (queries, query positions, the transformer decoder's level embeddings, the classifier's
      void embedding, LDP's stream embeddings) get `weight_decay_embed` (0);
    - relative / absolute position tables (SAM's `rel_pos_h`/`rel_pos_w`/`pos_embed`, Mask2Former's rule for Swin's
      tables) get no decay either;
    - everything else, plain `nn.Parameter`s included (the pixel decoder's level embedding, the classifier's
      temperature `classifier.logit_scale`: FC-CLIP decays its own), gets `weight_decay`;
    - parameters under `backbone_prefixes` (the SAM encoder, trainable only with `--train_encoders`) get
      `learning_rate * backbone_multiplier` (FC-CLIP's `BACKBONE_MULTIPLIER`).

    Frozen parameters are left out. Groups with equal settings are merged; each group lists its parameter names
    under `"names"` (ignored by torch optimizers) so the recipe can be checked by name.
    """
    groups: dict[tuple[float, float], dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            name = f"{module_name}.{param_name}" if module_name else param_name
            decay = weight_decay
            if param_name in ("rel_pos_h", "rel_pos_w", "pos_embed") or "relative_position_bias_table" in param_name:
                decay = 0.0
            if isinstance(module, NORM_MODULE_TYPES):
                decay = weight_decay_norm
            if isinstance(module, nn.Embedding):
                decay = weight_decay_embed
            lr = learning_rate * backbone_multiplier if _is_backbone(name, backbone_prefixes) else learning_rate
            group = groups.setdefault((lr, decay), {"params": [], "names": [], "lr": lr, "weight_decay": decay})
            group["params"].append(parameter)
            group["names"].append(name)
    return list(groups.values())


def group_of(groups: list[dict], name: str) -> dict:
    """The group holding parameter `name` (for checks and logs)."""
    for group in groups:
        if name in group["names"]:
            return group
    raise KeyError(f"No trainable parameter named {name!r} in the optimizer groups.")


def make_optimizer(groups: list[dict], learning_rate: float) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`' groups (their `names` entries stay as metadata)."""
    return torch.optim.AdamW(groups, lr=learning_rate)
