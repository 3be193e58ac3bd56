"""
A checkpoint saved by this package loads with plain transformers (`trust_remote_code=True`) where
`transformers_possam` cannot be imported (issue 13, item 1), and without `trust_remote_code` nothing of its code runs.

Each check without the package runs in a fresh interpreter whose import system refuses `transformers_possam` (a
`sys.meta_path` finder that raises ImportError for it, installed before anything else is imported), with its own
transformers modules cache.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, pipeline
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

from transformers_possam import PosSAMForPanopticSegmentation, PosSAMModel
from transformers_possam.pipeline_possam import OpenVocabularyPanopticSegmentationPipeline
from transformers_possam.remote_code import AUTO_MAP

from .conftest import save_tiny_checkpoint


AUTO_CLASSES = (
    "AutoConfig",
    "AutoModel",
    "AutoModelForUniversalSegmentation",
    "AutoImageProcessor",
    "AutoProcessor",
)
TASK = "open-vocabulary-panoptic-segmentation"
CANDIDATE_LABELS = ["cat", "dog", "sky"]

# Runs first in the child interpreter: from here on, importing transformers_possam fails.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "transformers_possam":
                raise ImportError("transformers_possam is not installed in this test")

    sys.meta_path.insert(0, BlockPackage())
    try:
        import transformers_possam  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the package could still be imported")
    """
)


def image(seed: int = 0, height: int = 128, width: int = 128) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


