"""
The training stream read by DataLoader workers (`PanopticTrainStream.batches`, `--dataloader_num_workers`) and resumed
from its own state: workers read disjoint parts of the process's shard that together are all of it, batches come in a
fixed order, resume is exact without re-reading the consumed rows, bad rows are counted over all workers.
"""

import pytest
import torch
from datasets import Dataset

from transformers_possam import PosSAMImageProcessor
from transformers_possam.data import TooManyBadSamples, toy_panoptic_rows
from transformers_possam.data.stream import PanopticTrainStream, ReaderPosition, load_panoptic_dataset


LABELS = {i: i for i in range(6)}


def processor():
    return PosSAMImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})


def toy_dataset(count, num_shards, broken=()):
    rows = list(toy_panoptic_rows(count))
    for index in broken:
        rows[index] = dict(rows[index], image={"bytes": b"broken", "path": None})
    return Dataset.from_list(rows).to_iterable_dataset(num_shards=num_shards)


def stream_of(dataset, **kwargs):
    kwargs = {"augment": False, "shuffle_buffer": 0, **kwargs}
    return PanopticTrainStream(dataset, processor(), LABELS, **kwargs)


def one_epoch_ids(stream, reader, num_readers):
    """The image ids reader `reader` of `num_readers` reads in epoch 0 (in this process, as a worker would)."""
    position, ids = ReaderPosition(), []
    for _, image_id in stream._read(position, reader, num_readers):
        if position.epoch > 0:
            return ids
        ids.append(image_id)
    raise AssertionError("unreachable: the stream is endless")


@pytest.mark.parametrize(
    "num_shards, world_size, num_readers",
    [
        (8, 2, 2),  # whole shards per process and per reader
        (6, 2, 4),  # fewer shards (3 per process) than readers: each reader takes every 4th row of each shard
        (3, 2, 2),  # shard count not divisible by the processes: every 2nd row per process, shards per reader
        (5, 1, 3),  # uneven shards per reader
    ],
)
def test_readers_read_disjoint_parts_that_make_up_the_whole_shard(num_shards, world_size, num_readers):
    dataset = toy_dataset(24, num_shards)
    every_id = [f"toy_train_{i:05d}" for i in range(24)]
    read = []
    for rank in range(world_size):
        for shuffle_buffer in (0, 4):  # in order and shuffled: the same rows
            stream = stream_of(dataset, rank=rank, world_size=world_size, shuffle_buffer=shuffle_buffer)
            parts = [one_epoch_ids(stream, reader, num_readers) for reader in range(num_readers)]
            process_ids = [id_ for part in parts for id_ in part]
            assert len(set(process_ids)) == len(process_ids)  # the readers' parts are disjoint
            if shuffle_buffer == 0:
                read.extend(process_ids)
                in_order = sorted(process_ids)
            else:  # shards dealt to readers in another order, rows shuffled in windows: the same rows
                assert process_ids != sorted(process_ids) and sorted(process_ids) == in_order
    assert sorted(read) == every_id  # no row twice, none missing, over processes and readers


def test_workers_give_batches_in_turns_and_count_every_workers_bad_rows():
    # shard 0 (rows 0-5) is clean, shard 1 (rows 6-11) has two bad rows; worker 0 reads shard 0, worker 1 shard 1
    dataset = toy_dataset(12, 2, broken=(7, 9))
    stream = stream_of(dataset, max_bad_fraction=0.9, min_seen=1)
    stream.record_ids = []
    batches = stream.batches(batch_size=1, num_workers=2)
    [next(batches) for _ in range(10)]
    assert stream.record_ids == [f"toy_train_{i:05d}" for i in (0, 6, 1, 2, 8, 3, 4, 10, 5, 11)]
    assert (stream.position.seen, stream.position.bad) == (12, 2)
    assert stream.position.bad_ids == ["toy_train_00007", "toy_train_00009"]
    # too many bad rows in one worker stop the training process with the stream's own error, not a worker traceback
    strict = stream_of(dataset, max_bad_fraction=0.1, min_seen=1)
    with pytest.raises(TooManyBadSamples, match="toy_train_00007"):
        for _ in strict.batches(batch_size=1, num_workers=2):
            pass


