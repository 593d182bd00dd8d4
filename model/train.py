"""Pretraining loop: plain PyTorch, one process or many under torchrun (DDP).

    python -m model.train --shards SHARDS_DIR --out RUN_DIR --preset tiny --max-steps 200
    torchrun --nproc_per_node=8 -m model.train --shards SHARDS_DIR --out RUN_DIR --preset base

RUN_DIR receives ckpt_NNNNNNN/ folders (model.safetensors, config.json, optimizer.pt, state.json),
a ``latest`` pointer, metrics.jsonl, loss.png and summary.json. Started again on the same RUN_DIR,
training resumes from the latest checkpoint and sees the same data it would have seen.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors

from model.data import Shards, TrainBatches, eval_batches
from model.model import ModelConfig, Transformer
from storage import write_text_atomic

CHECKPOINT_PREFIX = "ckpt_"
LATEST = "latest"
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    preset: str = "tiny"
    model: dict = field(default_factory=dict)  # ModelConfig overrides on top of the preset
    context_length: int | None = None  # training window; None: the model's context_length
    batch_size: int = 8  # micro-batch, per process
    tokens_per_step: int | None = None  # global batch in tokens; None: batch_size·context·world (no accumulation)
    max_steps: int = 200
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 100
    eval_windows: int = 32
    checkpoint_every: int = 100
    keep_last: int = 2
    log_every: int = 1
    seed: int = 1337
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        for name in ("batch_size", "max_steps", "eval_every", "eval_windows", "checkpoint_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        if unknown := set(d) - known:
            raise ValueError(f"unknown train config keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**d)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Pick the device and precision, and join the process group when started by torchrun."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if cfg.dtype == "bf16" and not (cuda and cfg.device != "cpu"):
        raise RuntimeError("dtype bf16 needs a CUDA GPU, and none is in use here; use --dtype fp32 or auto")
    use_cuda = cuda and cfg.device != "cpu"
    if use_cuda and cfg.dtype != "fp32" and not torch.cuda.is_bf16_supported():
        raise RuntimeError("this GPU has no bf16 support; use --dtype fp32")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(rank, local_rank, world_size, device, torch.bfloat16 if use_cuda and cfg.dtype != "fp32" else None)


def resolve_model_config(cfg: TrainConfig, shards: Shards) -> ModelConfig:
    overrides = dict(cfg.model)
    if overrides.setdefault("vocab_size", shards.vocab_size) != shards.vocab_size:
        raise ValueError(
            f"model vocab_size {overrides['vocab_size']} differs from the shards' vocab_size {shards.vocab_size} "
            f"({shards.root / 'meta.json'}); drop the vocab_size override or use shards from the matching tokenizer"
        )
    return ModelConfig.preset(cfg.preset, **overrides)


def resolve_grad_accum(cfg: TrainConfig, context_length: int, world_size: int) -> int:
    per_pass = cfg.batch_size * context_length * world_size
    if cfg.tokens_per_step is None:
        return 1
    if cfg.tokens_per_step % per_pass:
        raise ValueError(
            f"tokens_per_step {cfg.tokens_per_step} is not a multiple of batch_size·context·world_size "
            f"= {cfg.batch_size}·{context_length}·{world_size} = {per_pass}; pick a multiple of {per_pass}"
        )
    return cfg.tokens_per_step // per_pass


# -- checkpoints -------------------------------------------------------------------------------


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its final name once complete)."""
    return sorted(p for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / "state.json").is_file())


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / LATEST
    if pointer.is_file():
        named = out_dir / pointer.read_text().strip()
        if (named / "state.json").is_file():
            return named
    found = checkpoint_dirs(out_dir)
    return found[-1] if found else None


