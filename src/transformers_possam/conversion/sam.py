"""segment-anything `ImageEncoderViT` weights -> transformers `SamVisionEncoder` (architecture read from the tensors)."""

from __future__ import annotations

import re

from transformers import SamVisionConfig

from .io import load_weights_file


__all__ = ["convert_sam_image_encoder", "infer_sam_vision_config", "SAM_KEY_MAP"]

# original -> HF (transformers' convert_sam_to_hf.py); everything else keeps its name
SAM_KEY_MAP = [
    (r"^patch_embed\.proj\.", "patch_embed.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.", r"layers.\1."),
    (r"^neck\.0\.", "neck.conv1."),
    (r"^neck\.1\.", "neck.layer_norm1."),
    (r"^neck\.2\.", "neck.conv2."),
    (r"^neck\.3\.", "neck.layer_norm2."),
]


def _image_encoder_only(state_dict: dict) -> dict:
    """A full SAM checkpoint (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`) -> the image encoder's keys."""
    if any(key.startswith("image_encoder.") for key in state_dict):
        return {
            key[len("image_encoder.") :]: value
            for key, value in state_dict.items()
            if key.startswith("image_encoder.")
        }
    return dict(state_dict)


def infer_sam_vision_config(state_dict: dict) -> SamVisionConfig:
    """
    Read the ViT's architecture off the original tensors: width and patch size from the patch embedding, depth from
    the block count, image size from the absolute position embedding, head size from the relative-position tables
    (2 * window - 1 rows for windowed blocks, 2 * grid - 1 for global ones), MLP width, neck channels.
    """
    state_dict = _image_encoder_only(state_dict)
    required = ("patch_embed.proj.weight", "pos_embed", "neck.0.weight", "blocks.0.mlp.lin1.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(
            f"Not a segment-anything image-encoder checkpoint: it lacks {missing} (its keys start with "
            f"{sorted(state_dict)[:5]}). Pass the original SAM .pth (sam_vit_b_01ec64.pth, ...) or an HF SAM folder."
        )
    patch = state_dict["patch_embed.proj.weight"]
    hidden_size, patch_size = patch.shape[0], patch.shape[-1]
    depth = 1 + max(int(m.group(1)) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.", key)))
    grid = state_dict["pos_embed"].shape[1] if "pos_embed" in state_dict else None
    use_rel_pos = "blocks.0.attn.rel_pos_h" in state_dict
    if grid is None:  # (kept for clarity: pos_embed is required above)
        raise ValueError(
            "The checkpoint has no pos_embed: cannot tell SAM's image size (use_abs_pos=False is not supported)."
        )
    global_layers, window_size, head_dim = [], 0, None
    if use_rel_pos:
        for index in range(depth):
            extent = (state_dict[f"blocks.{index}.attn.rel_pos_h"].shape[0] + 1) // 2
            head_dim = state_dict[f"blocks.{index}.attn.rel_pos_h"].shape[1]
            if extent == grid:
                global_layers.append(index)
            else:
                window_size = extent
    if head_dim is None:
        raise ValueError("Without relative-position tables the number of heads cannot be inferred from the weights.")
    return SamVisionConfig(
        hidden_size=hidden_size,
        num_hidden_layers=depth,
        num_attention_heads=hidden_size // head_dim,
        patch_size=patch_size,
        image_size=grid * patch_size,
        output_channels=state_dict["neck.0.weight"].shape[0],
        mlp_dim=state_dict["blocks.0.mlp.lin1.weight"].shape[0],
        window_size=window_size,
        global_attn_indexes=global_layers,
        use_rel_pos=use_rel_pos,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
    )


def convert_sam_image_encoder(state_dict: dict) -> tuple[dict, SamVisionConfig]:
    """Original (segment-anything) image-encoder or full-SAM state dict -> (`SamVisionEncoder` state dict, config)."""
    config = infer_sam_vision_config(state_dict)
    converted = {}
    for key, value in _image_encoder_only(state_dict).items():
        new_key = key
        for pattern, replacement in SAM_KEY_MAP:
            new_key, count = re.subn(pattern, replacement, new_key)
            if count:
                break
        converted[new_key] = value
    return converted, config


def load_checkpoint(path) -> dict:
    """A segment-anything / open_clip `.pth` / `.bin` (weights only) or safetensors file -> state dict."""
    return load_weights_file(path)
