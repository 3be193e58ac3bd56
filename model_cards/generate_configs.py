"""Writes model_cards/possam-vit-{b,l,h}/config.json: PosSAM with SAM ViT-B/L/H (paper Table B.1)."""

from pathlib import Path

from transformers_possam import PosSAMConfig, PosSAMForPanopticSegmentation
from transformers_possam.configuration_possam import SAM_VISION_VARIANTS


def main() -> None:
    root = Path(__file__).parent
    for variant, vision in SAM_VISION_VARIANTS.items():
        config = PosSAMConfig(vision_config=dict(vision), architectures=[PosSAMForPanopticSegmentation.__name__])
        config.save_pretrained(root / f"possam-{variant}")


if __name__ == "__main__":
    main()
