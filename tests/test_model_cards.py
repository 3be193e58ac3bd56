"""
The model cards `model_cards/possam-vit-{b,l,h}/README.md` are valid Hub cards: `huggingface_hub.ModelCard` reads them
back unchanged (no key dropped by a YAML error), they name their base models and datasets by real Hub ids, report
the paper's numbers only as marked text (no `model-index`: the repos have no weights) and show usage with and without
the package installed. (Their code blocks are run by tests/test_readme_snippets.py.)
"""

import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard


CARDS = Path(__file__).resolve().parents[1] / "model_cards"
CLIP = "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"  # open_clip convnext_large_d_320, LAION-2B soup
# variant -> (SAM checkpoint on the Hub, paper Table 1 COCO -> ADE20K: PQ, SQ, RQ, mask AP, mIoU)
VARIANTS = {
    "possam-vit-b": ("facebook/sam-vit-base", ("26.5", "74.7", "32.0", "16.8", "32.9")),
    "possam-vit-l": ("facebook/sam-vit-large", ("28.0", "75.5", "33.4", "18.3", "34.2")),
    "possam-vit-h": ("facebook/sam-vit-huge", ("29.2", "76.3", "34.7", "18.3", "35.1")),
}
HEADER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)


def card_text(variant):
    return (CARDS / variant / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_card_round_trips_through_huggingface_hub_unchanged(variant):
    text = card_text(variant)
    header = yaml.safe_load(HEADER.match(text).group(1))
    card = ModelCard.load(CARDS / variant / "README.md")
    # every key of the YAML header survives (a YAML error would turn text into stray keys, which ModelCard drops)
    assert card.data.to_dict() == header
    assert card.content == text
    assert ModelCard(card.content).content == text  # re-serialized, still the same


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_card_metadata(variant):
    header = yaml.safe_load(HEADER.match(card_text(variant)).group(1))
    sam, _ = VARIANTS[variant]
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "image-segmentation"
    assert header["base_model"] == [sam, CLIP]
    assert header["datasets"] and all(re.fullmatch(r"[\w.-]+/[\w.-]+", dataset) for dataset in header["datasets"])
    assert "model-index" not in header  # no weights: nothing evaluated here


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_paper_numbers_are_marked_as_reported(variant):
    text = card_text(variant)
    _, numbers = VARIANTS[variant]
    section = text.split("## Reported results (from the paper, not measured here)", 1)[1].split("\n## ", 1)[0]
    for number in numbers:
        assert number in section
    assert "not reproduced" in section and "No trained" in text


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_usage_with_and_without_the_package(variant):
    blocks = re.findall(r"```python\n(.*?)```", card_text(variant), re.DOTALL)
    installed = [b for b in blocks if "import transformers_possam" in b and "pipeline(" in b]
    remote = [b for b in blocks if "trust_remote_code=True" in b and "transformers_possam" not in b]
    assert installed and remote
    assert all(f"<hub-user>/{variant}" in block for block in installed + remote)