def parquet_dataset(tmp_path, count=40, broken=(5, 13, 22, 31)):
    rows = list(toy_panoptic_rows(count))
    for index in broken:
        rows[index] = dict(rows[index], image={"bytes": b"broken", "path": None})
    folder = tmp_path / "parquet"
    folder.mkdir()
    half = count // 2
    for shard, part in enumerate((rows[:half], rows[half:])):
        Dataset.from_list(part).to_parquet(str(folder / f"train-{shard:05d}.parquet"), batch_size=7)
    dataset, _ = load_panoptic_dataset(str(folder))
    return dataset


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact_from_any_batch(tmp_path, num_workers):
    """Same batches (ids, pixels, masks, classes) and bad counts after a resume as without, at 0 and 2 workers."""
    dataset = parquet_dataset(tmp_path)

    def make():
        stream = stream_of(dataset, augment=True, shuffle_buffer=4, seed=3, max_bad_fraction=0.5, min_seen=1)
        stream.record_ids = []
        return stream

    full = make()
    batches, states, counts = [], [], []
    for batch in full.batches(batch_size=2, num_workers=num_workers):
        batches.append(batch)
        states.append(full.state_dict())
        counts.append((full.position.seen, full.position.bad))
        if len(batches) == 30:  # past one epoch (18 samples per worker and epoch)
            break
    # with workers, resume points where a worker reported bad rows after its last batch (while another worker's
    # batch was taken) exercise the silent replay of those reports; plain ones too
    with_reports = [k for k, state in enumerate(states[:-5]) if any(state["skip_bad_reports"])]
    plain = [k for k, state in enumerate(states[:-5]) if not any(state["skip_bad_reports"])]
    assert bool(with_reports) == (num_workers > 1) and plain
    for taken in {*with_reports[:1], plain[len(plain) // 2]}:
        resumed = make()
        resumed.load_state_dict(states[taken])
        again = resumed.batches(batch_size=2, num_workers=num_workers)
        for expected in batches[taken + 1 :]:
            batch = next(again)
            assert torch.equal(batch["pixel_values"], expected["pixel_values"])
            assert torch.equal(batch["pixel_mask"], expected["pixel_mask"])
            for name in ("mask_labels", "class_labels"):
                assert all(torch.equal(a, b) for a, b in zip(batch[name], expected[name]))
        assert resumed.record_ids == full.record_ids[2 * (taken + 1) :]
        assert (resumed.position.seen, resumed.position.bad) == counts[-1]


def test_resume_reads_one_window_not_the_consumed_rows():
    reads = []
    rows = Dataset.from_list(list(toy_panoptic_rows(200))).to_iterable_dataset(num_shards=2)
    counted = rows.map(lambda row: reads.append(row["image_id"]) or {})  # every row 🤗 datasets hands on
    stream = stream_of(counted, shuffle_buffer=16)
    samples = iter(stream)
    [next(samples) for _ in range(150)]
    assert len(reads) >= 150
    reads.clear()
    resumed = stream_of(counted, shuffle_buffer=16)
    resumed.load_state_dict(stream.state_dict())
    resumed.record_ids = []
    next(iter(resumed))
    assert len(reads) <= 16  # the window of the next sample only
    assert resumed.record_ids[0] in reads


def test_positions_that_cannot_resume_exactly_are_refused():
    stream = stream_of(toy_dataset(8, 2))
    with pytest.raises(ValueError, match="older version"):
        stream.load_state_dict({"epoch": 0, "consumed": 3, "seen": 3, "bad": 0, "bad_ids": []})
    two_workers = stream_of(toy_dataset(8, 2))
    next(two_workers.batches(batch_size=1, num_workers=2))
    stream.load_state_dict(two_workers.state_dict())
    with pytest.raises(ValueError, match="same --dataloader_num_workers"):
        next(stream.batches(batch_size=1, num_workers=0))


def test_starting_the_workers_leaves_the_training_processs_random_stream_alone():
    # the loss's point sampling draws from it: a loader started at a resume must not shift it
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    next(stream_of(toy_dataset(8, 2)).batches(batch_size=1, num_workers=2))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_pinned_batches_are_asked_of_the_dataloader_and_change_nothing_else(monkeypatch):
    """`batches(..., pin_memory=True)` (train.py on CUDA): the workers' DataLoader pins (its pin thread copies each
    batch into page-locked memory); without workers nothing pins (off the training thread, nothing could). This
    machine has no CUDA, where the DataLoader pins nothing and warns: the batches equal unpinned ones."""
    import warnings

    from transformers_possam.data import stream as stream_module

    made = []
    real_loader = torch.utils.data.DataLoader

    def recording_loader(*args, **kwargs):
        made.append(kwargs)
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(stream_module.torch.utils.data, "DataLoader", recording_loader)
    dataset = toy_dataset(8, 2)
    plain = next(stream_of(dataset).batches(batch_size=2, num_workers=1))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        pinned = next(stream_of(dataset).batches(batch_size=2, num_workers=1, pin_memory=True))
    assert [kwargs["pin_memory"] for kwargs in made] == [False, True]
    assert torch.equal(plain["pixel_values"], pinned["pixel_values"])
    assert all(torch.equal(a, b) for a, b in zip(plain["mask_labels"], pinned["mask_labels"], strict=True))
    next(stream_of(dataset).batches(batch_size=2, num_workers=0, pin_memory=True))
    assert len(made) == 2  # no DataLoader without workers
