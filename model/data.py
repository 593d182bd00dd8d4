"""Token shards on disk -> (x, y) batches for training and evaluation.

The shards are raw little-endian uint16 token streams (``train_0000.bin`` ..., ``val.bin``,
``test.bin``) described by ``meta.json``; see DESIGN.md, "Data contracts".

Training draws random windows. The global batch of optimizer step ``s`` is a pure function of
(seed, s), and rank ``r`` of ``world_size`` takes its own slice of it. So a resumed run sees the
same data as an uninterrupted one, and one process sees the same data as N processes with the
same global batch. The sampler's whole state is ``{"seed", "step"}``.

No torch DataLoader workers: a batch is a few memmap slices of pages the OS already caches,
far cheaper than a model step, so worker processes would only add IPC and pickling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from storage.formats import EOS_ID, META_FILE, SHARD_DTYPE, UINT16_VOCAB_LIMIT, shard_file_name, shard_meta

DTYPE = np.dtype(SHARD_DTYPE)


class ShardError(ValueError):
    """The shards folder does not match its meta.json or the data contract."""


@dataclass(frozen=True)
class Shards:
    """A validated shards folder: its meta.json and the token files of each split."""

    root: Path
    meta: dict

    @classmethod
    def open(cls, root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> "Shards":
        """The folder checked against its meta.json: every file listed, its size as meta.json says,
        and files of each of ``splits`` (what the reader needs: training train and val)."""
        root = Path(root)
        meta_path = root / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise ShardError(f"{meta_path} is missing; point --shards at a shards artifact folder") from None
        except json.JSONDecodeError as e:
            raise ShardError(f"{meta_path} is not valid JSON ({e}); rebuild the shards artifact (medlm tokenize)") from None
        if meta.get("dtype") != "uint16":
            raise ShardError(f"{meta_path}: dtype is {meta.get('dtype')!r}, expected 'uint16'")
        vocab = meta.get("vocab_size")
        if not isinstance(vocab, int) or not 0 < vocab <= UINT16_VOCAB_LIMIT:
            raise ShardError(f"{meta_path}: vocab_size {vocab!r} does not fit uint16 tokens (1..65536)")
        files = meta.get("files")
        if not isinstance(files, dict) or not files:
            raise ShardError(f"{meta_path}: no 'files' listed")
        for name, entry in files.items():
            path = root / name
            if not path.is_file():
                raise ShardError(f"{path}: listed in meta.json but missing; rebuild the shards artifact (medlm tokenize)")
            expected = entry["tokens"] * DTYPE.itemsize
            if path.stat().st_size != expected:
                raise ShardError(
                    f"{path}: {path.stat().st_size} bytes, but meta.json says {entry['tokens']} tokens "
                    f"({expected} bytes); the file is truncated or meta.json is stale"
                )
        shards = cls(root, meta)
        for split in splits:
            if not shards.files(split):
                raise ShardError(f"{meta_path}: no {split!r} files listed; this needs the {' and '.join(splits)} splits")
        return shards

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def special_tokens(self) -> dict:
        return {k: self.meta[k] for k in ("pad_id", "unk_id", "bos_id", "eos_id") if k in self.meta}

    def files(self, split: str) -> list[str]:
        return sorted(name for name, entry in self.meta["files"].items() if entry.get("split") == split)

    def tokens(self, name: str) -> np.ndarray:
        # A fresh memmap per call: cheap, and nothing holds file handles across fork/DDP spawn.
        return np.memmap(self.root / name, dtype=DTYPE, mode="r")


def to_device(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 tensor on device; on CUDA through pinned memory, so the copy can overlap compute."""
    tensor = torch.from_numpy(batch.astype(np.int64))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def gather_windows(shards: Shards, starts: list[tuple[str, int]], window: int) -> np.ndarray:
    """Stack the token windows [start, start + window) of the given (file, start) pairs."""
    out = np.empty((len(starts), window), dtype=DTYPE)
    maps: dict[str, np.ndarray] = {}  # one memmap per file per batch, not one per window
    for row, (name, start) in enumerate(starts):
        if name not in maps:
            maps[name] = shards.tokens(name)
        out[row] = maps[name][start : start + window]
    return out


