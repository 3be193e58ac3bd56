"""
Checkpoints that carry their code: what lets `trust_remote_code=True` load a PosSAM checkpoint where this package is
not installed.

transformers' remote-code loader (`transformers.dynamic_module_utils`) copies the module an `auto_map` entry names
and, recursively, the modules it imports as `from .name import ...` - flat `.py` files next to `config.json`, nothing
else (no subpackages, no data files). This package is nested (`modeling/`, `vocabularies/` with `.tsv` files), so
`export_remote_code` writes, at save time, a flat copy of the modules PosSAM's classes need, generated from this
package's own sources (the single source of truth; nothing is maintained by hand):

- `transformers_possam/<dir>/<name>.py` becomes `<dir>_<name>.py` (a package's `__init__.py` becomes `<dir>.py`);
  every relative import is rewritten to name the flat module;
- `from importlib import resources` in a module of a subpackage with data files becomes an import of a generated
  `<dir>_resources.py` that holds those files (base64) behind the same `resources.files(...).joinpath(name)
  .read_text()` calls, so the vocabularies load from the checkpoint.

`PosSAMConfig.save_pretrained` calls it (so `PreTrainedModel.save_pretrained`, `push_to_hub` and the conversion
script, which save the config, write the code too) and records `AUTO_MAP` and `CUSTOM_PIPELINES` in `config.json`.
"""

from __future__ import annotations

import ast
import base64
import re
from pathlib import Path


__all__ = ["AUTO_MAP", "CUSTOM_PIPELINES", "ROOT_MODULES", "export_remote_code", "flat_module_name"]

PACKAGE = "transformers_possam"
PACKAGE_DIR = Path(__file__).resolve().parent

# The modules the Auto classes and the pipeline name; everything they import relatively comes with them.
ROOT_MODULES = (
    "configuration_possam",
    "modeling_possam",
    "image_processing_possam",
    "processing_possam",
    "pipeline_possam",
)

AUTO_MAP: dict[str, str | dict[str, str]] = {
    "AutoConfig": "configuration_possam.PosSAMConfig",
    "AutoModel": "modeling_possam.PosSAMModel",
    "AutoModelForUniversalSegmentation": "modeling_possam.PosSAMForPanopticSegmentation",
    # transformers' image-segmentation pipeline (and the Hub widget) loads the model with this one
    "AutoModelForImageSegmentation": "modeling_possam.PosSAMForPanopticSegmentation",
    "AutoImageProcessor": {
        "torchvision": "image_processing_possam.PosSAMImageProcessor",
        "pil": "image_processing_possam.PosSAMImageProcessorPil",
    },
    "AutoProcessor": "processing_possam.PosSAMProcessor",
}

PIPELINE_TASK = "open-vocabulary-panoptic-segmentation"  # pipeline_possam.TASK (not imported: this module stays light)
# The format transformers' `Pipeline.save_pretrained` writes for a registered custom pipeline.
CUSTOM_PIPELINES = {
    PIPELINE_TASK: {
        "impl": "pipeline_possam.OpenVocabularyPanopticSegmentationPipeline",
        "pt": ["AutoModelForUniversalSegmentation"],
        "type": "multimodal",
    }
}

HEADER = (
    "# Generated from {source} of transformers-possam by transformers_possam.remote_code.export_remote_code, for\n"
    "# loading this checkpoint with trust_remote_code=True without the package. Do not edit: edit the package.\n"
)
RESOURCES_MODULE = '''{header}"""The data files of `{package}` (base64), read as `importlib.resources.files(...).joinpath(name)` reads them."""

import base64


_FILES = {files!r}


class _EmbeddedFile:
    def __init__(self, name=""):
        self.name = name

    def joinpath(self, *names):
        return _EmbeddedFile("/".join(part for part in (self.name, *names) if part))

    __truediv__ = joinpath

    def is_file(self):
        return self.name in _FILES

    def read_bytes(self):
        if self.name not in _FILES:
            raise FileNotFoundError(f"{{self.name!r}} is not among the data files shipped with this checkpoint.")
        return base64.b64decode(_FILES[self.name])

    def read_text(self, encoding="utf-8"):
        return self.read_bytes().decode(encoding)


class _Resources:
    @staticmethod
    def files(anchor):
        return _EmbeddedFile()


resources = _Resources()
'''

_DATA_SUFFIXES = (".py", ".pyc", ".pyi")


