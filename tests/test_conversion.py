import numpy as np
import pytest
import torch
from transformers.models.sam.modeling_sam import SamVisionEncoder

from transformers_possam.conversion import convert_sam_image_encoder, load_checkpoint


@pytest.mark.parametrize("global_layers", [(1,), (0, 2)])
def test_original_sam_image_encoder_converts_exactly(tmp_path, global_layers):
    segment_anything = pytest.importorskip("segment_anything.modeling")
    torch.manual_seed(0)
    reference = segment_anything.ImageEncoderViT(
        img_size=128,
        patch_size=16,
        embed_dim=48,
        depth=3,
        num_heads=3,
        out_chans=16,
        use_rel_pos=True,
        window_size=4,
        global_attn_indexes=global_layers,
    ).eval()
    for parameter in reference.parameters():  # non-zero everywhere, rel-pos tables included
        torch.nn.init.normal_(parameter, std=0.05)
    full_sam = {f"image_encoder.{k}": v for k, v in reference.state_dict().items()}
    full_sam["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 16)  # ignored: not the image encoder
    torch.save(full_sam, tmp_path / "sam.pth")

    state_dict, config = convert_sam_image_encoder(load_checkpoint(tmp_path / "sam.pth"))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (48, 3, 3)
    assert (config.image_size, config.patch_size, config.window_size, config.output_channels) == (128, 16, 4, 16)
    assert list(config.global_attn_indexes) == list(global_layers)
    encoder = SamVisionEncoder(config).eval()
    missing, unexpected = encoder.load_state_dict(state_dict, strict=True)
    assert not missing and not unexpected
    pixels = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels).last_hidden_state, reference(pixels), atol=1e-5, rtol=1e-5)