class TrainBatches:
    """Random (x, y) windows over the train split for one rank; see the module docstring."""

    weigh_by_targets = False  # every window has context_length targets

    def __init__(
        self,
        shards: Shards,
        context_length: int,
        micro_batch: int,
        grad_accum: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shards = shards
        self.context_length = context_length
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.seed, self.step = seed, 0
        self.names = shards.files("train")
        # A window is context_length + 1 tokens (y is x shifted by one) inside one file.
        lengths = np.array([shards.meta["files"][n]["tokens"] for n in self.names], dtype=np.int64)
        self.starts_per_file = np.maximum(lengths - context_length, 0)
        if self.starts_per_file.sum() == 0:
            raise ShardError(
                f"{shards.root}: every train file is shorter than context_length + 1 = {context_length + 1} "
                f"tokens; use a shorter context or more data"
            )
        self.cumulative = np.cumsum(self.starts_per_file)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])

    def window_starts(self, step: int) -> list[tuple[str, int]]:
        """This rank's (file, start) pairs for optimizer step ``step``, micro-batch after micro-batch."""
        rng = np.random.default_rng([self.seed, step])
        flat = rng.integers(0, self.cumulative[-1], size=self.global_batch)
        file_index = np.searchsorted(self.cumulative, flat, side="right")
        offsets = flat - np.concatenate(([0], self.cumulative[:-1]))[file_index]
        per_rank = self.micro_batch * self.grad_accum
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return [(self.names[f], int(o)) for f, o in zip(file_index[mine], offsets[mine])]

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The grad_accum micro-batches (x, y) of the next optimizer step, and advance."""
        windows = gather_windows(self.shards, self.window_starts(self.step), self.context_length + 1)
        self.step += 1
        micro = []
        for i in range(self.grad_accum):
            chunk = windows[i * self.micro_batch : (i + 1) * self.micro_batch]
            micro.append((to_device(chunk[:, :-1], self.device), to_device(chunk[:, 1:], self.device)))
        return micro


def eval_batches(
    shards: Shards,
    split: str,
    context_length: int,
    n_windows: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
):
    """A fixed set of n_windows (x, y) windows of ``split``, evenly spread, yielded in batches.

    Rank r gets windows r, r + world_size, ...; sum losses over ranks for the full set.
    """
    window = context_length + 1
    candidates = [
        (name, start)
        for name in shards.files(split)
        for start in range(0, shards.meta["files"][name]["tokens"] - window + 1, context_length)
    ]
    if not candidates:
        raise ShardError(f"{shards.root}: the {split!r} split has no window of {window} tokens; use a shorter context")
    n = min(n_windows, len(candidates))
    chosen = [candidates[i] for i in np.linspace(0, len(candidates) - 1, n).round().astype(int)]
    mine = chosen[rank::world_size]
    device = torch.device(device)
    for i in range(0, len(mine), batch_size):
        windows = gather_windows(shards, mine[i : i + batch_size], window)
        yield to_device(windows[:, :-1], device), to_device(windows[:, 1:], device)


def write_shards(root: str | Path, splits: dict[str, list[np.ndarray]], vocab_size: int, **meta_extra) -> Path:
    """Write token arrays as a shards folder (one .bin per array, plus meta.json).

    The reference writer of the contract, for tests and benchmarks: train arrays become
    train_0000.bin, train_0001.bin, ...; a single val or test array becomes val.bin / test.bin.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, arrays in splits.items():
        for i, tokens in enumerate(arrays):
            name = shard_file_name(split, i if split == "train" else None)
            if split != "train" and len(arrays) > 1:
                raise ValueError(f"only the train split has several files; got {len(arrays)} for {split!r}")
            tokens = np.asarray(tokens)
            if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
                raise ValueError(f"{split} tokens must lie in [0, {vocab_size})")
            tokens.astype(DTYPE).tofile(root / name)
            files[name] = {"split": split, "tokens": int(tokens.size), "documents": int(np.count_nonzero(tokens == EOS_ID))}
    (root / META_FILE).write_text(json.dumps(shard_meta(vocab_size, files, **meta_extra), indent=2))
    return root