def run_without_package(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter where `transformers_possam` cannot be imported; cwd and PYTHONPATH neutral."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-c", BLOCK_PACKAGE + textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny checkpoint (`save_tiny_checkpoint`) with its default vocabulary stored."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "possam-tiny", default_vocabulary=True)


def test_checkpoint_declares_its_code(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert set(AUTO_CLASSES) <= set(config["auto_map"])
    assert config["auto_map"]["AutoImageProcessor"] == AUTO_MAP["AutoImageProcessor"]
    assert config["custom_pipelines"][TASK]["impl"] == "pipeline_possam.OpenVocabularyPanopticSegmentationPipeline"
    processor_config = json.loads((checkpoint / "processor_config.json").read_text())
    assert {"AutoProcessor", "AutoImageProcessor"} <= set(processor_config["auto_map"])
    assert "AutoImageProcessor" in processor_config["image_processor"]["auto_map"]


def test_every_module_the_loader_follows_is_in_the_checkpoint(checkpoint):
    """transformers' own dependency walk finds every module, and none needs the package or a missing library."""
    entries = {reference.split(".")[0] for value in AUTO_MAP.values() for reference in _references(value)}
    entries.add("pipeline_possam")
    for entry in sorted(entries):
        module = checkpoint / f"{entry}.py"
        for file in [module, *map(Path, get_relative_import_files(module))]:
            assert file.is_file(), f"{entry} needs {file.name}, which the checkpoint lacks"
            assert "transformers_possam" not in get_imports(file), file.name


def _references(value):
    return value.values() if isinstance(value, dict) else [value]


def test_loads_and_segments_without_the_package(checkpoint, tmp_path):
    """The Auto classes and both pipelines work from the checkpoint alone, with the installed package's results."""
    output = tmp_path / "result.json"
    result = run_without_package(
        f"""
        import json, sys
        import numpy as np
        from PIL import Image
        from transformers import (
            AutoConfig, AutoImageProcessor, AutoModel, AutoModelForUniversalSegmentation, AutoProcessor, pipeline,
        )

        path = {str(checkpoint)!r}
        loaded = {{}}
        for auto_class in (AutoConfig, AutoModel, AutoModelForUniversalSegmentation, AutoImageProcessor, AutoProcessor):
            loaded[auto_class.__name__] = type(auto_class.from_pretrained(path, trust_remote_code=True)).__name__
        image = Image.fromarray((np.random.RandomState(0).rand(128, 128, 3) * 255).astype("uint8"))
        segmenter = pipeline({TASK!r}, model=path, trust_remote_code=True)
        open_vocabulary = segmenter(image, candidate_labels={CANDIDATE_LABELS!r}, threshold=0.0)
        standard = pipeline("image-segmentation", model=path, trust_remote_code=True)(
            image, threshold=0.0, overlap_mask_area_threshold=0.0
        )
        def plain(segments):
            return [[s["label"], s["score"], np.asarray(s["mask"]).tolist()] for s in segments]
        json.dump(
            {{
                "loaded": loaded,
                "pipeline": type(segmenter).__module__,
                "open_vocabulary": plain(open_vocabulary),
                "standard": plain(standard),
                "package_modules": sorted(name for name in sys.modules if name.startswith("transformers_possam")),
            }},
            open({str(output)!r}, "w"),
        )
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(output.read_text())
    assert found["package_modules"] == []
    assert found["loaded"] == {
        "AutoConfig": "PosSAMConfig",
        "AutoModel": "PosSAMModel",
        "AutoModelForUniversalSegmentation": "PosSAMForPanopticSegmentation",
        "AutoImageProcessor": "PosSAMImageProcessor",
        "AutoProcessor": "PosSAMProcessor",
    }
    assert found["pipeline"].startswith("transformers_modules.")

    # the same checkpoint through the installed package
    installed = pipeline(TASK, model=str(checkpoint))
    expected = installed(image(), candidate_labels=CANDIDATE_LABELS, threshold=0.0)
    assert expected, "positive control: the tiny model finds segments in this image"
    _assert_same_segments(found["open_vocabulary"], expected)
    standard = pipeline("image-segmentation", model=str(checkpoint))(
        image(), threshold=0.0, overlap_mask_area_threshold=0.0
    )
    assert standard, "positive control: the default vocabulary finds segments in this image"
    _assert_same_segments(found["standard"], standard)


def _assert_same_segments(found, expected):
    assert [label for label, _, _ in found] == [segment["label"] for segment in expected]
    np.testing.assert_allclose([score for _, score, _ in found], [segment["score"] for segment in expected], atol=1e-5)
    for (_, _, mask), segment in zip(found, expected):
        np.testing.assert_array_equal(np.asarray(mask, dtype=np.uint8), np.asarray(segment["mask"]))


def test_without_trust_remote_code_no_code_runs(checkpoint, tmp_path):
    """
    The checkpoint's code runs only with trust_remote_code=True: a copy whose configuration module writes a marker
    when executed is refused without it (marker absent), and executed with it (the positive control).
    """
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in checkpoint.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    marker = tmp_path / "marker"
    module = copy / "configuration_possam.py"
    module.write_text(f"open({str(marker)!r}, 'w').write('code ran')\n" + module.read_text())
    refused = run_without_package(
        f"""
        from transformers import AutoConfig, AutoModel, AutoProcessor, pipeline
        for load in (AutoConfig.from_pretrained, AutoModel.from_pretrained, AutoProcessor.from_pretrained,
                     lambda path: pipeline({TASK!r}, model=path)):
            try:
                load({str(copy)!r})
            except ValueError as error:
                assert "trust_remote_code" in str(error), error
            else:
                raise SystemExit("loaded without trust_remote_code")
        """,
        tmp_path,
    )
    assert refused.returncode == 0, refused.stderr[-3000:]
    assert not marker.exists()
    trusted = run_without_package(
        f"""
        from transformers import AutoConfig
        AutoConfig.from_pretrained({str(copy)!r}, trust_remote_code=True)
        """,
        tmp_path,
    )
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert marker.read_text() == "code ran"


def test_installed_package_loads_its_own_classes(checkpoint):
    """
    With the package installed, the declared remote code is not needed: no trust_remote_code prompt, the installed
    classes (and the installed pipeline, despite the checkpoint's custom_pipelines).
    """
    assert type(AutoModel.from_pretrained(checkpoint)) is PosSAMModel
    segmenter = pipeline(TASK, model=str(checkpoint))
    assert type(segmenter) is OpenVocabularyPanopticSegmentationPipeline
    assert type(segmenter.model) is PosSAMForPanopticSegmentation


def test_saved_config_round_trips(checkpoint):
    """auto_map / custom_pipelines do not leak into the installed config's behaviour or break reloading."""
    model = PosSAMForPanopticSegmentation.from_pretrained(checkpoint)
    assert model.config.custom_pipelines == {}
    assert json.loads((checkpoint / "config.json").read_text())["custom_pipelines"]
    torch.testing.assert_close(
        model.default_class_embeddings,
        PosSAMForPanopticSegmentation.from_pretrained(checkpoint).default_class_embeddings,
    )


def test_a_remote_code_copy_saved_again_keeps_its_pipeline(checkpoint, tmp_path):
    """
    A model loaded with trust_remote_code=True and saved again (the usual fine-tune-and-push path without the
    package) still carries every module its config.json names, the pipeline's included, and the new folder runs the
    pipeline without the package. (transformers copies only the saved objects' modules and their relative imports;
    before, the re-saved folder declared `custom_pipelines` but lacked pipeline_possam.py.)
    """
    resaved = tmp_path / "resaved"
    saved = run_without_package(
        f"""
        from transformers import AutoModelForUniversalSegmentation, AutoProcessor
        path = {str(checkpoint)!r}
        AutoModelForUniversalSegmentation.from_pretrained(path, trust_remote_code=True).save_pretrained({str(resaved)!r})
        AutoProcessor.from_pretrained(path, trust_remote_code=True).save_pretrained({str(resaved)!r})
        """,
        tmp_path,
    )
    assert saved.returncode == 0, saved.stderr[-3000:]
    config = json.loads((resaved / "config.json").read_text())
    assert config["custom_pipelines"][TASK]["impl"].split(".")[0] == "pipeline_possam"
    pipeline_module = resaved / "pipeline_possam.py"
    assert pipeline_module.is_file()
    for file in map(Path, get_relative_import_files(pipeline_module)):
        assert file.is_file(), f"the pipeline needs {file.name}, which the re-saved folder lacks"

    output = tmp_path / "labels.json"
    ran = run_without_package(
        f"""
        import json
        import numpy as np
        from PIL import Image
        from transformers import pipeline
        image = Image.fromarray((np.random.RandomState(0).rand(128, 128, 3) * 255).astype("uint8"))
        segmenter = pipeline({TASK!r}, model={str(resaved)!r}, trust_remote_code=True)
        segments = segmenter(image, candidate_labels={CANDIDATE_LABELS!r}, threshold=0.0)
        json.dump([segment["label"] for segment in segments], open({str(output)!r}, "w"))
        """,
        tmp_path,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    expected = pipeline(TASK, model=str(checkpoint))(image(), candidate_labels=CANDIDATE_LABELS, threshold=0.0)
    assert expected, "positive control: the tiny model finds segments in this image"
    assert json.loads(output.read_text()) == [segment["label"] for segment in expected]
