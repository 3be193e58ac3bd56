"""FC-CLIP / Mask2Former detectron2 checkpoint -> PosSAM's pixel decoder and transformer decoder (warm start).

Mapped (detectron2 -> transformers Mask2Former, as transformers' convert_mask2former script):
  sem_seg_head.pixel_decoder.* -> model.pixel_decoder.* (adapter_1 / layer_1 convs and norms, input_proj,
      transformer.level_embed, deformable encoder layers, mask_features -> mask_projection);
  sem_seg_head.predictor.* -> model.transformer_module.* (self/cross-attention, FFN and norm layers, decoder_norm,
      mask_embed, query_embed, query_feat, level_embed).
  backbone.clip_model.* (if the checkpoint stores the CLIP) -> clip.* through the open_clip converter.
Left new (no counterpart in FC-CLIP): the FPN (FC-CLIP's pixel decoder read ConvNeXt-L features; PosSAM's FPN emits
the same widths, 192/384/768/1536, so the decoder weights fit), the IoU head, the LDP and the classifier
(`classifier.void_embedding`, `classifier.logit_scale`: they score G_ldp, which FC-CLIP does not have). Dropped:
FC-CLIP's in-vocabulary class head (predictor.class_embed, predictor._mask_pooling_proj, predictor.logit_scale,
void_embedding — replaced by LDP and PosSAM's classifier), criterion.empty_weight, pixel_mean/std.

An original PosSAM checkpoint, should one be released, is assumed to follow the same detectron2 layout with
`backbone` = SAM ViT (image_encoder keys), an FPN under `sem_seg_head.fpn` and the LDP/IoU head under
`sem_seg_head.predictor`; those extra modules would need their own key map once their names are known.
"""

from __future__ import annotations

import re

from .io import load_weights_file


__all__ = ["convert_fcclip_decoder", "FCCLIP_DROPPED_PREFIXES"]

FCCLIP_DROPPED_PREFIXES = (
    "sem_seg_head.predictor.class_embed.",
    "sem_seg_head.predictor._mask_pooling_proj.",
    "sem_seg_head.predictor.logit_scale",
    "void_embedding.",
    "criterion.",
    "pixel_mean",
    "pixel_std",
)

_PIXEL_DECODER = [
    (r"^adapter_1\.weight$", "adapter_1.0.weight"),
    (r"^adapter_1\.norm\.", "adapter_1.1."),
    (r"^layer_1\.weight$", "layer_1.0.weight"),
    (r"^layer_1\.norm\.", "layer_1.1."),
    (r"^input_proj\.", "input_projections."),
    (r"^transformer\.level_embed$", "level_embed"),
    (r"^transformer\.encoder\.layers\.(\d+)\.linear1\.", r"encoder.layers.\1.fc1."),
    (r"^transformer\.encoder\.layers\.(\d+)\.linear2\.", r"encoder.layers.\1.fc2."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm1\.", r"encoder.layers.\1.self_attn_layer_norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm2\.", r"encoder.layers.\1.final_layer_norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.self_attn\.", r"encoder.layers.\1.self_attn."),
    (r"^mask_features\.", "mask_projection."),
]
_PREDICTOR = [
    (r"^transformer_self_attention_layers\.(\d+)\.self_attn\.out_proj\.", r"decoder.layers.\1.self_attn.out_proj."),
    (r"^transformer_self_attention_layers\.(\d+)\.norm\.", r"decoder.layers.\1.self_attn_layer_norm."),
    (r"^transformer_cross_attention_layers\.(\d+)\.multihead_attn\.", r"decoder.layers.\1.cross_attn."),
    (r"^transformer_cross_attention_layers\.(\d+)\.norm\.", r"decoder.layers.\1.cross_attn_layer_norm."),
    (r"^transformer_ffn_layers\.(\d+)\.linear1\.", r"decoder.layers.\1.fc1."),
    (r"^transformer_ffn_layers\.(\d+)\.linear2\.", r"decoder.layers.\1.fc2."),
    (r"^transformer_ffn_layers\.(\d+)\.norm\.", r"decoder.layers.\1.final_layer_norm."),
    (r"^decoder_norm\.", "decoder.layernorm."),
    (r"^mask_embed\.layers\.(\d+)\.", r"decoder.mask_predictor.mask_embedder.\1.0."),
    (r"^query_embed\.", "queries_embedder."),
    (r"^query_feat\.", "queries_features."),
    (r"^level_embed\.", "level_embed."),
]


def _apply(rules, key: str) -> str | None:
    for pattern, replacement in rules:
        new_key, count = re.subn(pattern, replacement, key)
        if count:
            return new_key
    return None


def convert_fcclip_decoder(state_dict: dict) -> tuple[dict, dict, list[str]]:
    """
    Returns (decoder state dict with keys relative to `PosSAMModel` — `pixel_decoder.*`, `transformer_module.*` —,
    open_clip state dict of the stored CLIP or {}, dropped keys). Any other key raises ValueError.
    """
    decoder, clip, dropped = {}, {}, []
    for key, value in state_dict.items():
        if key.startswith(FCCLIP_DROPPED_PREFIXES):
            dropped.append(key)
        elif key.startswith("backbone.clip_model."):
            clip[key[len("backbone.clip_model.") :]] = value
        elif key.startswith("sem_seg_head.pixel_decoder."):
            new_key = _apply(_PIXEL_DECODER, key[len("sem_seg_head.pixel_decoder.") :])
            if new_key is None:
                raise ValueError(
                    f"Unexpected FC-CLIP pixel-decoder key {key}: not an FC-CLIP / Mask2Former detectron2 checkpoint."
                )
            decoder[f"pixel_decoder.{new_key}"] = value
        elif key.startswith("sem_seg_head.predictor."):
            rest = key[len("sem_seg_head.predictor.") :]
            match = re.match(r"transformer_self_attention_layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$", rest)
            if match:
                layer, kind = match.groups()
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    decoder[f"transformer_module.decoder.layers.{layer}.self_attn.{name}.{kind}"] = chunk.contiguous()
                continue
            new_key = _apply(_PREDICTOR, rest)
            if new_key is None:
                raise ValueError(
                    f"Unexpected FC-CLIP predictor key {key}: not an FC-CLIP / Mask2Former detectron2 checkpoint."
                )
            decoder[f"transformer_module.{new_key}"] = value
        else:
            raise ValueError(f"Unexpected FC-CLIP key {key}: not an FC-CLIP / Mask2Former detectron2 checkpoint.")
    return decoder, clip, dropped


def load_fcclip_checkpoint(path) -> dict:
    """An FC-CLIP detectron2 checkpoint (`{"model": ...}` unwrapped), read with `weights_only=True`."""
    return load_weights_file(path, "FC-CLIP checkpoint")
