"""
Every code block of README.md and of the model cards (`model_cards/*/README.md`) works.

- ```python blocks are executed, each on its own (a fresh namespace, a temporary working directory), on the tiny
  random model. The only changes made to a block before it runs are the substitutions of `substitutions`: the
  placeholder checkpoint ids (`"path/or/hub-id"`, `"<hub-user>/possam-vit-b"`, ...) become a local tiny checkpoint and
  the example image URL / file name a local image, so the blocks run offline in seconds. A block that cannot run here
  (it needs a GPU, the network or a multi-process launch) is marked in the markdown by an HTML comment on the line
  just before its fence, `<!-- snippet: skip (reason) -->`, and reported as skipped with that reason.
- ```bash blocks are not executed; their commands are checked: `make X` names a Makefile target, and for
  `python script.py --flag` / `accelerate launch ... script.py --flag` the script exists and defines each `--flag`
  (its source contains the quoted flag); a backslash must end its line (a `\\` followed by a comment does not
  continue the command in bash).
"""

import re

import numpy as np
import pytest
from PIL import Image

from .conftest import REPOSITORY, save_tiny_checkpoint


DOCUMENTS = [REPOSITORY / "README.md", *sorted(REPOSITORY.glob("model_cards/*/README.md"))]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
SKIP_MARKER = re.compile(r"<!--\s*snippet:\s*skip\s*\((.+?)\)\s*-->")
CHECKPOINT_IDS = ["path/or/hub-id", "<hub-user>/possam-vit-b", "<hub-user>/possam-vit-l", "<hub-user>/possam-vit-h"]
IMAGES = ["http://images.cocodataset.org/val2017/000000039769.jpg", "street.jpg", "image.jpg", "a.jpg", "b.jpg"]


def substitutions(checkpoint: str, image: str) -> dict[str, str]:
    """Quoted placeholder -> quoted local value (only whole string literals are replaced)."""
    table = {f'"{placeholder}"': repr(checkpoint) for placeholder in CHECKPOINT_IDS}
    table.update({f'"{placeholder}"': repr(image) for placeholder in IMAGES})
    return table


def code_blocks(language: str, documents=DOCUMENTS) -> list:
    """pytest params `(document, line, code, skip reason or None)` for every block of `language`."""
    params = []
    for document in documents:
        text = document.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) != language:
                continue
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = SKIP_MARKER.search(before)
            shown = document.relative_to(REPOSITORY) if document.is_relative_to(REPOSITORY) else document.name
            name = f"{shown}:{line}"
            params.append(pytest.param(document, line, match.group(2), marker and marker.group(1), id=name))
    return params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("readme-checkpoint"), default_vocabulary=True))


@pytest.fixture(scope="module")
def local_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("readme-image") / "cats.jpg"
    pixels = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def test_every_document_has_code_blocks():
    documents = {params.values[0] for params in code_blocks("python")}
    assert documents == set(DOCUMENTS), "a README without python blocks: nothing would be checked"


def test_skip_marker_is_read(tmp_path):
    document = tmp_path / "doc.md"
    document.write_text(
        "# t\n\n<!-- snippet: skip (needs a GPU) -->\n```python\nimport nothing\n```\n\n```python\nx = 1\n```\n"
    )
    blocks = [params.values for params in code_blocks("python", [document])]
    assert blocks == [(document, 4, "import nothing\n", "needs a GPU"), (document, 8, "x = 1\n", None)]


@pytest.mark.parametrize("document, line, code, skip", code_blocks("python"))
def test_python_block_runs(document, line, code, skip, checkpoint, local_image, tmp_path, monkeypatch):
    if skip:
        pytest.skip(f"marked in {document.name}: {skip}")
    for placeholder, value in substitutions(checkpoint, local_image).items():
        code = code.replace(placeholder, value)
    monkeypatch.chdir(tmp_path)
    # line numbers in tracebacks point into the markdown file
    compiled = compile("\n" * line + code, f"{document}", "exec")
    exec(compiled, {"__name__": "__readme_snippet__"})


def command_lines(code: str) -> list[tuple[int, str]]:
    """Commands of a bash block (continuations joined, comments removed), with the line each starts on."""
    commands, current, start = [], "", 0
    for number, line in enumerate(code.splitlines()):
        if not current:
            start = number
        stripped = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            commands.append((start, current.strip()))
        current = ""
    return commands


@pytest.mark.parametrize("document, line, code, skip", code_blocks("bash"))
def test_bash_block_commands_exist(document, line, code, skip):
    for number, raw in enumerate(code.splitlines()):
        if re.search(r"\\[ \t]+\S", raw) and not raw.lstrip().startswith("#"):
            pytest.fail(
                f"{document.name}:{line + 1 + number}: a backslash followed by more text does not continue the "
                f"command in bash (move the comment above the command): {raw.strip()!r}"
            )
    targets = set(re.findall(r"^([\w-]+):", (REPOSITORY / "Makefile").read_text(), re.MULTILINE))
    for number, command in command_lines(code):
        words = command.split()
        where = f"{document.name}:{line + 1 + number}"
        if words[0] == "make":
            for target in words[1:]:
                assert target in targets, f"{where}: no Makefile target {target!r}"
            continue
        scripts = [index for index, word in enumerate(words) if word.endswith(".py")]
        if words[0] not in {"python", "accelerate", "ACCELERATE_USE_CPU=1"} or not scripts:
            continue
        script = REPOSITORY / words[scripts[0]]
        assert script.is_file(), f"{where}: no script {words[scripts[0]]}"
        source = script.read_text(encoding="utf-8")
        for word in words[scripts[0] + 1 :]:
            if word.startswith("--"):
                flag = word.split("=", 1)[0]
                assert f'"{flag}"' in source, f"{where}: {script.name} has no flag {flag}"
