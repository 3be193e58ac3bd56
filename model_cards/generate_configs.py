"""Writes model_cards/possam-vit-{b,l,h}/: config.json, processor (image processor + CLIP tokenizer files) and README.md.

Each folder is a ready Hub repo apart from the weights (`conversion/convert_possam_to_hf.py` and training produce
them). Run: `python model_cards/generate_configs.py`. Saving the config also writes the checkpoint's code for
`trust_remote_code=True` (the package's modules, flattened: `remote_code.py`); those files are generated from `src/`
and git-ignored, so the repository keeps one copy of the code.
"""

import json
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData

from transformers_possam import (
    PosSAMConfig,
    PosSAMForPanopticSegmentation,
    PosSAMImageProcessor,
    PosSAMProcessor,
    clip_tokenizer_from_bpe,
)
from transformers_possam.configuration_possam import SAM_VISION_VARIANTS


CPU_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results-cpu.json"

# Paper Table 1 (COCO -> ADE20K: PQ, SQ, RQ, mAP, mIoU) and Table B.1 (FPS on A100, parameters).
PAPER = {
    "vit-b": {
        "name": "B",
        "ade": (26.5, 74.7, 32.0, 16.8, 32.9),
        "fps": 1.72,
        "frozen": "441.4M",
        "total": "493.0M",
        "sam": "facebook/sam-vit-base",
    },
    "vit-l": {
        "name": "L",
        "ade": (28.0, 75.5, 33.4, 18.3, 34.2),
        "fps": 1.48,
        "frozen": "660.0M",
        "total": "711.6M",
        "sam": "facebook/sam-vit-large",
    },
    "vit-h": {
        "name": "H",
        "ade": (29.2, 76.3, 34.7, 18.3, 35.1),
        "fps": 1.30,
        "frozen": "988.7M",
        "total": "1040.3M",
        "sam": "facebook/sam-vit-huge",
    },
}

CLIP_CHECKPOINT = "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"
# The cards' example image (COCO val2017 #39769, two cats on a couch, as in transformers' docs); the README snippet test
# substitutes it by a local file.
EXAMPLE_IMAGE = "http://images.cocodataset.org/val2017/000000039769.jpg"


def card_metadata(variant: str) -> ModelCardData:
    """The card's YAML header, written by huggingface_hub itself so that `ModelCard.load` reads it back unchanged.

    No `model-index`: the repo has no weights, so nothing can be evaluated; the paper's numbers are in the text,
    marked as reported. `base_model` names the checkpoints the conversion starts from (SAM and open_clip CLIP);
    `datasets` the Hub copy of COCO 2017 (the training images; the panoptic annotations come from cocodataset.org).
    """
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license="apache-2.0",
        tags=["possam", "open-vocabulary", "panoptic-segmentation", "segment-anything", "clip"],
        datasets=["rafaelpadilla/coco2017"],
        base_model=[PAPER[variant]["sam"], CLIP_CHECKPOINT],
    )