def test_open_clip_convnext_converts_exactly():
    open_clip = pytest.importorskip("open_clip")
    from transformers_possam import PosSAMConfig, PosSAMForPanopticSegmentation, clip_tokenizer_from_bpe, tiny_config
    from transformers_possam.conversion import convert_open_clip, open_clip_to_possam_kwargs

    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "timm_model_name": "convnext_atto",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "mlp",
            "image_size": 64,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    torch.manual_seed(0)
    reference = open_clip.model.CLIP(**model_cfg).eval()
    for name, parameter in reference.named_parameters():
        if parameter.dim() > 0:
            torch.nn.init.normal_(parameter, std=0.05)
    kwargs = open_clip_to_possam_kwargs({"model_cfg": model_cfg})
    config = tiny_config(**kwargs)
    assert isinstance(config, PosSAMConfig)
    model = PosSAMForPanopticSegmentation(config).eval()
    result = model.clip.load_state_dict(convert_open_clip(reference.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    texts = ["a photo of a cat.", "There is a large traffic light in the scene."]
    tokenizer = clip_tokenizer_from_bpe()
    ids = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    clip_pixels = torch.randn(2, 3, 64, 64)
    sam_pixels = (
        clip_pixels * torch.tensor(config.clip_image_std).view(1, 3, 1, 1)
        + torch.tensor(config.clip_image_mean).view(1, 3, 1, 1)
        - torch.tensor(config.sam_image_mean).view(1, 3, 1, 1)
    ) / torch.tensor(config.sam_image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_text_features(ids).pooler_output,
            reference.encode_text(open_clip.get_tokenizer("convnext_large_d_320")(texts)),
            atol=1e-5,
            rtol=1e-5,
        )
        torch.testing.assert_close(
            model.get_image_features(sam_pixels).pooler_output,
            reference.encode_image(clip_pixels),
            atol=1e-5,
            rtol=1e-5,
        )
    assert model.clip.logit_scale.item() == pytest.approx(reference.logit_scale.item())


def test_conversion_script_builds_a_verified_checkpoint_the_pipeline_loads(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    open_clip = pytest.importorskip("open_clip")
    segment_anything = pytest.importorskip("segment_anything.modeling")
    torch.manual_seed(0)
    sam = segment_anything.ImageEncoderViT(
        img_size=128,
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        out_chans=32,
        use_rel_pos=True,
        window_size=4,
        global_attn_indexes=(1,),
    )
    for parameter in sam.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    torch.save({f"image_encoder.{k}": v for k, v in sam.state_dict().items()}, tmp_path / "sam.pth")
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "timm_model_name": "convnext_atto",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "mlp",
            "image_size": 64,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    clip_dir = tmp_path / "open_clip"
    clip_dir.mkdir()
    torch.save(open_clip.model.CLIP(**model_cfg).state_dict(), clip_dir / "open_clip_pytorch_model.bin")
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))

    script = Path(__file__).resolve().parents[1] / "conversion" / "convert_possam_to_hf.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--sam_checkpoint",
            str(tmp_path / "sam.pth"),
            "--clip_checkpoint",
            str(clip_dir),
            "--output_dir",
            str(tmp_path / "possam"),
            "--verify",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "verify sam_image_embeddings" in result.stderr and "verify text_features" in result.stderr
    from PIL import Image
    from transformers import pipeline

    segmenter = pipeline("open-vocabulary-panoptic-segmentation", model=str(tmp_path / "possam"))
    # the pipeline's model holds the converted SAM encoder: same features as segment_anything's
    pixels = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(
            segmenter.model.model.vision_encoder(pixels).last_hidden_state, sam.eval()(pixels), atol=1e-5, rtol=1e-5
        )
    # and segments: semantic segments partition the image among the candidate labels
    results = segmenter(Image.new("RGB", (50, 40)), candidate_labels=["cat", "dog"], subtask="semantic")
    assert results and {segment["label"] for segment in results} <= {"cat", "dog"}
    coverage = sum((np.asarray(segment["mask"]) == 255).astype(int) for segment in results)
    assert coverage.shape == (40, 50) and (coverage == 1).all()


def detectron2_name(hf_key):
    """The detectron2 FC-CLIP name of a PosSAMModel decoder key, transcribed from Mask2Former's module names."""
    import re

    rules = [
        (r"^pixel_decoder\.adapter_1\.0\.weight$", "sem_seg_head.pixel_decoder.adapter_1.weight"),
        (r"^pixel_decoder\.adapter_1\.1\.", "sem_seg_head.pixel_decoder.adapter_1.norm."),
        (r"^pixel_decoder\.layer_1\.0\.weight$", "sem_seg_head.pixel_decoder.layer_1.weight"),
        (r"^pixel_decoder\.layer_1\.1\.", "sem_seg_head.pixel_decoder.layer_1.norm."),
        (r"^pixel_decoder\.input_projections\.", "sem_seg_head.pixel_decoder.input_proj."),
        (r"^pixel_decoder\.level_embed$", "sem_seg_head.pixel_decoder.transformer.level_embed"),
        (
            r"^pixel_decoder\.encoder\.layers\.(\d+)\.fc1\.",
            r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.linear1.",
        ),
        (
            r"^pixel_decoder\.encoder\.layers\.(\d+)\.fc2\.",
            r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.linear2.",
        ),
        (
            r"^pixel_decoder\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.",
            r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.norm1.",
        ),
        (
            r"^pixel_decoder\.encoder\.layers\.(\d+)\.final_layer_norm\.",
            r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.norm2.",
        ),
        (
            r"^pixel_decoder\.encoder\.layers\.(\d+)\.self_attn\.",
            r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.self_attn.",
        ),
        (r"^pixel_decoder\.mask_projection\.", "sem_seg_head.pixel_decoder.mask_features."),
        (
            r"^transformer_module\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.",
            r"sem_seg_head.predictor.transformer_self_attention_layers.\1.self_attn.out_proj.",
        ),
        (
            r"^transformer_module\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.",
            r"sem_seg_head.predictor.transformer_self_attention_layers.\1.norm.",
        ),
        (
            r"^transformer_module\.decoder\.layers\.(\d+)\.cross_attn\.",
            r"sem_seg_head.predictor.transformer_cross_attention_layers.\1.multihead_attn.",
        ),
        (
            r"^transformer_module\.decoder\.layers\.(\d+)\.cross_attn_layer_norm\.",
            r"sem_seg_head.predictor.transformer_cross_attention_layers.\1.norm.",
        ),
        (
            r"^transformer_module\.decoder\.layers\.(\d+)\.fc1\.",
            r"sem_seg_head.predictor.transformer_ffn_layers.\1.linear1.",
        ),
        (
            r"^transformer_module\.decoder\.layers\.(\d+)\.fc2\.",
            r"sem_seg_head.predictor.transformer_ffn_layers.\1.linear2.",
        ),
        (
            r"^transformer_module\.decoder\.layers\.(\d+)\.final_layer_norm\.",
            r"sem_seg_head.predictor.transformer_ffn_layers.\1.norm.",
        ),
        (r"^transformer_module\.decoder\.layernorm\.", "sem_seg_head.predictor.decoder_norm."),
        (
            r"^transformer_module\.decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.",
            r"sem_seg_head.predictor.mask_embed.layers.\1.",
        ),
        (r"^transformer_module\.queries_embedder\.", "sem_seg_head.predictor.query_embed."),
        (r"^transformer_module\.queries_features\.", "sem_seg_head.predictor.query_feat."),
        (r"^transformer_module\.level_embed\.", "sem_seg_head.predictor.level_embed."),
    ]
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, hf_key)
        if count:
            return new
    return None