def save_checkpoint(out_dir: Path, step: int, model: Transformer, optimizer, config: dict, state: dict, keep_last: int) -> Path:
    """Write ckpt_{step} under a temporary name, fsync it, rename it into place, prune old ones."""
    name = f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = out_dir / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(model, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    final = out_dir / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_text_atomic(out_dir / LATEST, name + "\n")
    for old in checkpoint_dirs(out_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_checkpoint_config(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; pass a ckpt_NNNNNNN folder or a pretrain artifact folder")
    return json.loads(path.read_text())


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """The network saved in a checkpoint folder (safetensors: nothing is unpickled)."""
    cfg = ModelConfig.from_dict(load_checkpoint_config(checkpoint_dir)["model"])
    model = Transformer(cfg)
    load_safetensors(model, str(Path(checkpoint_dir) / "model.safetensors"), device=str(device))
    return model.to(device)


def load_optimizer_state(checkpoint_dir: Path, optimizer, device: torch.device) -> None:
    # weights_only: tensors and plain containers only; a pickled object in the file raises.
    optimizer.load_state_dict(torch.load(checkpoint_dir / "optimizer.pt", map_location=device, weights_only=True))


# -- metrics -----------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train"), (val, "val")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label == "val" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# -- the loop ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: Transformer, shards: Shards, split: str, context_length: int, cfg: TrainConfig, rt: Runtime) -> float:
    """Mean loss over the fixed evaluation windows of ``split``, summed across ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)
    batches = eval_batches(shards, split, context_length, cfg.eval_windows, cfg.batch_size, rt.rank, rt.world_size, rt.device)
    for x, y in batches:
        with rt.autocast():
            _, loss = model(x, y)
        total += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), dtype=torch.float64, device=rt.device)])
    if rt.world_size > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def step_seed(seed: int, rank: int, step: int) -> int:
    """Dropout randomness as a pure function of (seed, rank, step): resume needs no RNG state."""
    return int(np.random.default_rng([seed, rank, step]).integers(2**62))


def train(
    config: TrainConfig,
    shards_dir: str | Path,
    out_dir: str | Path,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Train (or resume) into out_dir; return the run summary. ``progress`` gets each metrics record."""
    rt = setup_runtime(config)
    try:
        return _train(config, Shards.open(shards_dir), Path(out_dir), progress, rt)
    finally:
        if rt.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, shards: Shards, out: Path, progress, rt: Runtime) -> dict:
    started = time.time()
    model_cfg = resolve_model_config(cfg, shards)
    context = cfg.context_length or model_cfg.context_length
    if context > model_cfg.context_length:
        raise ValueError(
            f"context_length {context} is longer than the model's context_length {model_cfg.context_length}; "
            f"lower --context-length or raise the model's context_length"
        )
    grad_accum = resolve_grad_accum(cfg, context, rt.world_size)
    tokens_per_step = cfg.batch_size * context * rt.world_size * grad_accum
    run_config = {"model": model_cfg.to_dict(), "train": cfg.to_dict(), "tokens": shards.special_tokens}

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = Transformer(model_cfg).to(rt.device)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), rt.device.type)
    batches = TrainBatches(shards, context, cfg.batch_size, grad_accum, cfg.seed, rt.rank, rt.world_size, rt.device)

    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(f".tmp_{CHECKPOINT_PREFIX}*"):  # left by a run killed mid-save
            shutil.rmtree(stale)
    resume_from = latest_checkpoint(out) if out.is_dir() else None
    start_step = 0
    if resume_from is not None:
        saved = load_checkpoint_config(resume_from)
        if saved["model"] != model_cfg.to_dict():
            raise ValueError(
                f"{resume_from} holds a different model ({saved['model']}) than this run ({model_cfg.to_dict()}); "
                f"use a fresh --out folder or the same model settings"
            )
        load_safetensors(model, str(resume_from / "model.safetensors"), device=str(rt.device))
        load_optimizer_state(resume_from, optimizer, rt.device)
        state = json.loads((resume_from / "state.json").read_text())
        start_step = state["step"]
        if start_step > cfg.max_steps:
            raise ValueError(
                f"{resume_from} is at step {start_step}, past max_steps {cfg.max_steps}; raise --max-steps or use a fresh --out"
            )
        batches.load_state_dict(state["sampler"])

    metrics_path = out / METRICS
    if rt.is_main:  # drop records of steps after the checkpoint: they are about to be redone
        kept = [r for r in read_metrics(metrics_path) if r["step"] <= start_step]
        write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if rt.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

    def log(record: dict) -> None:
        if rt.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if progress is not None:
                progress(record)

    def checkpoint(step: int) -> None:
        if rt.is_main:
            state = {"step": step, "sampler": batches.state_dict(), "tokens_seen": step * tokens_per_step}
            save_checkpoint(out, step, raw_model, optimizer, run_config, state, cfg.keep_last)
        if rt.world_size > 1:
            dist.barrier()

    model.train()
    loss_value = float("nan")
    val_loss = None
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(cfg.seed, rt.rank, step))
        loss_sum = torch.zeros((), device=rt.device)
        micro_batches = batches.next()
        for i, (x, y) in enumerate(micro_batches):
            # Gradients are all-reduced once per step, on the last micro-batch.
            sync = rt.world_size == 1 or i == len(micro_batches) - 1
            with (nullcontext() if sync else model.no_sync()), rt.autocast():
                _, loss = model(x, y)
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        if done % cfg.log_every == 0 or done == cfg.max_steps:
            mean_loss = loss_sum / grad_accum
            if rt.world_size > 1:  # SUM then divide: gloo has no AVG
                dist.all_reduce(mean_loss)
                mean_loss /= rt.world_size
            loss_value = mean_loss.item()
            elapsed = time.perf_counter() - t0
            log({
                "step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(),
                "tokens_per_s": tokens_per_step / elapsed, "step_s": elapsed, "tokens_seen": done * tokens_per_step,
            })
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            val_loss = evaluate(raw_model, shards, "val", context, cfg, rt)
            log({"step": done, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            checkpoint(done)

    if val_loss is None:  # resumed from the final checkpoint: report the finished run's numbers
        val_loss = evaluate(raw_model, shards, "val", context, cfg, rt)
    records = read_metrics(metrics_path) if rt.is_main else []
    train_losses = [r["loss"] for r in records if "loss" in r]
    summary = {
        "steps": cfg.max_steps,
        "resumed_from_step": start_step if resume_from is not None else None,
        "final_loss": train_losses[-1] if train_losses else loss_value,
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0)),
        "tokens_seen": cfg.max_steps * tokens_per_step,
        "tokens_per_step": tokens_per_step,
        "grad_accum": grad_accum,
        "world_size": rt.world_size,
        "params": raw_model.num_params(),
        "checkpoint": f"{CHECKPOINT_PREFIX}{cfg.max_steps:07d}",
        "seconds": round(time.time() - started, 3),
    }
    if rt.is_main:
        plot_losses(records, out / "loss.png")
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


# -- command line ------------------------------------------------------------------------------


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> tuple[TrainConfig, str, str]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="binarize artifact folder (meta.json + .bin files)")
    parser.add_argument("--out", required=True, help="run folder for checkpoints and logs (resumed if it has some)")
    parser.add_argument("--config", help="JSON file with TrainConfig fields; flags given here override it")
    parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE", help="ModelConfig override, repeatable")
    for f in fields(TrainConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type.split(" |")[0], str)
            parser.add_argument(flag, type=kind, default=None)
    args = parser.parse_args(argv)
    values = json.loads(Path(args.config).read_text()) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None and k != "model"})
    for item in args.model:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--model expects KEY=VALUE, got {item!r}")
        values.setdefault("model", {})[key] = _parse_value(value)
    return TrainConfig.from_dict(values), args.shards, args.out


def format_record(record: dict) -> str:
    """A metrics record as one log line: step=10 loss=3.412 lr=0.0003 ..."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    config, shards_dir, out_dir = parse_args(argv, prog)

    summary = train(config, shards_dir, out_dir, progress=lambda record: print(format_record(record), flush=True))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
