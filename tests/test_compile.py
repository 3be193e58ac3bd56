"""
`torch.compile(model, fullgraph=True)` captures the whole forward of `PosSAMForPanopticSegmentation` (issue 15,
item 4): no graph break (a break is an error with fullgraph=True), outputs equal to the eager model's. The default test
compiles with AOTAutograd's eager backend (the whole capture and functionalization, without code generation, seconds);
the inductor run (code generation, about 80 s on 2 cores) is `slow`.
"""

import pytest
import torch

from transformers_possam import PosSAMForPanopticSegmentation, tiny_config
from transformers_possam.export import EXPORTED_OUTPUTS


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PosSAMForPanopticSegmentation(tiny_config()).eval()


def inputs(model, batch_size=1, num_classes=5, num_synonyms=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    synonym_mask = torch.rand(num_classes, num_synonyms, generator=generator) > 0.4
    synonym_mask[:, 0] = True
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "class_embeddings": torch.randn(num_classes, num_synonyms, model.config.clip_embed_dim, generator=generator),
        "synonym_mask": synonym_mask,
    }


def check_compiled(model, backend):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for arguments in (inputs(model),):  # one shape: each new shape recompiles (tens of seconds on 2 cores)
        with torch.no_grad():
            found = compiled(**arguments)
            expected = model(**arguments)
        for name in EXPORTED_OUTPUTS:
            torch.testing.assert_close(found[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_whole_forward_is_one_graph(model):
    check_compiled(model, "aot_eager")


@pytest.mark.slow
def test_inductor_compiles_the_whole_forward(model):
    check_compiled(model, "inductor")