def flat_module_name(module: str) -> str:
    """`transformers_possam.modeling.fpn` -> `modeling_fpn`; `transformers_possam.modeling` -> `modeling`."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        raise ValueError(f"{module!r} is not a module of {PACKAGE}.")
    return module[len(PACKAGE) + 1 :].replace(".", "_")


def _module_file(module: str) -> Path:
    relative = Path(*module.split(".")[1:])
    package_init = PACKAGE_DIR / relative / "__init__.py"
    return package_init if package_init.is_file() else (PACKAGE_DIR / relative).with_suffix(".py")


def _package_of(module: str, file: Path) -> str:
    return module if file.name == "__init__.py" else module.rpartition(".")[0]


def _absolute_target(node: ast.ImportFrom, module: str, file: Path) -> str:
    base = _package_of(module, file).split(".")
    if node.level > len(base):
        raise ValueError(f"{file}: `from {'.' * node.level}{node.module or ''} import` leaves the package.")
    base = base[: len(base) - node.level + 1]
    if node.module is None:
        raise ValueError(
            f"{file}, line {node.lineno}: `from {'.' * node.level} import ...` imports submodules by name, which "
            "transformers' remote-code loader cannot follow; import from the module (`from .name import ...`)."
        )
    return ".".join([*base, node.module])


def _closure() -> dict[str, Path]:
    """Every module of the package that `ROOT_MODULES` import relatively, directly or not: {module name: file}."""
    found: dict[str, Path] = {}
    pending = [f"{PACKAGE}.{name}" for name in ROOT_MODULES]
    while pending:
        module = pending.pop()
        if module in found:
            continue
        file = _module_file(module)
        if not file.is_file():
            raise FileNotFoundError(f"{module} has no source file ({file}).")
        found[module] = file
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                pending.append(_absolute_target(node, module, file))
    return found


def _rewrite(module: str, file: Path, has_data: set[str]) -> str:
    """The source of `module` with each relative import naming its flat module; checks nothing else needs the package."""
    source = file.read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    for node in ast.walk(ast.parse(source, str(file))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            target = flat_module_name(_absolute_target(node, module, file))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module == "importlib"
            and any(alias.name == "resources" for alias in node.names)
        ):
            package = _package_of(module, file)
            if package not in has_data:
                continue
            if [alias.name for alias in node.names] != ["resources"] or node.names[0].asname:
                raise ValueError(f"{file}, line {node.lineno}: import importlib's `resources` on a line of its own.")
            target = f"{flat_module_name(package) or 'package'}_resources"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(name == PACKAGE or name.startswith(PACKAGE + ".") for name in names):
                raise ValueError(
                    f"{file}, line {node.lineno}: an absolute import of {PACKAGE} cannot be exported as remote code; "
                    "import relatively."
                )
            continue
        else:
            continue
        index = node.lineno - 1
        new_line, count = re.subn(r"^(\s*from\s+)\.*[\w.]*(\s+import\b)", rf"\g<1>.{target}\g<2>", lines[index])
        if count != 1:
            raise ValueError(f"{file}, line {node.lineno}: cannot rewrite the import {lines[index].strip()!r}.")
        lines[index] = new_line
    return "".join(lines)


def _data_files(package: str) -> dict[str, str]:
    folder = _module_file(package).parent
    return {
        path.name: base64.b64encode(path.read_bytes()).decode("ascii")
        for path in sorted(folder.iterdir())
        if path.is_file() and not path.name.endswith(_DATA_SUFFIXES)
    }


def export_remote_code(folder: str | Path) -> list[Path]:
    """
    Writes into `folder` the flat modules PosSAM's classes need (see the module docstring) and returns their paths.

    Raises:
        ValueError: a module that the loader could not follow (a `from . import name`, an absolute import of this
            package) or two modules that would get the same flat name.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    modules = _closure()
    packages = {_package_of(module, file) for module, file in modules.items()}
    data = {package: _data_files(package) for package in sorted(packages)}
    has_data = {package for package, files in data.items() if files}
    outputs: dict[str, str] = {}
    for module, file in sorted(modules.items()):
        source = f"{PACKAGE}/{file.relative_to(PACKAGE_DIR).as_posix()}"
        outputs[flat_module_name(module)] = HEADER.format(source=source) + _rewrite(module, file, has_data)
    for package in sorted(has_data):
        name = f"{flat_module_name(package) or 'package'}_resources"
        if name in outputs:
            raise ValueError(f"Two exported modules would be named {name}.py.")
        header = HEADER.format(source=f"the data files of {package}")
        outputs[name] = RESOURCES_MODULE.format(header=header, package=package, files=data[package])
    if len(outputs) != len(modules) + len(has_data):
        raise ValueError("Two modules of the package would get the same flat name.")
    written = []
    for name, text in sorted(outputs.items()):
        path = folder / f"{name}.py"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
