"""
transformers' own common test mixins, imported from the source distribution of the installed transformers.

`make test` fetches them first (`make transformers-tests`, i.e. `tools/fetch_transformers_tests.py`); when they are
missing, importing a module here fetches them (pip download of the sdist, cached under `.venv/transformers-tests/`).
Nothing of transformers' test code is copied into this repository.

    test_modeling_common = common_module("test_modeling_common")
    class PosSAMModelTest(test_modeling_common.ModelTesterMixin, unittest.TestCase): ...
"""

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


_FETCH_SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "fetch_transformers_tests.py"


def _fetch_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_transformers_tests", _FETCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def common_module(name: str) -> ModuleType:
    """`transformers_tests.<name>` (e.g. "test_modeling_common") from the installed transformers' sdist."""
    root = _fetch_module().fetch()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"transformers_tests.{name}")
