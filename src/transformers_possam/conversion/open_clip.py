"""open_clip ConvNeXt CLIP (e.g. `convnext_large_d_320`) -> PosSAM's frozen CLIP (`PosSAMCLIP`: timm ConvNeXt with
CLIP head + transformers `CLIPTextModelWithProjection`), with the architecture read from `open_clip_config.json`."""

from __future__ import annotations

import re

import torch

from ..configuration_possam import CONVNEXT_LARGE_D_320_TEXT


__all__ = ["convert_open_clip", "open_clip_to_possam_kwargs"]


def open_clip_to_possam_kwargs(open_clip_config: dict) -> dict:
    """
    `PosSAMConfig` fields for an open_clip model config (the `model_cfg` of `open_clip_config.json`): timm tower name,
    MLP head width (open_clip's `timm_proj="mlp"` is `Mlp(C, 2 * embed_dim, embed_dim)`), joint size, text tower.
    """
    model_cfg = open_clip_config.get("model_cfg", open_clip_config)
    vision, text, embed_dim = model_cfg["vision_cfg"], model_cfg["text_cfg"], model_cfg["embed_dim"]
    if "timm_model_name" not in vision or vision.get("timm_proj") != "mlp" or vision.get("timm_pool", "") != "":
        raise ValueError(
            "Only open_clip timm ConvNeXt towers with an MLP projection and the trunk's own pooling (timm_pool '', "
            f"timm_proj 'mlp', as convnext_large_d_320) are supported; got vision_cfg={vision}."
        )
    name = vision["timm_model_name"]
    timm_name = {"convnext_large": "convnext_large_mlp"}.get(name, name)
    width = text.get("width", 512)
    return {
        "clip_vision_model_name": timm_name,
        "clip_vision_model_kwargs": {"head_hidden_size": 2 * embed_dim},
        "clip_embed_dim": embed_dim,
        "text_config": {
            **CONVNEXT_LARGE_D_320_TEXT,
            "vocab_size": text.get("vocab_size", 49408),
            "hidden_size": width,
            "intermediate_size": int(width * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text.get("layers", 12),
            "num_attention_heads": text.get("heads", 8),
            "max_position_embeddings": text.get("context_length", 77),
            "projection_dim": embed_dim,
            "hidden_act": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        },
    }


def convert_open_clip(state_dict: dict) -> dict:
    """open_clip state dict -> `PosSAMCLIP` state dict (keys relative to `clip.`); strict: unknown keys raise."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("visual.trunk."):
            converted[f"vision_model.{key[len('visual.trunk.') :]}"] = value
        elif key.startswith("visual.head.mlp.fc1."):
            converted[f"vision_model.head.pre_logits.fc.{key.rsplit('.', 1)[1]}"] = value
        elif key == "visual.head.mlp.fc2.weight":
            converted["vision_model.head.fc.weight"] = value
            converted["vision_model.head.fc.bias"] = torch.zeros(
                value.shape[0], dtype=value.dtype
            )  # open_clip: no bias
        elif key == "token_embedding.weight":
            converted["text_model.text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            converted["text_model.text_model.embeddings.position_embedding.weight"] = value
        elif key == "text_projection":
            converted["text_model.text_projection.weight"] = value.T.contiguous()  # open_clip applies x @ P
        elif key == "logit_scale":
            converted["logit_scale"] = value.reshape(())
        elif key.startswith("ln_final."):
            converted[f"text_model.text_model.final_layer_norm.{key.rsplit('.', 1)[1]}"] = value
        elif match := re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", key):
            layer, rest = match.groups()
            prefix = f"text_model.text_model.encoder.layers.{layer}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight / bias
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    converted[f"{prefix}self_attn.{name}.{kind}"] = chunk.contiguous()
            else:
                mapped = {
                    "attn.out_proj.": "self_attn.out_proj.",
                    "ln_1.": "layer_norm1.",
                    "ln_2.": "layer_norm2.",
                    "mlp.c_fc.": "mlp.fc1.",
                    "mlp.c_proj.": "mlp.fc2.",
                }
                for old, new in mapped.items():
                    if rest.startswith(old):
                        converted[prefix + new + rest[len(old) :]] = value
                        break
                else:
                    raise ValueError(
                        f"Unexpected open_clip text key {key}: not a ConvNeXt-CLIP checkpoint this converter knows."
                    )
        elif key == "attn_mask":
            continue  # open_clip's causal-mask buffer; CLIPTextModel builds its own
        else:
            raise ValueError(f"Unexpected open_clip key {key}: not a ConvNeXt-CLIP checkpoint this converter knows.")
    return converted
