import pytest
import torch
from transformers.models.sam.modeling_sam import SamVisionEncoder

from transformers_possam.conversion import convert_sam_image_encoder, load_checkpoint


@pytest.mark.parametrize("global_layers", [(1,), (0, 2)])
def test_original_sam_image_encoder_converts_exactly(tmp_path, global_layers):
    segment_anything = pytest.importorskip("segment_anything.modeling")
    torch.manual_seed(0)
    reference = segment_anything.ImageEncoderViT(
        img_size=128, patch_size=16, embed_dim=48, depth=3, num_heads=3, out_chans=16, use_rel_pos=True,
        window_size=4, global_attn_indexes=global_layers,
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
