"""
Fetch transformers' common test mixins (the `tests/` folder of its source distribution) for the installed version.

transformers ships `ModelTesterMixin`, `ConfigTester`, `ImageProcessingTestMixin` and `ProcessorTesterMixin` only in
its sdist on the package index, not in the wheel. This script downloads that sdist with pip (package registries are
reachable where the Hub is not), and extracts the top-level `tests/*.py` files -- nothing else, no code is run -- into

    <root>/<version>/transformers_tests/

an importable package (`import transformers_tests.test_modeling_common`). The sdist lacks a few modules those files
import (`tests/exporters`, `tests/generation`, `tests/utils`, the repository's `utils/fetch_hub_objects_for_ci.py`);
they are written as the small stand-ins below, each saying what it replaces. Their code is ours, not a copy.

Usage: `python tools/fetch_transformers_tests.py [--root DIR] [--version X.Y.Z]` prints the folder to put on sys.path.
The download is cached: a second run with the folder complete does nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


DEFAULT_ROOT = Path(__file__).resolve().parent.parent / ".venv" / "transformers-tests"
PACKAGE = "transformers_tests"
COMPLETE = ".complete"

# Stand-ins for modules the sdist's tests import but do not ship (path relative to the version folder -> source).
STAND_INS = {
    f"{PACKAGE}/exporters/__init__.py": "",
    f"{PACKAGE}/exporters/test_export.py": '''"""Stand-in: the sdist omits tests/exporters. No export tests run from here (export is tested in this project)."""


class ExportTesterMixin:
    pass
''',
    f"{PACKAGE}/generation/__init__.py": "",
    f"{PACKAGE}/generation/test_utils.py": '''"""Stand-in: the sdist omits tests/generation; PosSAM does not generate, so its tests never inherit this."""


class GenerationTesterMixin:
    pass
''',
    f"{PACKAGE}/utils/__init__.py": "",
    f"{PACKAGE}/utils/test_configuration_utils.py": '''"""
Stand-in: the sdist omits tests/utils. `config_common_kwargs` are keyword arguments every PretrainedConfig accepts,
with non-default values; ConfigTester checks that a config stores them (composite configs such as PosSAM's skip it).
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "id2label": {0: "label"},
    "label2id": {"label": 0},
    "problem_type": "regression",
}
''',
    "utils/fetch_hub_objects_for_ci.py": '''"""
Stand-in for transformers' utils/fetch_hub_objects_for_ci.py, which maps test-asset URLs to files pre-downloaded in
transformers' CI. Here the Hub is unreachable: URLs come back unchanged and tests that load them need the network.
"""


def url_to_local_path(url, return_url_if_not_found=True):
    return url
''',
}


def fetch(root: Path = DEFAULT_ROOT, version: str | None = None) -> Path:
    """Return `<root>/<version>` holding the `transformers_tests` package, downloading the sdist if needed."""
    if version is None:
        import transformers

        version = transformers.__version__
    target = Path(root) / version
    if (target / COMPLETE).exists():
        return target
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
            + [f"transformers=={version}", "--dest", download],
            check=True,
        )
        archives = list(Path(download).glob("transformers-*.tar.gz"))
        if len(archives) != 1:
            raise RuntimeError(f"pip download gave {archives}, expected one transformers-{version}.tar.gz sdist.")
        package = target / PACKAGE
        package.mkdir(parents=True, exist_ok=True)
        prefix = f"transformers-{version}/tests/"
        written = 0
        with tarfile.open(archives[0], "r:gz") as archive:
            for member in archive.getmembers():
                name = member.name
                # only regular top-level .py files of tests/: names are fixed here, never taken as paths
                if not (member.isfile() and name.startswith(prefix) and name.endswith(".py")):
                    continue
                filename = name[len(prefix) :]
                if "/" in filename or not filename.isascii() or filename.startswith("."):
                    continue
                (package / filename).write_bytes(archive.extractfile(member).read())
                written += 1
        if written == 0:
            raise RuntimeError(f"{archives[0].name} holds no {prefix}*.py files.")
    (package / "__init__.py").write_text("", encoding="utf-8")
    for relative, source in STAND_INS.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    (target / COMPLETE).write_text(version, encoding="utf-8")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--version", default=None, help="default: the installed transformers version")
    args = parser.parse_args()
    print(fetch(args.root, args.version))


if __name__ == "__main__":
    main()