def test_fcclip_decoder_checkpoint_maps_onto_the_decoder(tmp_path):
    import re

    from transformers_possam import PosSAMModel, tiny_config
    from transformers_possam.conversion import convert_fcclip_decoder, load_fcclip_checkpoint

    torch.manual_seed(0)
    source = PosSAMModel(tiny_config())
    detectron2 = {}
    for key, value in source.state_dict().items():
        match = re.match(r"transformer_module\.decoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", key)
        if match:
            continue
        name = detectron2_name(key)
        if name is not None:
            detectron2[name] = value.clone()
    layers = tiny_config().decoder_layers - 1
    for layer in range(layers):  # detectron2 keeps q, k, v as one in_proj
        for kind in ("weight", "bias"):
            parts = [
                source.state_dict()[f"transformer_module.decoder.layers.{layer}.self_attn.{p}_proj.{kind}"]
                for p in "qkv"
            ]
            detectron2[
                f"sem_seg_head.predictor.transformer_self_attention_layers.{layer}.self_attn.in_proj_{kind}"
            ] = torch.cat(parts)
    detectron2["sem_seg_head.predictor.class_embed.layers.0.weight"] = torch.zeros(1)  # FC-CLIP's class head: dropped
    detectron2["void_embedding.weight"] = torch.zeros(1, 32)
    detectron2["criterion.empty_weight"] = torch.ones(134)
    torch.save({"model": detectron2}, tmp_path / "fcclip_cocopan.pth")

    decoder, clip, dropped = convert_fcclip_decoder(load_fcclip_checkpoint(tmp_path / "fcclip_cocopan.pth"))
    assert clip == {} and sorted(dropped) == [
        "criterion.empty_weight",
        "sem_seg_head.predictor.class_embed.layers.0.weight",
        "void_embedding.weight",
    ]
    target = PosSAMModel(tiny_config())
    expected = {k for k in target.state_dict() if k.startswith(("pixel_decoder.", "transformer_module."))}
    assert set(decoder) == expected  # every decoder weight is covered, nothing else
    target.load_state_dict(decoder, strict=False)
    for key in expected:
        assert torch.equal(target.state_dict()[key], source.state_dict()[key]), key
    with pytest.raises(ValueError, match="Unexpected FC-CLIP"):
        convert_fcclip_decoder({"sem_seg_head.predictor.something_new": torch.zeros(1)})


def test_hf_sam_folder_is_accepted(tmp_path):
    from transformers import SamConfig, SamModel

    from .conftest import load_script

    load_sam = load_script("conversion/convert_possam_to_hf.py").load_sam

    torch.manual_seed(0)
    vision = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 128,
        "output_channels": 32,
        "window_size": 4,
        "global_attn_indexes": [1],
        "mlp_dim": 64,
    }
    sam = SamModel(SamConfig(vision_config=vision))
    sam.save_pretrained(tmp_path / "sam")
    state_dict, config, original = load_sam(str(tmp_path / "sam"))
    assert original is None and config.hidden_size == 32 and list(config.global_attn_indexes) == [1]
    assert all(torch.equal(state_dict[k], v) for k, v in sam.vision_encoder.state_dict().items())
