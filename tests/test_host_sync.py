"""
No host synchronization in the forward, MASE and the panoptic post-processing's device path (issue 15, item 4).

On a GPU, reading a tensor's value on the host (`.item()`, `bool(t)`, `.tolist()`, an op whose output size depends on
the data: `nonzero`, boolean-mask indexing, `unique`, `masked_select`, `bincount`, `repeat_interleave` without its
size) waits for every queued kernel. On CPU the same calls are visible to PyTorch's dispatcher: `HostSyncRecorder`
records them (and the host reads that never reach the dispatcher on CPU tensors: `.tolist()`, `.numpy()`, `.cpu()`),
with the value checks in the mode CUDA gets by default (`value_checks("async")`). What a CPU run cannot show, the
blocking host-to-device copies (also a stream synchronization on a GPU), the last tests record on fake tensors that
live on CUDA (`HostToDeviceRecorder`). Together they check on CPU what `torch.cuda.set_sync_debug_mode("error")`
would on a GPU; `benchmarks/device_check.py` runs that on a lent GPU.
"""

from __future__ import annotations

import collections
import copy
import traceback
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from transformers_possam import PosSAMForPanopticSegmentation, PosSAMImageProcessor, postprocessing, tiny_config
from transformers_possam.mase import mask_aware_selective_ensemble
from transformers_possam.value_checks import resolved_mode, value_checks

from .test_fcclip_parity import PADDED_SIZE, STUFF_IDS, common_kwargs, make_synthetic_outputs


# aten ops that read values on the host, or whose output shape depends on the values (computed on the host)
SYNCING_OPS = (
    "aten::_local_scalar_dense",  # .item(), bool(t), int(t), float(t), f"{t:.2f}"
    "aten::is_nonzero",
    "aten::item",
    "aten::nonzero",
    "aten::unique",
    "aten::_unique",
    "aten::masked_select",
    "aten::bincount",  # sizes its output from the largest value
    "aten::equal",
    "aten::allclose",
)
# Tensor methods that copy to the host without reaching the dispatcher on a CPU tensor
HOST_READS = {"tolist", "numpy", "cpu", "__array__"}


class HostSyncRecorder:
    """Records host synchronizations (name -> count, and where the first of each happened)."""

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()
        self.where: dict[str, str] = {}
        self.paused = False
        recorder = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func.name()
                syncs = name.startswith(SYNCING_OPS)
                if name.startswith(("aten::index.Tensor", "aten::index_put")):  # boolean masks -> nonzero
                    syncs = any(
                        torch.is_tensor(index) and index.dtype in (torch.bool, torch.uint8) for index in args[1]
                    )
                if name.startswith("aten::repeat_interleave") and kwargs.get("output_size") is None:
                    syncs = True
                if syncs:
                    recorder.record(name)
                return func(*args, **kwargs)

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", None) in HOST_READS:
                    recorder.record(f"Tensor.{func.__name__}")
                return func(*args, **(kwargs or {}))

        self._modes = (Functions(), Dispatch())

    def record(self, name: str) -> None:
        if self.paused:
            return
        self.counts[name] += 1
        self.where.setdefault(name, "".join(traceback.format_stack(limit=12)[:-3]))

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def report(self) -> str:
        return "\n".join(f"{name} x{count}, first at:\n{self.where[name]}" for name, count in self.counts.items())


def test_the_recorder_sees_each_kind_of_sync():
    """The recorder must catch what it is meant to catch, else the tests below could not fail."""
    values = torch.tensor([0.0, 1.0, 2.0])
    attempts = {
        "aten::_local_scalar_dense": [
            lambda: values[1].item(),
            lambda: bool(values[1] > 0),
            lambda: int(values[1]),
            lambda: float(values.sum()),
        ],
        "aten::nonzero": [lambda: torch.nonzero(values), lambda: values.nonzero()],
        "aten::index.Tensor": [lambda: values[values > 0]],
        "aten::index_put_": [lambda: values.clone().__setitem__(values > 0, 0.0)],
        "aten::_unique2": [lambda: torch.unique(values)],
        "aten::masked_select": [lambda: values.masked_select(values > 0)],
        "aten::bincount": [lambda: torch.bincount(values.long())],
        "aten::repeat_interleave.Tensor": [lambda: values.repeat_interleave(torch.tensor([1, 2, 0]))],
        "Tensor.tolist": [lambda: values.tolist()],
        "Tensor.numpy": [lambda: values.numpy()],
        "Tensor.cpu": [lambda: values.cpu()],
    }
    for expected, calls in attempts.items():
        for call in calls:
            with HostSyncRecorder() as recorder:
                call()
            assert any(name.startswith(expected) for name in recorder.counts), (expected, recorder.counts)
    with HostSyncRecorder() as recorder:  # fixed-shape device work: nothing recorded
        torch._assert_async((values >= 0).all(), "negative")
        torch.where(values > 0, values, 0.0).argmax().add(1)
        torch.zeros(3, dtype=torch.long).scatter_add_(0, values.long(), torch.ones(3, dtype=torch.long))
    assert not recorder.counts, recorder.report()


# ----------------------------------------------------------------------------------------------------------------------
# the forward


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PosSAMForPanopticSegmentation(tiny_config()).eval()


