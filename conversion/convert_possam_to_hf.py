#!/usr/bin/env python
"""Assemble a PosSAM checkpoint (config, safetensors weights, processor with tokenizer) from public weights.

    python conversion/convert_possam_to_hf.py --sam_checkpoint sam_vit_b_01ec64.pth \\
        --clip_checkpoint laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup --output_dir possam-vit-b --verify
    python conversion/convert_possam_to_hf.py --sam_checkpoint facebook/sam-vit-huge --clip_checkpoint path/to/open_clip_folder ...

- `--sam_checkpoint`: an original segment-anything `.pth` (full SAM or image encoder; the ViT's size is read from the
  tensors) or an HF SAM folder / Hub id (`facebook/sam-vit-{base,large,huge}`).
- `--clip_checkpoint`: an open_clip folder / Hub id with `open_clip_config.json` and `open_clip_pytorch_model.bin` or
  `open_clip_model.safetensors`; the architecture comes from the config (any timm ConvNeXt CLIP with an MLP head).
- The tokenizer is built from open_clip's BPE file (no Hub access needed).
- New modules (FPN, pixel decoder, transformer decoder, IoU head, LDP, the classifier's void embedding and
  temperature) keep their fresh initialization; the SAM encoder and the CLIP load strictly (any missing or unexpected key is an error).
- `--verify` runs the reference implementations (segment-anything / open_clip) on random inputs and fails above
  1e-5 max abs difference (fp32).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from transformers_possam import (
    PosSAMConfig,
    PosSAMForPanopticSegmentation,
    PosSAMImageProcessor,
    PosSAMProcessor,
    clip_tokenizer_from_bpe,
)
from transformers_possam.conversion import (
    convert_fcclip_decoder,
    convert_open_clip,
    convert_sam_image_encoder,
    load_checkpoint,
    load_fcclip_checkpoint,
    open_clip_to_possam_kwargs,
)


TOLERANCE = 1e-5


def load_sam(spec: str):
    """-> (SamVisionEncoder state dict, SamVisionConfig, original state dict or None)."""
    path = Path(spec)
    if path.is_file():
        original = load_checkpoint(path)
        try:
            state_dict, config = convert_sam_image_encoder(original)
        except ValueError as error:
            raise ValueError(f"--sam_checkpoint {path}: {error}") from None
        return state_dict, config, original
    from transformers import SamModel

    sam = SamModel.from_pretrained(spec)
    return sam.vision_encoder.state_dict(), sam.config.vision_config, None


def load_open_clip(spec: str):
    """-> (open_clip config dict, open_clip state dict)."""
    path = Path(spec)
    if path.is_dir():
        files = {p.name: p for p in path.iterdir()}
    else:
        from huggingface_hub import hf_hub_download, list_repo_files

        names = list_repo_files(spec)
        files = {name: Path(hf_hub_download(spec, name)) for name in names if name.startswith("open_clip_")}
    if "open_clip_config.json" not in files:
        raise FileNotFoundError(
            f"{spec}: no open_clip_config.json (an open_clip checkpoint folder or Hub repo is expected)."
        )
    try:
        config = json.loads(files["open_clip_config.json"].read_text())
    except ValueError as error:
        raise ValueError(f"{files['open_clip_config.json']} is not valid JSON ({error}).") from None
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if name in files:
            return config, load_checkpoint(files[name])
    raise FileNotFoundError(f"{spec}: no open_clip_model.safetensors or open_clip_pytorch_model.bin.")


def verify(model, sam_original, clip_config, clip_state_dict) -> dict:
    """Max abs differences against segment-anything and open_clip; raises above TOLERANCE."""
    differences = {}
    vision = model.config.vision_config
    size = vision.image_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, size, size, generator=generator)
    if sam_original is not None:
        from segment_anything.modeling import ImageEncoderViT

        reference = ImageEncoderViT(
            img_size=size,
            patch_size=vision.patch_size,
            embed_dim=vision.hidden_size,
            depth=vision.num_hidden_layers,
            num_heads=vision.num_attention_heads,
            mlp_ratio=vision.mlp_dim / vision.hidden_size,
            out_chans=vision.output_channels,
            qkv_bias=vision.qkv_bias,
            use_rel_pos=vision.use_rel_pos,
            window_size=vision.window_size,
            global_attn_indexes=tuple(vision.global_attn_indexes),
        ).eval()
        encoder_keys = {
            k[len("image_encoder.") :]: v for k, v in sam_original.items() if k.startswith("image_encoder.")
        } or sam_original
        reference.load_state_dict(encoder_keys, strict=True)
        with torch.no_grad():
            differences["sam_image_embeddings"] = (
                (model.get_image_embeddings(pixels) - reference(pixels)).abs().max().item()
            )
    import open_clip

    reference_clip = open_clip.model.CLIP(**clip_config.get("model_cfg", clip_config)).eval()
    reference_clip.load_state_dict(clip_state_dict, strict=True)
    texts = ["a photo of a cat.", "There is a large red car in the scene."]
    ids = clip_tokenizer_from_bpe()(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    config = model.config

    def channel(values):
        return torch.tensor(values).view(1, 3, 1, 1)

    clip_pixels = torch.randn(1, 3, 224, 224, generator=generator)
    sam_pixels = (
        clip_pixels * channel(config.clip_image_std) + channel(config.clip_image_mean) - channel(config.sam_image_mean)
    ) / channel(config.sam_image_std)
    with torch.no_grad():
        differences["text_features"] = (
            (model.get_text_features(ids).pooler_output - reference_clip.encode_text(open_clip.tokenize(texts)))
            .abs()
            .max()
            .item()
        )
        differences["image_features"] = (
            (model.get_image_features(sam_pixels).pooler_output - reference_clip.encode_image(clip_pixels))
            .abs()
            .max()
            .item()
        )
    failed = {k: v for k, v in differences.items() if not v <= TOLERANCE}
    if failed:
        raise SystemExit(f"Verification failed (max abs difference > {TOLERANCE}): {failed}")
    return differences


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sam_checkpoint", required=True)
    parser.add_argument("--clip_checkpoint", required=True)
    parser.add_argument(
        "--decoder_checkpoint",
        default=None,
        help="optional FC-CLIP / Mask2Former detectron2 .pth to warm-start the pixel and transformer decoders",
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--push_to_hub", default=None, help="a Hub repo id to upload the result to")
    args = parser.parse_args(argv)

    sam_state_dict, sam_config, sam_original = load_sam(args.sam_checkpoint)
    clip_config, clip_state_dict = load_open_clip(args.clip_checkpoint)
    config = PosSAMConfig(
        vision_config=sam_config.to_dict(),
        architectures=["PosSAMForPanopticSegmentation"],
        **open_clip_to_possam_kwargs(clip_config),
    )
    model = PosSAMForPanopticSegmentation(config).eval()
    model.model.vision_encoder.load_state_dict(sam_state_dict, strict=True)
    model.clip.load_state_dict(convert_open_clip(clip_state_dict), strict=True)
    if args.decoder_checkpoint:
        decoder, _, dropped = convert_fcclip_decoder(load_fcclip_checkpoint(args.decoder_checkpoint))
        expected = {k for k in model.model.state_dict() if k.startswith(("pixel_decoder.", "transformer_module."))}
        if set(decoder) != expected:
            raise SystemExit(
                f"Decoder checkpoint does not fit: missing {sorted(expected - set(decoder))[:5]}, "
                f"unexpected {sorted(set(decoder) - expected)[:5]}"
            )
        model.model.load_state_dict(decoder, strict=False)  # strict over the decoder: checked just above
        print(
            f"decoder warm-started from {args.decoder_checkpoint}; dropped {len(dropped)} FC-CLIP keys "
            "(class head, void, criterion); FPN, IoU head, LDP and classifier stay new",
            file=sys.stderr,
        )

    differences = verify(model, sam_original, clip_config, clip_state_dict) if args.verify else {}
    size = sam_config.image_size
    image_processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    processor = PosSAMProcessor(image_processor, clip_tokenizer_from_bpe())
    # the default vocabulary (config.training_vocabulary, = id2label): transformers' image-segmentation pipeline and the
    # Hub widget segment with it; the checkpoint also carries its code for trust_remote_code (PosSAMConfig.save_pretrained)
    model.set_default_vocabulary(processor)
    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
        processor.push_to_hub(args.push_to_hub)
    for name, value in differences.items():
        print(f"verify {name}: max abs difference {value:.2e}", file=sys.stderr)
    print(f"wrote {output_dir}")
    return output_dir


if __name__ == "__main__":
    main()
