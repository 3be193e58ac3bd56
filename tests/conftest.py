import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from transformers_possam import (
    PosSAMForPanopticSegmentation,
    PosSAMImageProcessor,
    PosSAMProcessor,
    clip_tokenizer_from_bpe,
    tiny_config,
)


# pytester: tests/test_slow_marker.py runs pytest on small generated test files
pytest_plugins = ["pytester"]

# Tests may share the 2 cores with other jobs: one intra-op thread is faster and steadier there.
torch.set_num_threads(1)

REPOSITORY = Path(__file__).resolve().parents[1]
# whether this session runs the `@pytest.mark.slow` tests, decided once in `pytest_configure`
RUN_SLOW_KEY = pytest.StashKey[bool]()


def run_slow_tests() -> bool:
    """
    Whether `RUN_SLOW` asks for the slow tests, read as transformers' `@slow` reads it
    (`testing_utils.parse_flag_from_env`): unset is no; `1` / `yes` / `true` / `on` / `y` / `t` (any case) yes;
    `0` / `no` / `false` / `off` / `n` / `f` no; anything else a usage error rather than a guess.
    """
    if "RUN_SLOW" not in os.environ:
        return False  # without importing transformers' testing_utils (seconds), which reads the same default
    try:
        # transformers' testing_utils parses RUN_SLOW as it is imported, so a bad value fails the import too
        from transformers.testing_utils import parse_flag_from_env

        return bool(parse_flag_from_env("RUN_SLOW", default=False))
    except ValueError as error:
        raise pytest.UsageError(
            f"RUN_SLOW={os.environ['RUN_SLOW']!r} is not a yes/no value ({error}): set RUN_SLOW=1 to run the slow "
            "tests, or unset it (or RUN_SLOW=0) to skip them."
        ) from None


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RUN_SLOW_KEY] = run_slow_tests()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.slow` tests are skipped unless RUN_SLOW is set to a yes value (see `run_slow_tests`)."""
    if config.stash[RUN_SLOW_KEY]:
        return
    skip = pytest.mark.skip(reason="slow test: set RUN_SLOW=1 to run it")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


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


def sam_attention_pair(sam_config, window_size: int):
    """transformers' `SamVisionSdpaAttention` (the reference, relative-position tables drawn large enough to matter)
    and `PosSAMVisionAttention` holding the same weights."""
    from transformers.models.sam.modeling_sam import SamVisionSdpaAttention

    from transformers_possam.modeling import PosSAMVisionAttention

    torch.manual_seed(0)
    reference = SamVisionSdpaAttention(sam_config, window_size=window_size).eval()
    torch.nn.init.normal_(reference.rel_pos_h, std=0.5)
    torch.nn.init.normal_(reference.rel_pos_w, std=0.5)
    ours = PosSAMVisionAttention(sam_config, window_size=window_size).eval()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def save_tiny_checkpoint(path, seed: int = 0, default_vocabulary: bool = False, **image_processor_kwargs):
    """
    A random tiny model with its processor (sized to the model, plus `image_processor_kwargs`) saved in `path`; with
    `default_vocabulary`, also the default vocabulary's text embeddings, as the conversion script stores them.
    """
    torch.manual_seed(seed)
    config = tiny_config()
    size = config.vision_config.image_size
    model = PosSAMForPanopticSegmentation(config)
    image_processor = PosSAMImageProcessor(
        size={"longest_edge": size}, pad_size={"height": size, "width": size}, **image_processor_kwargs
    )
    processor = PosSAMProcessor(image_processor, clip_tokenizer_from_bpe())
    if default_vocabulary:
        model.set_default_vocabulary(processor)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_model_outputs(batch: int, num_classes: int = 4, seed: int = 0):
    """`(processor, outputs, size)`: a tiny-config model's outputs (random weights, seed `seed`) for `batch` random
    images at its input size with `num_classes` random class embeddings, and an image processor for that size."""
    from transformers_possam import PosSAMForPanopticSegmentation, PosSAMImageProcessor, tiny_config

    torch.manual_seed(seed)
    model = PosSAMForPanopticSegmentation(tiny_config()).eval()
    size = model.config.vision_config.image_size
    processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    class_embeddings = torch.nn.functional.normalize(torch.randn(num_classes, 1, model.config.clip_embed_dim), dim=-1)
    with torch.inference_mode():
        outputs = model(torch.randn(batch, 3, size, size), class_embeddings=class_embeddings)
    return processor, outputs, size


def load_script(relative_path: str) -> ModuleType:
    """
    A script of this repository (`training/train.py`, `conversion/convert_possam_to_hf.py`, `benchmarks/gpu.py`) as a
    module, loaded by path under a private name (`possam_<folder>_<name>`), once per session.

    A script's folder is not a package: scripts import their siblings as top-level modules (`from common import ...`
    in `benchmarks/`). The folder is therefore on `sys.path` only while the script loads, and the siblings it imported
    are taken out of `sys.modules` again (the script keeps its references): a folder left on `sys.path` would shadow
    packages for every other test (`training/evaluate.py` vs Hugging Face's `evaluate`, `benchmarks/training.py`).
    """
    path = REPOSITORY / relative_path
    module_name = f"possam_{path.parent.name}_{path.stem}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} cannot be loaded as a Python module.")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    loaded_before = set(sys.modules)
    sys.modules[module_name] = module
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    finally:
        sys.path.remove(folder)
        for name in set(sys.modules) - loaded_before:
            if Path(getattr(sys.modules[name], "__file__", None) or "").parent == path.parent and name != module_name:
                del sys.modules[name]
    return module


def load_training_script(name: str) -> ModuleType:
    """`training/<name>.py` as a module (see `load_script`)."""
    return load_script(f"training/{name}.py")
