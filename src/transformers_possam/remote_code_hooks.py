"""
The save-time hooks that make a checkpoint carry its code (see `remote_code.py`).

This module is itself part of the exported code. Only the installed package, which has the nested sources, exports
them. In a checkpoint's flat copy (loaded with `trust_remote_code=True`), transformers' own `custom_object_save`
copies the saved objects' modules, and what they import relatively, again when such a copy is saved; the hooks add
the one module that closure lacks, the pipeline's, which `custom_pipelines` in `config.json` names.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any


__all__ = ["IS_INSTALLED_PACKAGE", "export_code", "saving_checkpoint", "write_json_with_auto_map"]

PACKAGE = "transformers_possam"
IS_INSTALLED_PACKAGE = __name__.split(".")[0] == PACKAGE


def export_code(save_directory: str | os.PathLike) -> Any:
    """
    Installed package: writes the flat modules into `save_directory` and returns the `remote_code` module (its
    `AUTO_MAP`, `CUSTOM_PIPELINES`); a checkpoint's copy: None.
    """
    if not IS_INSTALLED_PACKAGE:
        _copy_pipeline_module(save_directory)
        return None
    # imported by name: the exporter reads the package's sources, and is not part of the exported code
    remote_code = importlib.import_module(f"{PACKAGE}.remote_code")
    remote_code.export_remote_code(save_directory)
    return remote_code


def _copy_pipeline_module(save_directory: str | os.PathLike) -> None:
    """
    A checkpoint's copy saved again (loaded with `trust_remote_code=True`, then `save_pretrained`): copies the
    pipeline module, and the modules it imports relatively, next to the config. Nothing the model or the processors
    need imports the pipeline, so transformers' copy of their modules would leave out the file `custom_pipelines`
    names. The relative import below also makes transformers' loader fetch the pipeline module together with this
    one, so it is there to copy.
    """
    from transformers.dynamic_module_utils import custom_object_save

    from .pipeline_possam import OpenVocabularyPanopticSegmentationPipeline

    Path(save_directory).mkdir(parents=True, exist_ok=True)
    custom_object_save(OpenVocabularyPanopticSegmentationPipeline, save_directory)


_SAVING_CHECKPOINT: ContextVar[bool] = ContextVar("possam_saving_checkpoint", default=False)


@contextmanager
def saving_checkpoint() -> Iterator[None]:
    """Marks a `save_pretrained` in progress: the JSON files it writes get the code next to them."""
    token = _SAVING_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _SAVING_CHECKPOINT.reset(token)


def write_json_with_auto_map(
    obj: Any,
    json_file_path: str | os.PathLike,
    auto_classes: tuple[str, ...],
    write: Callable[[str | os.PathLike], None],
) -> None:
    """
    `to_json_file` of a processor or an image processor (`write`: the inherited one). Within `saving_checkpoint()`
    (their `save_pretrained`) it also writes the checkpoint's code next to the file and an `auto_map` for
    `auto_classes` (also in a processor's nested "image_processor" entry, which `AutoImageProcessor` reads when there
    is no preprocessor_config.json). Written here, between transformers' file snapshot and its upload, so
    `push_to_hub=True` uploads the code too. `obj.to_dict()` itself is left unchanged.
    """
    remote_code = export_code(Path(json_file_path).parent) if _SAVING_CHECKPOINT.get() else None
    if remote_code is None:
        write(json_file_path)
        return
    data = json.loads(obj.to_json_string())
    data["auto_map"] = {**data.get("auto_map", {}), **{name: remote_code.AUTO_MAP[name] for name in auto_classes}}
    if isinstance(data.get("image_processor"), dict):
        image_processor = data["image_processor"]
        image_processor["auto_map"] = {
            **image_processor.get("auto_map", {}),
            "AutoImageProcessor": remote_code.AUTO_MAP["AutoImageProcessor"],
        }
    with open(json_file_path, "w", encoding="utf-8") as writer:
        writer.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
