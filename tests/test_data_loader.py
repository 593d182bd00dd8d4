"""The shard loader: meta.json validation, random windows, resumable and rank-sliced order, eval windows."""

import json

import numpy as np
import pytest
import torch

from model.data import Shards, ShardError, TrainBatches, eval_batches, write_shards

VOCAB = 1000


@pytest.fixture
def shards(tmp_path) -> Shards:
    # Token value = position + file offset, so every window tells where it came from.
    train = [np.arange(0, 300) % VOCAB, np.arange(300, 350), np.arange(400, 410)]
    write_shards(tmp_path, {"train": train, "val": [np.arange(500, 700)], "test": [np.arange(700, 800)]}, VOCAB)
    return Shards.open(tmp_path)


def test_windows_are_shifted_pairs_inside_one_file(shards):
    batches = TrainBatches(shards, context_length=16, micro_batch=8, grad_accum=4, seed=3)
    seen_files = set()
    for _ in range(20):
        for x, y in batches.next():
            assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
            assert torch.equal(x[:, 1:], y[:, :-1])
            # Consecutive values only: a window crossing into the next file would jump.
            assert bool((torch.cat([x, y[:, -1:]], dim=1).diff(dim=1) == 1).all())
            seen_files.update((x[:, 0] >= 300).tolist())
    assert seen_files == {False, True}  # both long-enough files get drawn
    assert batches.starts_per_file.tolist() == [284, 34, 0]  # the 10-token file is too short for a window


def test_order_is_a_pure_function_of_seed_and_step(shards):
    a = TrainBatches(shards, 16, 4, seed=1)
    first = [a.next() for _ in range(5)]
    b = TrainBatches(shards, 16, 4, seed=1)
    b.load_state_dict(json.loads(json.dumps({"seed": 1, "step": 3})))  # state survives JSON
    resumed = b.next()
    assert all(torch.equal(p, q) for p, q in zip(sum(first[3], ()), sum(resumed, ())))
    other_seed = TrainBatches(shards, 16, 4, seed=2).next()
    assert not torch.equal(other_seed[0][0], first[0][0][0])
    assert a.state_dict() == {"seed": 1, "step": 5}


def test_ranks_split_the_same_global_batch(shards):
    single = TrainBatches(shards, 8, micro_batch=2, grad_accum=4, seed=7, world_size=1)
    ranks = [TrainBatches(shards, 8, micro_batch=2, grad_accum=2, seed=7, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        whole = torch.cat([x for x, _ in single.next()])
        parts = torch.cat([x for rank in ranks for x, _ in rank.next()])
        assert torch.equal(whole, parts)
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        TrainBatches(shards, 8, 2, rank=2, world_size=2)


def test_eval_windows_are_fixed_and_spread_over_the_split(shards):
    first = list(eval_batches(shards, "val", 16, n_windows=6, batch_size=4))
    again = list(eval_batches(shards, "val", 16, n_windows=6, batch_size=4))
    assert [x.shape[0] for x, _ in first] == [4, 2]
    assert all(torch.equal(p[0], q[0]) for p, q in zip(first, again))
    starts = torch.cat([x[:, 0] for x, _ in first]).tolist()
    assert starts[0] == 500 and starts[-1] == 500 + 16 * 11  # first and last of the 12 candidate windows
    by_rank = [torch.cat([x for x, _ in eval_batches(shards, "val", 16, 6, 4, rank=r, world_size=2)]) for r in range(2)]
    assert sorted(torch.cat(by_rank)[:, 0].tolist()) == sorted(starts)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda root, meta: (root / "train_0001.bin").write_bytes(b"\0" * 7), "train_0001.bin: 7 bytes, but meta.json says 50 tokens"),
        (lambda root, meta: (root / "val.bin").unlink(), "val.bin: listed in meta.json but missing"),
        (lambda root, meta: meta.update(dtype="uint32"), "dtype is 'uint32', expected 'uint16'"),
        (lambda root, meta: meta.update(vocab_size=70000), "vocab_size 70000 does not fit uint16"),
        (lambda root, meta: meta["files"].pop("val.bin"), "no 'val' files listed"),
        (lambda root, meta: (root / "meta.json").unlink(), "meta.json is missing"),
    ],
    ids=["truncated", "missing-file", "dtype", "vocab", "no-val", "no-meta"],
)
def test_bad_shards_fail_with_the_file_named(shards, corrupt, message):
    root = shards.root
    meta = json.loads((root / "meta.json").read_text())
    corrupt(root, meta)
    if (root / "meta.json").exists():
        (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match=message):
        Shards.open(root)


def test_context_longer_than_every_file_fails(shards):
    with pytest.raises(ShardError, match="shorter than context_length"):
        TrainBatches(shards, context_length=300, micro_batch=1)
    with pytest.raises(ShardError, match="'test' split has no window"):
        list(eval_batches(shards, "test", 100, 4, 2))


def test_memmap_reads_little_endian_uint16(tmp_path):
    tokens = np.array([0, 1, 258, 65535 % VOCAB, 999], dtype=np.int64)
    write_shards(tmp_path, {"train": [tokens], "val": [tokens]}, VOCAB)
    assert (tmp_path / "train_0000.bin").read_bytes()[4:6] == bytes([2, 1])  # 258 little-endian
    assert Shards.open(tmp_path).tokens("train_0000.bin").tolist() == tokens.tolist()
