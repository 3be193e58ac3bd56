import pytest
import torch

from transformers_possam import (
    PosSAMForPanopticSegmentation,
    PosSAMImageProcessor,
    PosSAMProcessor,
    clip_tokenizer_from_bpe,
    tiny_config,
)


# Tests may share the 2 cores with other jobs: one intra-op thread is faster and steadier there.
torch.set_num_threads(1)

IMAGE_SIZE = 128
NUM_CLASSES = 5


def make_vocabulary(
    num_classes: int = NUM_CLASSES, num_synonyms: int = 2, num_templates: int = 3, seq_len: int = 7, seed: int = 0
):
    """Random token ids in the (K, S, T, L) layout, EOT at the end; some classes with a single synonym."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 49000, (num_classes, num_synonyms, num_templates, seq_len), generator=generator)
    input_ids[..., 0] = 49406
    input_ids[..., -1] = 49407
    synonym_mask = torch.ones(num_classes, num_synonyms, dtype=torch.bool)
    synonym_mask[1::2, 1:] = False
    return input_ids, synonym_mask


@pytest.fixture(scope="session")
def config():
    return tiny_config()


@pytest.fixture(scope="session")
def model(config):
    torch.manual_seed(0)
    return PosSAMForPanopticSegmentation(config).eval()


@pytest.fixture()
def pixel_values():
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture()
def vocabulary():
    return make_vocabulary()


def save_tiny_checkpoint(path, seed: int = 0, **image_processor_kwargs):
    """A random tiny model with its processor (sized to the model, plus `image_processor_kwargs`) saved in `path`."""
    torch.manual_seed(seed)
    config = tiny_config()
    size = config.vision_config.image_size
    PosSAMForPanopticSegmentation(config).save_pretrained(path)
    image_processor = PosSAMImageProcessor(
        size={"longest_edge": size}, pad_size={"height": size, "width": size}, **image_processor_kwargs
    )
    PosSAMProcessor(image_processor, clip_tokenizer_from_bpe()).save_pretrained(path)
    return path


def load_training_script(name: str):
    """
    `training/<name>.py` as a module, loaded by path under a private name: putting `training/` on `sys.path` would
    shadow packages (`training/evaluate.py` vs Hugging Face's `evaluate`) for every other test.
    """
    import importlib.util
    import sys
    from pathlib import Path

    module_name = f"possam_training_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            module_name, Path(__file__).resolve().parents[1] / "training" / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]
