"""Build CLIP's BPE tokenizer (transformers `CLIPTokenizer`) offline from the vocabulary file open_clip ships."""

from __future__ import annotations

import gzip
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


__all__ = ["clip_tokenizer_from_bpe", "default_bpe_path"]

# CLIP's BPE: 49152 - 256 - 2 merges after the header line (OpenAI CLIP / open_clip SimpleTokenizer).
NUM_MERGES = 49152 - 256 - 2


def default_bpe_path() -> Path:
    """open_clip's `bpe_simple_vocab_16e6.txt.gz` (install open_clip_torch, or load a saved processor instead)."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            "Building the CLIP tokenizer offline needs open_clip_torch's BPE file (pip install open_clip_torch), or "
            "load the tokenizer saved with a PosSAM checkpoint (PosSAMProcessor.from_pretrained)."
        ) from error
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def clip_tokenizer_from_bpe(bpe_path: str | Path | None = None, model_max_length: int = 77) -> CLIPTokenizer:
    """
    The 49408-entry CLIP vocabulary (256 byte symbols, the same with `</w>`, 48894 merges, `<|startoftext|>`,
    `<|endoftext|>`) and its merges, as a `CLIPTokenizer`. Ids equal open_clip's tokenizer; HF pads with
    `<|endoftext|>` where open_clip pads with 0, which CLIP's pooling at the first end-of-text token makes irrelevant.
    """
    path = Path(bpe_path) if bpe_path is not None else default_bpe_path()
    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")[1 : NUM_MERGES + 1]
    merges: list[tuple[str, str]] = []
    for line in lines:
        first, second = line.split()
        merges.append((first, second))
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    # CLIPTokenizer annotates `merges` as `str | list[str]`, but hands the list to tokenizers' BPE, which takes
    # (first, second) pairs and refuses "first second" strings
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)  # type: ignore[arg-type]
