"""
Target 11 (issue 15, item 5): the ONNX export (`transformers_possam.export.export_onnx`) run by onnxruntime on CPU
beside PyTorch eager on the same inputs: forward only (the exported graph: pixels + precomputed vocabulary ->
logits, masks, IoU scores), batch 1, fp32, 150 classes, with as many threads as PyTorch. Reported with the export
time, the largest relative difference of the outputs (issue 15 asks 1e-4) and the peak RSS the export reached.

Runs in a subprocess (`python benchmarks/onnx_cpu.py --variant ...` prints a JSON row): exporting PosSAM-B at 1024x1024
takes several GB of memory and minutes, which this keeps out of the suite's process (targets 5's memory figures).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import peak_rss_bytes, positive_int, summary


HERE = Path(__file__).resolve().parent


def measure(variant: str, repeats: int, threads: int) -> dict:
    import onnxruntime

    from transformers_possam import PosSAMForPanopticSegmentation, tiny_config
    from transformers_possam.export import EXPORTED_OUTPUTS, export_onnx

    torch.set_num_threads(threads)
    if variant == "tiny":
        model = PosSAMForPanopticSegmentation(tiny_config()).eval()
    else:
        from common import full_size_model

        model = full_size_model()
    size = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 3, size, size, generator=generator)
    class_embeddings = torch.nn.functional.normalize(
        torch.randn(150, 1, model.config.clip_embed_dim, generator=generator), dim=-1
    )
    synonym_mask = torch.ones(150, 1, dtype=torch.bool)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        path = export_onnx(model, Path(folder) / "possam.onnx", pixel_values, class_embeddings, synonym_mask)
        export_seconds = time.perf_counter() - start
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {
        "pixel_values": pixel_values.numpy(),
        "class_embeddings": class_embeddings.numpy(),
        "synonym_mask": synonym_mask.numpy(),
    }

    def pytorch():
        with torch.inference_mode():
            outputs = model(pixel_values=pixel_values, class_embeddings=class_embeddings, synonym_mask=synonym_mask)
        return [outputs[name].numpy() for name in EXPORTED_OUTPUTS]

    expected, found = pytorch(), session.run(None, feeds)  # also the warm-ups
    relative = max(
        float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12)) for ours, theirs in zip(found, expected)
    )
    times: dict[str, list[float]] = {"onnxruntime": [], "pytorch": []}
    for _ in range(repeats):  # interleaved: both see the same load
        for name, call in (("onnxruntime", lambda: session.run(None, feeds)), ("pytorch", pytorch)):
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {
        "size": size,
        "onnxruntime": summary(times["onnxruntime"]),
        "pytorch": summary(times["pytorch"]),
        "export_seconds": export_seconds,
        "max_relative_difference": relative,
        "peak_rss_bytes": peak_rss_bytes(),
        "onnxruntime_version": onnxruntime.__version__,
    }


def run(variant: str = "vit-b", repeats: int = 3, threads: int = 2, timeout: float = 3600) -> list[dict]:
    """The target-11 row, measured in a subprocess (the export's memory stays out of this process)."""
    name = "PosSAM (tiny config)" if variant == "tiny" else f"PosSAM-{variant[-1].upper()}"
    row = {"target": 11, "variant": variant, "goal": "reported", "pass": None}
    try:
        completed = subprocess.run(
            [sys.executable, str(HERE / "onnx_cpu.py"), "--variant", variant, "--repeats", str(repeats)]
            + ["--threads", str(threads)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        measured = json.loads(completed.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as error:  # reported, never hidden
        stderr = getattr(error, "stderr", "") or ""
        row.update(figure=f"onnxruntime vs PyTorch CPU, {name}", error=f"{type(error).__name__}: {stderr[-400:]}")
        return [row]
    size = measured["size"]
    row.update(
        figure=f"onnxruntime vs PyTorch CPU: {name} at {size}x{size}, fp32 forward, batch 1, 150 classes",
        ours=measured["onnxruntime"],
        reference=measured["pytorch"],
        reference_name="PyTorch eager",
        ratio=measured["pytorch"]["median_s"] / measured["onnxruntime"]["median_s"],
        measured=measured,
    )
    return [row]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="vit-b", choices=["vit-b", "tiny"])
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args()
    print(json.dumps(measure(args.variant, args.repeats, args.threads)))