CARD_TEXT = """
# PosSAM-{name} (SAM ViT-{name} + ConvNeXt-L CLIP) — transformers-possam

**Status: configuration and processor only. No trained PosSAM-{name} weights exist yet** (the authors released none);
this folder becomes a Hub repo once weights are produced (see "Producing the weights"). Every number marked "reported"
below is the paper's, not a measurement of this repository.

PosSAM (*Panoptic Open-vocabulary Segment Anything*, Vibashan VS et al., 2024) segments any image into panoptic
segments labelled from any list of class names: a frozen SAM ViT-{name} image encoder ([{sam}](https://huggingface.co/{sam})),
an FPN, a Mask2Former pixel decoder and masked-attention decoder (250 queries) with an IoU head, and a frozen CLIP
(open_clip `convnext_large_d_320`, [{clip}](https://huggingface.co/{clip})) whose mask-pooled features are fused with
the mask features by Local Discriminative Pooling; Mask-Aware Selective Ensembling combines the in-vocabulary and
CLIP predictions at inference.

## Usage

With the package installed (`pip install transformers-possam`; it registers the task and the Auto classes):

```python
import transformers_possam  # noqa: F401
from transformers import pipeline

segmenter = pipeline("open-vocabulary-panoptic-segmentation", model="<hub-user>/possam-{variant}")
segments = segmenter(
    "{image}",
    candidate_labels=["cat", "remote control", {{"name": "couch", "isthing": False}}],
    # or a preset vocabulary: candidate_labels="ade20k" / "coco"
    subtask="panoptic",  # or "semantic", "instance"
)
# [{{"score": ..., "label": "cat", "mask": <PIL.Image mode=L>}}, ...]
```

Without installing it, with plain transformers and timm (the repository carries its code; read it before trusting it):

```python
from transformers import pipeline

segmenter = pipeline("open-vocabulary-panoptic-segmentation", model="<hub-user>/possam-{variant}", trust_remote_code=True)
segments = segmenter(
    "{image}", candidate_labels=["cat", "remote control"]
)
```

transformers' standard `image-segmentation` pipeline (this card's `pipeline_tag`) labels segments with the
checkpoint's default vocabulary, its training classes (COCO-133), listed in `config.id2label`. Pass `threshold=0.0`:
that pipeline's default of 0.9 is meant for Mask2Former's scores, and PosSAM's (class probability times predicted
mask IoU) rarely exceed 0.5, so the default returns nothing (with a warning saying so). Add `trust_remote_code=True`
without the package:

```python
import transformers_possam  # noqa: F401
from transformers import pipeline

segmenter = pipeline("image-segmentation", model="<hub-user>/possam-{variant}", threshold=0.0)
segments = segmenter("{image}")  # subtask="panoptic" (default here), "instance" or "semantic"
# [{{"score": ..., "label": "cat", "mask": <PIL.Image mode=L>}}, ...]
```

Processor, model and post-processing, and a picture of the result:

```python
import torch
import transformers_possam  # noqa: F401  (or pass trust_remote_code=True to from_pretrained)
from transformers import AutoModelForUniversalSegmentation, AutoProcessor
from transformers.image_utils import load_image
from transformers_possam import draw_segmentation

image = load_image("{image}")
labels = ["cat", "remote control", {{"name": "couch", "isthing": False}}]
model = AutoModelForUniversalSegmentation.from_pretrained("<hub-user>/possam-{variant}").eval()
processor = AutoProcessor.from_pretrained("<hub-user>/possam-{variant}")
inputs = processor(images=image, candidate_labels=labels, return_tensors="pt")
with torch.no_grad():
    outputs = model(
        **{{key: inputs[key] for key in ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "synonym_mask")}}
    )
result = processor.post_process_panoptic_segmentation(
    outputs,
    target_sizes=inputs["original_sizes"],
    reshaped_input_sizes=inputs["reshaped_input_sizes"],
    candidate_labels=labels,
    training_vocabulary=model.config.training_vocabulary,
)[0]
draw_segmentation(image, result, labels).save("segments.png")  # colours, contours, labels and a legend
```

## Reported results (from the paper, not measured here)

The paper's Table 1 reports for PosSAM-{name} trained on COCO panoptic and evaluated zero-shot on ADE20K-150
(panoptic): **PQ {pq}, SQ {sq}, RQ {rq}, mask AP {ap}, mIoU {miou}**. These are the authors' numbers for their own
weights, which were not released; this repository has no weights and these numbers were not reproduced.

## Producing the weights

1. `python conversion/convert_possam_to_hf.py --sam_checkpoint sam_vit_{letter}_*.pth (or {sam}) --clip_checkpoint
   laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup --output_dir possam-{variant} --verify` (SAM and CLIP
   weights, fresh decoder);
2. train on COCO panoptic: `accelerate launch training/train.py --model_name_or_path possam-{variant} --dataset_name
   <coco parquet> --max_steps 368750 --per_device_train_batch_size 2 --mixed_precision bf16` on 8 GPUs (batch 16,
   AdamW 1e-4, weight decay 0.05, LR x0.1 at 88.9% / 96.3%, gradient clipping 0.01, LSJ 0.1-2.0 at 1024);
3. evaluate: `python training/evaluate.py --model_name_or_path <output> --dataset_name <ade20k parquet>`;
4. upload: copy this README next to the weights and `huggingface_hub.upload_folder(repo_id=..., folder_path=...)`.

## Training recipe (paper / FC-CLIP)

COCO panoptic train2017 (133 classes), 1024x1024 canvases with FC-CLIP's large-scale jitter (scale 0.1-2.0, crop,
padding; never resized back), batch 16 (8 GPUs x 2), AdamW (lr 1e-4, weight decay 0.05, none on normalization layers
and embeddings), 250K iterations with LR x 0.1 at 150K and 200K, gradient clipping 0.01 (paper Appendix A); losses:
class 2.0, mask (BCE) 5.0, dice 5.0, IoU 1.0, void weight 0.1, 12544 sampled points; 250 queries; MASE with alpha
0.4 (seen) / beta 0.8 (unseen), stored as `mase_alpha` / `mase_beta` in `preprocessor_config.json`.

## Intended uses and limitations

Open-vocabulary panoptic, instance and semantic segmentation of natural images with user-given label lists, and
research on open-vocabulary segmentation. Classes far from COCO and from CLIP's training data are recognised less
reliably; labels inherit CLIP's biases; stuff/thing marking of custom labels is up to the user. Not for medical,
biometric or safety-critical decisions.

## Parameters and speed

| | paper (Table B.1) | this implementation |
|---|---|---|
| frozen parameters | {frozen} | {our_frozen} |
| trainable parameters | 51.5M | {our_trainable} |
| total | {total} | {our_total} |
| speed | {fps} FPS (A100) | {our_speed} |

Parameter counts of this implementation are exact counts on the meta device.

## Citation

```bibtex
@article{{vs2024possam,
  title={{PosSAM: Panoptic Open-vocabulary Segment Anything}},
  author={{VS, Vibashan and Borse, Shubhankar and Park, Hyojin and Das, Debasmit and Patel, Vishal and Hayat, Munawar and Porikli, Fatih}},
  journal={{arXiv preprint arXiv:2403.09620}},
  year={{2024}}
}}
```
"""