def model_inputs(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    synonym_mask = torch.rand(5, 2, generator=generator) > 0.4
    synonym_mask[:, 0] = True
    pixel_mask = torch.ones(2, size, size)
    pixel_mask[1, :, size // 2 :] = 0  # float 0/1: its values are checked
    return {
        "pixel_values": torch.randn(2, 3, size, size, generator=generator),
        "pixel_mask": pixel_mask,
        "class_embeddings": torch.randn(5, 2, model.config.clip_embed_dim, generator=generator),
        "synonym_mask": synonym_mask.int(),  # 0/1 integers: checked too
    }


def test_forward_with_precomputed_vocabulary_makes_no_host_sync(model):
    inputs = model_inputs(model)
    with torch.no_grad(), value_checks("async"), HostSyncRecorder() as recorder:
        outputs = model(**inputs)
    assert not recorder.counts, recorder.report()
    with torch.no_grad():  # the asynchronous checks change nothing in the results (the recorder: rounding)
        expected = model(**inputs)
    for name in ("class_queries_logits", "masks_queries_logits", "clip_class_logits", "iou_scores"):
        torch.testing.assert_close(outputs[name], expected[name])


def test_forward_with_default_vocabulary_makes_no_host_sync(model):
    generator = torch.Generator().manual_seed(3)
    buffer = model.default_class_embeddings
    saved = buffer.clone()
    try:
        buffer.copy_(torch.randn(buffer.shape, generator=generator))
        buffer[1, 1:] = 0  # a padding synonym slot
        inputs = model_inputs(model)
        with torch.no_grad(), value_checks("async"), HostSyncRecorder() as recorder:
            model(pixel_values=inputs["pixel_values"])
        assert not recorder.counts, recorder.report()
    finally:
        buffer.copy_(saved)


def test_eager_checks_are_the_default_on_cpu_and_async_ones_on_cuda(model):
    assert resolved_mode(torch.device("cpu")) == "eager"
    assert resolved_mode(torch.device("cuda", 0)) == "async"
    # checks whose caller reads the device right after (the training targets', before the matching): eager under
    # "auto" everywhere, asynchronous when asked
    assert resolved_mode(torch.device("cuda", 0), synchronizes_anyway=True) == "eager"
    with value_checks("async"):
        assert resolved_mode(torch.device("cuda", 0), synchronizes_anyway=True) == "async"
    assert resolved_mode(torch.device("mps")) == "eager"  # no asynchronous assert kernel there
    with value_checks("eager"):
        assert resolved_mode(torch.device("cuda")) == "eager"
    with value_checks("async"):
        assert resolved_mode(torch.device("cpu")) == "async"
    assert resolved_mode(torch.device("cpu")) == "eager"  # restored on exit
    with pytest.raises(ValueError, match="value_checks mode must be one of"):
        with value_checks("lazy"):  # type: ignore[arg-type]
            pass
    # by default (CPU: eager) a bad input reads on the host and says what is wrong; with the forward's eager
    # checks the detailed message, with the asynchronous ones (on CPU: raised at once) the short one
    inputs = model_inputs(model)
    inputs["pixel_values"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="pixel_values contains NaN or infinite values"):
        model(**inputs)
    with value_checks("async"), pytest.raises(RuntimeError, match="pixel_values contains NaN or infinite values"):
        model(**inputs)
    inputs = model_inputs(model)
    inputs["synonym_mask"][3] = 0
    with pytest.raises(ValueError, match=r"Classes \[3\] have no synonym"):
        model(**inputs)
    with value_checks("async"), pytest.raises(RuntimeError, match="A class has no synonym"):
        model(**inputs)
    inputs = model_inputs(model)
    inputs["class_embeddings"][2, 0] = 0
    with pytest.raises(ValueError, match=r"all-zero vectors at real synonym slots \(class, synonym\) \[\[2, 0\]\]"):
        model(**inputs)
    with value_checks("async"), pytest.raises(RuntimeError, match="all-zero vector at a real synonym slot"):
        model(**inputs)
    inputs = model_inputs(model)
    inputs["pixel_mask"][0, 0, 0] = 0.5
    with pytest.raises(ValueError, match=r"pixel_mask must be bool or hold only 0 and 1.*values like \[0.5\]"):
        model(**inputs)
    with value_checks("async"), pytest.raises(RuntimeError, match="pixel_mask must be bool or hold only 0 and 1"):
        model(**inputs)


# ----------------------------------------------------------------------------------------------------------------------
# MASE and the panoptic post-processing


def test_mase_makes_no_host_sync():
    generator = torch.Generator().manual_seed(0)
    ldp = torch.rand(2, 20, 12, generator=generator).softmax(-1)
    clip = torch.rand(2, 20, 12, generator=generator).softmax(-1)
    seen = torch.rand(12, generator=generator) > 0.5
    for iou in (torch.rand(2, 20, generator=generator), None):
        with HostSyncRecorder() as recorder:
            mask_aware_selective_ensemble(ldp, clip, iou, seen, 0.4, 0.8)
        assert not recorder.counts, recorder.report()


def coco_like_outputs(batch=2, queries=100, classes=133, objects=25, size=256, seed=0):
    """
    Model-shaped outputs at COCO panoptic's size: 133 classes, masks at 1/4 of SAM's 1024 x 1024 input, `objects`
    confident queries with blob masks (smooth borders, overlapping), the rest confidently void.
    """
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(batch, queries, classes + 1, generator=generator)
    class_logits[:, objects:, -1] += 8.0
    labels = torch.randint(0, classes, (batch, objects), generator=generator)
    labels[:, : objects // 2] = torch.randint(80, 84, (batch, objects // 2), generator=generator)  # repeated stuff
    class_logits[:, :objects].scatter_add_(-1, labels[..., None], torch.full((batch, objects, 1), 8.0))
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.rand(batch, queries, 2, generator=generator) * size * 0.75
    radii = 8 + torch.rand(batch, queries, 1, 1, generator=generator) * 70
    distance = ((ys - centres[..., 0, None, None]) ** 2 + (xs - centres[..., 1, None, None]) ** 2).sqrt()
    noise = torch.randn(batch, queries, size // 8, size // 8, generator=generator)
    noise = torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    return SimpleNamespace(
        class_queries_logits=class_logits,
        clip_class_logits=torch.randn(batch, queries, classes, generator=generator) + 3 * (class_logits[..., :-1] > 5),
        masks_queries_logits=(radii - distance) / 4 + noise,
        iou_scores=torch.rand(batch, queries, generator=generator),
    )


@pytest.fixture()
def counted_fetches(monkeypatch):
    """The device-to-host transfers of the dense path; the recorder (when one is active) pauses during each."""
    fetches = []
    original = postprocessing._fetch_to_host

    def fetch(values):
        recorder = fetches[0] if fetches and isinstance(fetches[0], HostSyncRecorder) else None
        if recorder is not None:
            recorder.paused = True
        try:
            fetches.append(values.shape)
            return original(values)
        finally:
            if recorder is not None:
                recorder.paused = False

    monkeypatch.setattr(postprocessing, "_fetch_to_host", fetch)
    return fetches


COCO_SIZES = {"target_sizes": [(480, 640), (427, 640)], "reshaped_input_sizes": [(768, 1024), (683, 1024)]}


def test_panoptic_dense_path_makes_one_transfer_and_no_other_sync(counted_fetches):
    processor = PosSAMImageProcessor()
    outputs = coco_like_outputs(queries=40, objects=12)
    arguments = dict(label_ids_to_fuse=list(range(80, 133)), seen_mask=[True] * 100 + [False] * 33, **COCO_SIZES)
    recorder = HostSyncRecorder()
    counted_fetches.append(recorder)
    with value_checks("async"), recorder:
        results = processor.post_process_panoptic_segmentation(outputs, dense_assignment=True, **arguments)
    assert not recorder.counts, recorder.report()
    assert len(counted_fetches) == 2  # the recorder, then exactly one transfer for the whole batch
    assert [result["segmentation"].shape for result in results] == [(480, 640), (427, 640)]
    assert all(result["segments_info"] for result in results)
    # the CPU path (the cell-bound assignment) reads values on the host: the recorder sees it
    with value_checks("async"), HostSyncRecorder() as recorder:
        processor.post_process_panoptic_segmentation(outputs, dense_assignment=False, **arguments)
    assert recorder.counts


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.99])
def test_dense_and_cell_bound_paths_agree_on_coco_sized_outputs(threshold):
    processor = PosSAMImageProcessor()
    outputs = coco_like_outputs()
    for fuse in ([], list(range(80, 133))):
        arguments = dict(threshold=threshold, label_ids_to_fuse=fuse, **COCO_SIZES)
        sparse = processor.post_process_panoptic_segmentation(outputs, dense_assignment=False, **arguments)
        dense = processor.post_process_panoptic_segmentation(outputs, dense_assignment=True, **arguments)
        for ours, theirs in zip(dense, sparse, strict=True):
            assert ours["segments_info"] == theirs["segments_info"]
            assert ours["segmentation"].dtype == torch.int32
            assert torch.equal(ours["segmentation"], theirs["segmentation"])
        if threshold == 0.0:
            assert sum(len(result["segments_info"]) for result in dense) >= 6
            if fuse:
                assert any(info["was_fused"] for result in dense for info in result["segments_info"])


@pytest.mark.parametrize("count", ["_count_by_histogram", "_count_by_scatter"])
def test_both_pixel_counters_equal_bincount(count):
    """The dense path's fixed-size pixel counts per query (histc on CUDA, scatter elsewhere), against `bincount` with
    the left-out id dropped: ids at both ends, a query with no pixel, one holding 17 million pixels (beyond float32's
    exact integers: a float32 histogram would stop counting at 2**24)."""
    counter = getattr(postprocessing, count)
    generator = torch.Generator().manual_seed(0)
    num_queries = 250
    ids = torch.randint(0, num_queries + 1, (20_000_000,), generator=generator)
    ids[ids == 17] = 3  # query 17 wins nothing
    ids[:17_000_000] = num_queries - 1  # the last query holds most of the map
    ids[:5] = 0
    ids[5:10] = num_queries  # left out
    expected = torch.bincount(ids, minlength=num_queries + 1)[:num_queries]
    counts = counter(ids.int(), num_queries)  # the dense path passes int64 ids; int32 counts the same
    assert counts.dtype == torch.int64 and counts.shape == (num_queries,)
    assert torch.equal(counts, expected) and counts[17] == 0
    assert torch.equal(counter(ids, num_queries), expected)


def test_dense_path_with_the_histogram_counter_agrees_with_the_cell_bound_path(monkeypatch):
    """The counter the dense path uses on CUDA (`histc`), run on the CPU, gives the cell-bound path's segments."""
    monkeypatch.setattr(postprocessing, "_pixels_per_query", postprocessing._count_by_histogram)
    processor = PosSAMImageProcessor()
    outputs = coco_like_outputs()
    arguments = dict(label_ids_to_fuse=list(range(80, 133)), **COCO_SIZES)
    sparse = processor.post_process_panoptic_segmentation(outputs, dense_assignment=False, **arguments)
    dense = processor.post_process_panoptic_segmentation(outputs, dense_assignment=True, **arguments)
    for ours, theirs in zip(dense, sparse, strict=True):
        assert ours["segments_info"] == theirs["segments_info"] and ours["segments_info"]
        assert torch.equal(ours["segmentation"], theirs["segmentation"])


def test_the_transfer_stages_on_the_host_under_a_cuda_device_context():
    """The one transfer's page-locked staging buffer is made on the host also inside `with torch.device("cuda")` (the
    benchmarks build and run models so): a bare `torch.empty(..., pin_memory=True)` would be a CUDA tensor there,
    which PyTorch refuses to pin. Recorded at the call (this machine has no CUDA to pin for); the staged copy out was
    measured on an H200 (benchmarks/results-gpu-candidates-h200.json)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class Staged(Exception):
        pass

    calls = []

    class StagingSpy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.empty and kwargs.get("pin_memory"):
                calls.append(kwargs)
                raise Staged
            return func(*args, **kwargs)

    with FakeTensorMode(allow_non_fake_inputs=True):
        values = torch.zeros(8, dtype=torch.int32).to("cuda")
        # the device context entered last handles each call first (adding its device where none is given), then
        # hands it to the spy
        with StagingSpy(), torch.device("cuda"), pytest.raises(Staged):
            postprocessing._fetch_to_host(values)
    (staging,) = calls
    assert torch.device(staging["device"]).type == "cpu" and staging["dtype"] == torch.int32


def test_dense_path_is_the_default_off_cpu(monkeypatch):
    """Not on a CPU tensor: the dense path; asked for explicitly, either."""
    processor = PosSAMImageProcessor(size={"longest_edge": 128}, pad_size={"height": 128, "width": 128})
    outputs = make_synthetic_outputs()
    calls = []
    original = postprocessing.PosSAMPostProcessingMixin._panoptic_dense

    def recording(self, *args, **kwargs):
        calls.append(True)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(postprocessing.PosSAMPostProcessingMixin, "_panoptic_dense", recording)
    processor.post_process_panoptic_segmentation(outputs, **common_kwargs())
    assert calls == []  # CPU: the cell-bound path
    processor.post_process_panoptic_segmentation(outputs, dense_assignment=True, **common_kwargs())
    assert calls == [True]
    with pytest.raises(TypeError, match="dense_assignment must be True or False"):
        processor.post_process_panoptic_segmentation(outputs, dense_assignment="yes", **common_kwargs())


def test_dense_path_warns_when_the_threshold_removed_everything(caplog):
    processor = PosSAMImageProcessor(
        size={"longest_edge": PADDED_SIZE[0]}, pad_size=dict(zip(("height", "width"), PADDED_SIZE))
    )
    outputs = make_synthetic_outputs()
    for dense in (False, True):
        caplog.clear()
        with caplog.at_level("WARNING"):
            results = processor.post_process_panoptic_segmentation(
                outputs, threshold=1.0, dense_assignment=dense, label_ids_to_fuse=list(STUFF_IDS), **common_kwargs()
            )
        assert all(result["segments_info"] == [] for result in results)
        assert all(np.all(result["segmentation"].numpy() == 0) for result in results)
        assert "removed every segment" in caplog.text


def test_dense_path_with_no_query():
    processor = PosSAMImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    outputs = SimpleNamespace(
        masks_queries_logits=torch.zeros(1, 0, 16, 16),
        class_queries_logits=torch.zeros(1, 0, 4),
        clip_class_logits=None,
        iou_scores=None,
    )
    for dense in (False, True):
        (result,) = processor.post_process_panoptic_segmentation(
            outputs, target_sizes=[(30, 20)], dense_assignment=dense
        )
        assert result["segments_info"] == [] and result["segmentation"].shape == (30, 20)
        assert not result["segmentation"].any()


def test_dense_and_cell_bound_paths_agree_on_model_outputs(model):
    """The tiny model's own outputs (soft, overlapping masks), post-processed end to end by both paths."""
    size = model.config.vision_config.image_size
    processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    with torch.no_grad():
        outputs = model(**model_inputs(model, seed=5))
    arguments = {
        "target_sizes": [(90, 120), (200, 150)],
        "reshaped_input_sizes": [(96, 128), (128, 96)],
        "label_ids_to_fuse": [3, 4],
        "seen_mask": [True, True, False, True, False],
    }
    sparse = processor.post_process_panoptic_segmentation(outputs, dense_assignment=False, **arguments)
    dense = processor.post_process_panoptic_segmentation(outputs, dense_assignment=True, **arguments)
    assert sum(len(result["segments_info"]) for result in sparse) >= 2
    for ours, theirs in zip(dense, sparse, strict=True):
        assert ours["segments_info"] == theirs["segments_info"]
        assert torch.equal(ours["segmentation"], theirs["segmentation"])


# ----------------------------------------------------------------------------------------------------------------------
# the same on a (fake) CUDA device: host-to-device copies


class HostToDeviceRecorder(TorchDispatchMode):
    """
    Records what a CPU run cannot show: blocking host-to-device copies (`torch.tensor(values, device=cuda)`,
    `.to(cuda)`) and device ops handed CPU tensors of one or more dimensions (e.g. a CUDA tensor indexed with a CPU
    index tensor, which PyTorch copies over first). On a GPU each is a copy followed by a stream synchronization, which
    `torch.cuda.set_sync_debug_mode("error")` reports. Run inside a `FakeTensorMode` whose tensors say they live on
    CUDA (no GPU needed: fake tensors carry shapes and devices only). Reads of device values (`.item()`, `nonzero`)
    fail there on their own: a fake tensor has no values.
    """

    def __init__(self):
        super().__init__()
        self.copies: collections.Counter[str] = collections.Counter()
        self.where: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        found = None
        if name.startswith(("aten::_to_copy", "aten::copy_")):
            if name.startswith("aten::copy_"):
                source, target = args[1], args[0].device
                non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            else:
                source, target = args[0], torch.device(kwargs.get("device") or args[0].device)
                non_blocking = kwargs.get("non_blocking", False)
            if source.device.type == "cpu" and target.type != "cpu" and not non_blocking:
                found = f"{name}: blocking copy of {tuple(source.shape)} to {target}"
        else:
            # any CPU tensor, 0-dim ones too: `where`, `index_put_` (`x[mask] = True`) copy them over with `.to`
            tensors = [leaf for leaf in torch.utils._pytree.tree_leaves((args, kwargs)) if torch.is_tensor(leaf)]
            if any(t.device.type != "cpu" for t in tensors):
                host = [tuple(t.shape) for t in tensors if t.device.type == "cpu"]
                if host:
                    found = f"{name}: device op given CPU tensors {host}"
        if found:
            self.copies[found] += 1
            self.where.setdefault(found, "".join(traceback.format_stack(limit=10)[:-2]))
        return func(*args, **kwargs)

    def report(self) -> str:
        return "\n".join(f"{name} x{count}, first at:\n{self.where[name]}" for name, count in self.copies.items())


@pytest.fixture(scope="module")
def fake_cuda():
    """The tiny model and its inputs as fake tensors on `cuda` (built on the CPU, moved inside the fake mode)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    real = PosSAMForPanopticSegmentation(tiny_config()).eval()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = real.to("cuda")
        inputs = {name: value.to("cuda") for name, value in model_inputs(real).items()}
    return SimpleNamespace(mode=mode, model=model, inputs=inputs)


def test_the_host_to_device_recorder_sees_each_kind_of_copy(fake_cuda):
    """Positive controls: the recorder must see the copies it is meant to catch, and not the copies that wait for
    nothing (`non_blocking=True`) or device-made constants."""
    with fake_cuda.mode:
        values = torch.zeros(8, device="cuda")
        attempts = {
            "torch.tensor(values, device=cuda)": lambda: torch.tensor([1.0, 2.0], device="cuda"),
            "torch.as_tensor(list, device=cuda)": lambda: torch.as_tensor([[1, 2]], device="cuda"),
            ".to(cuda)": lambda: torch.arange(3).to("cuda"),
            "a CPU index": lambda: values[torch.arange(3)],
            "a CPU index written to": lambda: values.index_put_((torch.arange(3),), torch.ones(3, device="cuda")),
            "a Python value written through a device index": lambda: values.__setitem__(
                torch.arange(3, device="cuda"), True
            ),
            "a 0-dim CPU tensor in where": lambda: torch.where(values > 0, values, torch.tensor(0.0)),
        }
        for description, attempt in attempts.items():
            with HostToDeviceRecorder() as recorder:
                attempt()
            assert recorder.copies, description
        with HostToDeviceRecorder() as recorder:
            torch.arange(3).to("cuda", non_blocking=True)
            values[:3].copy_(torch.ones(3), non_blocking=True)
            values[torch.arange(3, device="cuda")] + 2.0  # a Python number is an argument, not a tensor
            values.index_fill_(0, torch.arange(3, device="cuda"), True)
            torch.full((2,), 0.5, device="cuda")
        assert not recorder.copies, recorder.report()


def test_forward_on_cuda_makes_no_host_to_device_copy(fake_cuda):
    """The forward with a precomputed vocabulary and with the default one, on (fake) CUDA tensors."""
    with fake_cuda.mode, torch.no_grad():
        with HostToDeviceRecorder() as recorder:
            outputs = fake_cuda.model(**fake_cuda.inputs)
        assert not recorder.copies, recorder.report()
        assert outputs.masks_queries_logits.device.type == "cuda"
        with HostToDeviceRecorder() as recorder:
            fake_cuda.model(pixel_values=fake_cuda.inputs["pixel_values"])
        assert not recorder.copies, recorder.report()


def test_panoptic_post_processing_on_cuda_copies_nothing_before_its_one_transfer(fake_cuda, monkeypatch):
    """MASE and the dense panoptic path on (fake) CUDA outputs, up to their one device-to-host transfer (which needs
    values, so the fake run stops there)."""

    class Fetched(Exception):
        pass

    def fetch(values):
        raise Fetched

    monkeypatch.setattr(postprocessing, "_fetch_to_host", fetch)
    size = fake_cuda.model.config.vision_config.image_size
    processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    with fake_cuda.mode, torch.no_grad():
        outputs = fake_cuda.model(**fake_cuda.inputs)
        with HostToDeviceRecorder() as recorder, pytest.raises(Fetched):
            processor.post_process_panoptic_segmentation(
                outputs,
                target_sizes=[(90, 120), (200, 150)],
                label_ids_to_fuse=[3, 4],
                seen_mask=[True] * 3 + [False] * 2,
            )
    assert not recorder.copies, recorder.report()


def test_bf16_forward_on_cuda_runs_its_cuda_branches_and_copies_nothing():
    """`from_pretrained(..., dtype=torch.bfloat16)` on a GPU takes branches a CPU run never takes (SAM attention in
    one SDPA call, transformers' deformable sampler in float32, the fused-kernel head-size padding): on fake CUDA
    tensors, whose ops check devices and dtypes as CUDA would, the bf16 forward runs, returns bf16 mask logits and
    makes no host-to-device copy."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from transformers_possam.modeling.sam_attention import _cached_key_grid_one_hot, _relative_position_index

    _relative_position_index.cache_clear()
    _cached_key_grid_one_hot.cache_clear()
    torch.manual_seed(0)
    real = PosSAMForPanopticSegmentation(tiny_config()).eval()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        model = real.to("cuda", torch.bfloat16)
        inputs = {name: value.to("cuda") for name, value in model_inputs(real).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        with HostToDeviceRecorder() as recorder:
            outputs = model(**inputs)
    assert not recorder.copies, recorder.report()
    # fake tensors never enter the cache of SAM's relative-position index grids (real runs would read them)
    assert _relative_position_index.cache_info().currsize == _cached_key_grid_one_hot.cache_info().currsize == 0
    assert outputs.masks_queries_logits.dtype == torch.bfloat16
    assert outputs.masks_queries_logits.device.type == "cuda"


@pytest.mark.parametrize(
    ("device", "non_blocking"),
    [("cuda", True), ("meta", False), ("cpu", False)],
)  # "meta" stands for the devices other than CUDA (this PyTorch build cannot make even fake MPS tensors): on MPS a
# non-blocking copy from a temporary host tensor can read freed memory (PyTorch #139550, #189690)
def test_to_device_copies_host_data_to_cuda_without_waiting_and_elsewhere_as_before(device, non_blocking):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from transformers_possam.device_transfer import to_device

    copies = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.name().startswith("aten::_to_copy"):
                copies.append(kwargs.get("non_blocking", False))
            return func(*args, **kwargs)

    with FakeTensorMode(allow_non_fake_inputs=True), Copies():
        moved = to_device(torch.arange(4), device)
    assert moved.device.type == device
    assert copies == ([] if device == "cpu" else [non_blocking])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_pixel_decoder_encoder_layer_trains_without_host_sync_as_transformers(dropout):
    """
    transformers' encoder layer, in training, reads `torch.isfinite(x).all()` on the host in every layer and step
    (a GPU synchronization) to decide whether to clamp. PosSAM's layer clamps always (a no-op on finite values):
    no host read, and the same outputs and gradients as transformers' layer on the same weights and dropout draws;
    a non-finite output is clamped as transformers clamps it.
    """
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoderEncoderLayer

    from transformers_possam import tiny_config
    from transformers_possam.modeling.fast_paths import take_over
    from transformers_possam.modeling.pixel_decoder_encoder import PosSAMPixelDecoderEncoderLayer

    config = tiny_config(dropout=dropout).mask2former_config
    torch.manual_seed(0)
    reference = Mask2FormerPixelDecoderEncoderLayer(config).train()
    ours = take_over(reference, PosSAMPixelDecoderEncoderLayer, config).train()
    shapes = [(2, 2), (4, 4), (8, 8)]  # the three levels the layer attends over
    tokens = sum(h * w for h, w in shapes)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, tokens, config.feature_size, generator=generator, requires_grad=True)
    arguments = {
        "attention_mask": torch.zeros(2, tokens, dtype=torch.bool),
        "position_embeddings": torch.randn(2, tokens, config.feature_size, generator=generator),
        "reference_points": torch.rand(2, tokens, len(shapes), 2, generator=generator),
        "spatial_shapes_list": shapes,
    }
    outputs = []
    for layer in (ours, reference):
        torch.manual_seed(2)  # the same dropout draws
        with HostSyncRecorder() as recorder:
            (output,) = layer(hidden, **arguments)
        outputs.append((output, recorder.counts, torch.autograd.grad(output.square().sum(), hidden)[0]))
    (found, our_syncs, our_grad), (expected, their_syncs, their_grad) = outputs
    assert not our_syncs, our_syncs
    assert their_syncs  # the recorder sees transformers' read: the check above could fail
    assert torch.equal(found, expected) and torch.equal(our_grad, their_grad)
    # a value driven to infinity: both clamp it to the largest float
    with torch.no_grad():
        ours.final_layer_norm.bias[0] = float("inf")
        torch.manual_seed(2)
        (clamped,) = ours(hidden, **arguments)
        torch.manual_seed(2)
        (transformers_clamped,) = reference(hidden, **arguments)
    assert torch.equal(clamped, transformers_clamped) and clamped[..., 0].eq(torch.finfo(torch.float32).max).all()


# ----------------------------------------------------------------------------------------------------------------------
# training: the forward with targets and the loss


def training_targets(size: int, seed: int = 1) -> dict:
    """Per image uint8 0/1 masks (the processor's dtype) and class indices into `model_inputs`' 5 classes."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "mask_labels": [
            (torch.rand(count, size, size, generator=generator) > 0.5).to(torch.uint8) for count in (3, 2)
        ],
        "class_labels": [torch.tensor([0, 2, 4]), torch.tensor([1, 3])],
    }


@pytest.fixture(scope="module")
def training_model():
    torch.manual_seed(0)
    return PosSAMForPanopticSegmentation(tiny_config()).train()


def test_training_forward_reads_the_device_once_per_matching(training_model, monkeypatch):
    """
    With the checks CUDA runs (`value_checks("async")`), the training forward and loss read device values on the
    host only where the Hungarian matching must (scipy): once per matched layer, all images in one transfer (the
    targets' value checks, Mask2Former's per-image cost-matrix reads and its host indices would add one each).
    """
    from transformers_possam.modeling import loss as loss_module

    transfers = []
    read = loss_module._read_on_host

    def counted(values):
        transfers.append(tuple(values.shape))
        return read(values)

    monkeypatch.setattr(loss_module, "_read_on_host", counted)
    model = training_model
    inputs = {**model_inputs(model), **training_targets(model.config.vision_config.image_size)}
    with value_checks("async"), HostSyncRecorder() as recorder:
        outputs = model(**inputs)
    # the final prediction and every auxiliary one (the learnable queries' and each earlier decoder layer's)
    layers = 1 + len(outputs.auxiliary_logits)
    assert layers == model.config.decoder_layers and len(transfers) == layers, transfers
    # each transfer holds both images' (Q, N_i) cost matrices
    assert set(transfers) == {(model.config.num_queries * 5,)}
    assert dict(recorder.counts) == {"Tensor.cpu": layers, "Tensor.numpy": layers}, recorder.report()
    assert torch.isfinite(outputs.loss)


def test_training_forward_on_cuda_makes_no_host_to_device_copy(training_model, monkeypatch):
    """
    The training forward and loss on (fake) CUDA tensors, as `training/train.py` runs them: device checks as CUDA's
    (a CPU tensor mixed in raises or is recorded), no blocking host-to-device copy (Mask2Former's matcher returns host
    indices that every loss then copies over). Fake tensors have no values, so the matching's host read returns
    random costs of the right shape; the rest of the matching (scipy, the indices' copy back) runs as on a GPU.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from transformers_possam.modeling import loss as loss_module

    rng = np.random.default_rng(0)
    monkeypatch.setattr(loss_module, "_read_on_host", lambda values: rng.random(values.shape, dtype=np.float32))
    real = copy.deepcopy(training_model)  # moved to the fake device in place
    targets = training_targets(real.config.vision_config.image_size)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = real.to("cuda")
        inputs = {name: value.to("cuda") for name, value in model_inputs(real).items()}
        labels = {name: [value.to("cuda") for value in values] for name, values in targets.items()}
        # the targets' checks asynchronous, as `value_checks("async")` asks (by default they read the device)
        with value_checks("async"), HostToDeviceRecorder() as recorder:
            outputs = model(**inputs, **labels)
    assert not recorder.copies, recorder.report()
    assert outputs.loss.device.type == "cuda" and outputs.loss.shape == ()
    assert all(value.device.type == "cuda" for value in outputs.loss_dict.values())
    with FakeTensorMode(allow_non_fake_inputs=True):
        # class ids from the host, as Mask2Former accepts them: copied over once, without waiting
        with value_checks("async"), HostToDeviceRecorder() as recorder:
            outputs = model(**inputs, mask_labels=labels["mask_labels"], class_labels=targets["class_labels"])
        assert not recorder.copies, recorder.report()
        assert outputs.loss.device.type == "cuda"
        # masks left on the host: an error that says what to do (not a device mismatch inside the loss)
        with pytest.raises(ValueError, match=r"Image 0: mask_labels are on cpu, pixel_values on cuda:0: move"):
            model(**inputs, mask_labels=targets["mask_labels"], class_labels=labels["class_labels"])


@pytest.mark.parametrize(
    ("targets", "detailed", "short"),
    [
        # 0/255 masks: the dice loss would be near zero, silently
        (
            lambda t: {**t, "mask_labels": [t["mask_labels"][0] * 255, t["mask_labels"][1]]},
            r"Image 0: mask_labels must be bool or hold only 0 and 1, got \d+ other values \(e.g. \[255, 255, 255\]\)",
            "Image 0: mask_labels must be bool or hold only 0 and 1",
        ),
        # soft float masks
        (
            lambda t: {**t, "mask_labels": [t["mask_labels"][0], t["mask_labels"][1].float() * 0.5]},
            r"Image 1: mask_labels must be bool or hold only 0 and 1, got \d+ other values \(e.g. \[0.5, 0.5, 0.5\]\)",
            "Image 1: mask_labels must be bool or hold only 0 and 1",
        ),
        # a class id past the 5 classes of the vocabulary
        (
            lambda t: {**t, "class_labels": [t["class_labels"][0], torch.tensor([1, 5])]},
            r"Image 1: class_labels must index the 5 classes of the vocabulary, got values in \[1, 5\]",
            "Image 1: class_labels must index the 5 classes of the vocabulary",
        ),
        # a negative class id (e.g. an ignore label of -1 left in)
        (
            lambda t: {**t, "class_labels": [torch.tensor([-1, 2, 4]), t["class_labels"][1]]},
            r"Image 0: class_labels must index the 5 classes of the vocabulary, got values in \[-1, 4\]",
            "Image 0: class_labels must index the 5 classes of the vocabulary",
        ),
    ],
)
def test_bad_training_targets_are_refused_in_both_check_modes(training_model, targets, detailed, short):
    """Eager checks (the default, on CUDA too: the matching reads the device right after) name the image and the
    values; the asynchronous ones (`value_checks("async")`, raised at once on CPU) say what is wrong without reading
    the values."""
    model = training_model
    inputs = {**model_inputs(model), **targets(training_targets(model.config.vision_config.image_size))}
    with pytest.raises(ValueError, match=detailed):
        model(**inputs)
    with value_checks("async"), pytest.raises(RuntimeError, match=short):
        model(**inputs)


# ----------------------------------------------------------------------------------------------------------------------
# semantic post-processing


@pytest.mark.parametrize("return_segmentation_scores", [False, True])
def test_semantic_post_processing_reads_the_device_only_for_its_results(return_segmentation_scores, monkeypatch):
    """FC-CLIP's semantic inference at COCO's sizes: the bands' row ranges are read from a matrix made on the host
    from the sizes alone (on CPU the recorder cannot tell host from device tensors: it pauses there, and the reads
    are checked to be of a host tensor), so the one host read per image is its result's transfer (two with the class
    maps). The next test runs the same on (fake) CUDA outputs, where a read of a device value would raise."""
    processor = PosSAMImageProcessor()
    outputs = coco_like_outputs(queries=40, objects=12)
    recorder = HostSyncRecorder()
    row_bands = postprocessing._row_bands

    def paused_row_bands(rows, band):
        assert rows.device.type == "cpu" and not rows.requires_grad
        recorder.paused = True
        try:
            return row_bands(rows, band)
        finally:
            recorder.paused = False

    monkeypatch.setattr(postprocessing, "_row_bands", paused_row_bands)
    with value_checks("async"), recorder:
        results = processor.post_process_semantic_segmentation(
            outputs,
            seen_mask=[True] * 100 + [False] * 33,
            return_segmentation_scores=return_segmentation_scores,
            **COCO_SIZES,
        )
    transfers = 2 * (2 if return_segmentation_scores else 1)
    assert dict(recorder.counts) == {"Tensor.cpu": transfers}, recorder.report()
    maps = [result["segmentation"] for result in results] if return_segmentation_scores else results
    assert [tuple(labels.shape) for labels in maps] == [(480, 640), (427, 640)]
    assert all(labels.unique().numel() > 3 for labels in maps)


def test_semantic_and_instance_post_processing_on_cuda_copy_nothing_over(fake_cuda, monkeypatch):
    """On (fake) CUDA outputs, semantic post-processing and the instance path's class filter copy no host data to
    the device with a blocking copy, and semantic post-processing reads no device value but the results' (a fake
    tensor has none: reading one raises). The host-side helpers' host calls, which see sizes only, run on real host
    tensors (in a fake mode every new tensor is fake, and has no values either)."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, unset_fake_temporarily

    def on_the_host(argument) -> bool:
        if torch.is_tensor(argument):
            return argument.device.type == "cpu"
        return not isinstance(argument, (str, torch.device)) or torch.device(argument).type == "cpu"

    def really(function):
        def run(*arguments):
            if not all(on_the_host(argument) for argument in arguments):
                return function(*arguments)  # the device's own copy: fake
            with unset_fake_temporarily():
                return function(*arguments)

        return run

    monkeypatch.setattr(postprocessing, "resize_matrix", really(postprocessing.resize_matrix))
    monkeypatch.setattr(postprocessing, "_row_bands", really(postprocessing._row_bands))
    size = fake_cuda.model.config.vision_config.image_size
    processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    with fake_cuda.mode, torch.no_grad():
        outputs = fake_cuda.model(**fake_cuda.inputs)
        with HostToDeviceRecorder() as recorder:
            results = processor.post_process_semantic_segmentation(outputs, target_sizes=[(90, 120), (200, 150)])
        assert not recorder.copies, recorder.report()
        assert [tuple(labels.shape) for labels in results] == [(90, 120), (200, 150)]
        assert all(labels.device.type == "cpu" for labels in results)
        # the instance path reads values by nature (its top pairs' queries: a boolean selection, then `unique`);
        # up to its first read (which raises on fake tensors), its thing-class filter copies nothing over
        with HostToDeviceRecorder() as recorder, pytest.raises(DynamicOutputShapeException):
            processor.post_process_instance_segmentation(outputs, thing_label_ids=[1, 3])
        assert not recorder.copies, recorder.report()


def test_training_targets_values_are_checked_after_the_forward_just_before_the_loss(training_model, monkeypatch):
    """The forward never reads the targets: their value checks run after it, right before the matching, so on a GPU
    a check that reads the device waits for nothing the matching would not wait for (run first, it would drain the
    queue before the forward was even queued)."""
    model = training_model
    events = []
    handle = model.model.register_forward_hook(lambda *args: events.append("mask generator"))
    check = type(model)._check_label_values
    monkeypatch.setattr(
        type(model), "_check_label_values", staticmethod(lambda *args: (events.append("values"), check(*args)))
    )
    try:
        inputs = {**model_inputs(model), **training_targets(model.config.vision_config.image_size)}
        model(**inputs)
    finally:
        handle.remove()
    assert events == ["mask generator", "values"]


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.uint16, torch.uint32])
def test_training_class_ids_of_any_integer_dtype_give_the_int64_loss(training_model, dtype):
    """Any integer dtype of class ids trains as int64 ids would (uint16 / uint32 have few kernels: the checks read
    them as int64)."""
    model = training_model
    targets = training_targets(model.config.vision_config.image_size)
    inputs = model_inputs(model)
    losses = []
    for labels in ([labels.to(dtype) for labels in targets["class_labels"]], targets["class_labels"]):
        torch.manual_seed(5)  # the same point draws
        with torch.no_grad():
            losses.append(model(**inputs, mask_labels=targets["mask_labels"], class_labels=labels).loss)
    assert torch.equal(*losses)


def test_instance_post_processing_reads_the_device_a_fixed_number_of_times_per_image():
    """Instance post-processing reads values by nature (its top pairs' queries, the kept pairs' order), but a fixed
    number of times per image, not per instance: the segments' labels and scores come back in one transfer each
    (reading them one by one made two device synchronizations per instance, 200 per image at the default 100)."""
    processor = PosSAMImageProcessor()
    outputs = coco_like_outputs(queries=40, objects=12)
    counts = {}
    for instances in (10, 100):
        with value_checks("async"), HostSyncRecorder() as recorder:
            results = processor.post_process_instance_segmentation(outputs, num_top_instances=instances, **COCO_SIZES)
        assert [len(result["segments_info"]) for result in results] == [instances, instances]
        counts[instances] = dict(recorder.counts)
    assert counts[10] == counts[100], counts
    # per image, with the defaults: unique, nonzero, three lists, the map's transfer
    assert sum(counts[100].values()) == 2 * 6, counts
    # the thing-class filter selects the top pairs with one read (three boolean selections made three)
    with value_checks("async"), HostSyncRecorder() as recorder:
        processor.post_process_instance_segmentation(outputs, thing_label_ids=list(range(80)), **COCO_SIZES)
    assert sum(recorder.counts.values()) == 2 * 7, recorder.report()