def main() -> None:
    root = Path(__file__).parent
    tokenizer = clip_tokenizer_from_bpe()
    for variant, vision in SAM_VISION_VARIANTS.items():
        folder = root / f"possam-{variant}"
        config = PosSAMConfig(vision_config=dict(vision), architectures=[PosSAMForPanopticSegmentation.__name__])
        config.save_pretrained(folder)
        processor = PosSAMProcessor(PosSAMImageProcessor(), tokenizer)
        processor.save_pretrained(folder)
        processor.image_processor.save_pretrained(folder)  # preprocessor_config.json for AutoImageProcessor
        with torch.device("meta"):
            model = PosSAMForPanopticSegmentation(config)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        paper = PAPER[variant]
        pq, sq, rq, ap, miou = paper["ade"]
        our_speed = "GPU: not measured yet (no GPU was lent to the sessions so far)"
        if variant == "vit-b" and CPU_RESULTS.exists():
            overhead = next(row for row in json.loads(CPU_RESULTS.read_text())["figures"] if row["target"] == 1)
            our_speed += (
                f"; CPU (2 cores, fp32, random weights): {overhead['ours']['median_s']:.1f} s per 1024x1024 image, "
                f"forward and panoptic post-processing (`benchmarks/run.py` in the code repository)"
            )
        text = CARD_TEXT.format(
            variant=variant,
            name=paper["name"],
            letter=variant[-1],
            sam=paper["sam"],
            pq=pq,
            sq=sq,
            rq=rq,
            ap=ap,
            miou=miou,
            fps=paper["fps"],
            frozen=paper["frozen"],
            total=paper["total"],
            our_frozen=f"{frozen / 1e6:.2f}M",
            our_trainable=f"{trainable / 1e6:.2f}M",
            our_total=f"{(frozen + trainable) / 1e6:.2f}M",
            our_speed=our_speed,
            clip=CLIP_CHECKPOINT,
            image=EXAMPLE_IMAGE,
        )
        card = ModelCard(f"---\n{card_metadata(variant).to_yaml()}\n---\n{text}")
        (folder / "README.md").write_text(card.content)


if __name__ == "__main__":
    main()
