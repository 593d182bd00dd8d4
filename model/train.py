"""Pretraining loop: plain PyTorch, one process or many under torchrun (DDP).

    python -m model.train --shards SHARDS_DIR --out RUN_DIR --preset tiny --optim.max-steps 200
    torchrun --nproc_per_node=8 -m model.train --shards SHARDS_DIR --out RUN_DIR --preset base

RUN_DIR receives ckpt_NNNNNNN/ folders (see model/checkpoint.py), metrics.jsonl, loss.png and
summary.json. Started again on the same RUN_DIR, training resumes from the latest checkpoint and
sees the same data it would have seen. ``train_loop`` is the loop itself: it takes any batch
source (``next()``, ``state_dict()``, ``load_state_dict()``) and an ``init_from`` checkpoint, so
fine-tuning is the same loop with masked batches.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, ClassVar, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field, model_validator

from model.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint_config,
    load_optimizer_state,
    load_state,
    load_weights,
    remove_unfinished,
    save_checkpoint,
)
from model.data import Shards, TrainBatches, eval_batches
from model.model import IGNORE_INDEX, PRESETS, ModelConfig, Transformer
from model.threads import ThreadTuner
from storage import write_text_atomic
from storage.access import RendezvousEndpoint
from storage.processes import die_with_parent
from storage.progress import Progress
from storage.config import config_dataclass, config_fields

METRICS = "metrics.jsonl"
_log = logging.getLogger("medlm.train")


@config_dataclass
class ModelShape:
    """What is pretrained, on which windows (pretraining only: a fine-tuning's shape is its base's)."""

    preset: Literal[tuple(PRESETS)] = Field("tiny", description="Model shape: tiny (CPU tests, demo), small, base (~110M, Llama style), gpt2 (GPT-2 small's shape).")
    model: dict = Field(default_factory=dict, description='ModelConfig overrides on top of the preset, e.g. {"n_layer": 8}.')
    context_length: int | None = Field(None, ge=2, description="Training window in tokens (unset: the model's context length).")
    tokens_per_step: int | None = Field(None, ge=1, description="Global batch in tokens, reached by gradient accumulation (unset: one micro-batch per process).")
    eval_windows: int = Field(32, ge=1, description="Validation windows per evaluation.")


@config_dataclass
class OptimConfig:
    """The optimizer, its schedule and the batches it steps on."""

    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch, per process.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr: float = Field(3e-5, ge=0, description="Learning rate at the end of the cosine decay.")
    warmup_steps: int = Field(20, ge=0, description="Steps of linear warmup.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only).")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0: no clipping).")
    seed: int = Field(1337, description="Initial weights, data order and dropout.")

    @model_validator(mode="after")
    def _schedule(self):
        if self.min_lr > self.lr:
            raise ValueError(f"need min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        return self


@config_dataclass
class RunConfig:
    """Where and how a training runs: cadence, device, precision, processes and machines."""

    eval_every: int = Field(100, ge=1, description="Validation loss every N steps.")
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint every N steps.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept in the run folder.")
    log_every: int = Field(1, ge=1, description="Log the training loss every N steps.")
    compile: bool = Field(False, description="torch.compile the model.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when a GPU is visible.")
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU.")
    devices: int = Field(1, ge=1, description="Processes to launch on this machine; more than one runs torchrun (DDP).")
    nodes: int = Field(1, ge=1, le=4096, description="Machines training together (each runs `devices` processes); the others join with `medlm join RDZV_ID`.")
    rdzv_endpoint: RendezvousEndpoint | None = Field(None, description="With nodes > 1: the torchrun rendezvous, HOST:PORT, reachable from every node (its host in MEDLM_RENDEZVOUS_HOSTS).")
    rdzv_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="With nodes > 1: this job's name, the same on every node (e.g. $SLURM_JOB_ID).")
    timeout_s: int = Field(600, ge=10, description="With several processes: seconds one waits for the others (a collective, a checkpoint's barrier) before the run fails; a node cut off stops the job within it.")

    # How often to log and checkpoint, where the nodes meet and how long they wait change how the work is done, not what it makes.
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("log_every", "checkpoint_every", "keep_last", "rdzv_endpoint", "rdzv_id", "timeout_s")

    @model_validator(mode="after")
    def _nodes(self):
        if self.nodes > 1 and not (self.rdzv_endpoint and self.rdzv_id):
            raise ValueError(f"nodes {self.nodes} needs rdzv_endpoint (HOST:PORT every node reaches) and rdzv_id (the same on every node)")
        return self


@config_dataclass
class TrainConfig:
    """A pretraining: the model's shape, the optimization, the run (one table each in a run configuration)."""

    shape: ModelShape = ModelShape()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()

    @classmethod
    def of(cls, **settings) -> "TrainConfig":
        """A TrainConfig from settings by name: ``TrainConfig.of(preset="tiny", max_steps=3, device="cpu")``."""
        return cls().replace(**settings)

    def replace(self, **settings) -> "TrainConfig":
        """This config with settings changed by name, each in the section that has it."""
        sections = {name: getattr(self, name) for name in config_fields(type(self))}
        if unknown := set(settings) - {f for section in sections.values() for f in config_fields(type(section))}:
            raise TypeError(f"no training setting(s) {sorted(unknown)}")
        return type(self)(**{name: dataclasses.replace(section, **{k: v for k, v in settings.items() if k in config_fields(type(section))})
                             for name, section in sections.items()})


def adamw(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; decay matrices (embeddings, projections) but not biases
    or norm gains. Any model: ours, a Hugging Face one, or one with LoRA adapters (only they train)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **({"fused": True} if fused else {}))


def lr_at(step: int, cfg: OptimConfig) -> float:
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


def setup_runtime(cfg: RunConfig) -> Runtime:
    """Pick the device and precision, and join the process group when started by torchrun."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is visible; set device to cpu or auto")
    if cfg.dtype == "bf16" and not (cuda and cfg.device != "cpu"):
        raise RuntimeError("dtype bf16 needs a CUDA GPU, and none is in use here; set dtype to fp32 or auto")
    use_cuda = cuda and cfg.device != "cpu"
    if use_cuda and cfg.dtype != "fp32" and not torch.cuda.is_bf16_supported():
        raise RuntimeError("this GPU has no bf16 support; set dtype to fp32")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        die_with_parent()  # a launcher killed alone (the out-of-memory killer) takes its workers with it; their peers then fail
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=cfg.timeout_s))
    return Runtime(rank, local_rank, world_size, device, torch.bfloat16 if use_cuda and cfg.dtype != "fp32" else None)


def resolve_model_config(cfg: ModelShape, shards: Shards) -> ModelConfig:
    overrides = dict(cfg.model)
    if overrides.setdefault("vocab_size", shards.vocab_size) != shards.vocab_size:
        raise ValueError(
            f"model vocab_size {overrides['vocab_size']} differs from the shards' vocab_size {shards.vocab_size} "
            f"({shards.root / 'meta.json'}); drop the vocab_size override or use shards from the matching tokenizer"
        )
    return ModelConfig.preset(cfg.preset, **overrides)


def resolve_grad_accum(tokens_per_step: int | None, batch_size: int, context_length: int, world_size: int) -> int:
    per_pass = batch_size * context_length * world_size
    if tokens_per_step is None:
        return 1
    if tokens_per_step % per_pass:
        raise ValueError(
            f"tokens_per_step {tokens_per_step} is not a multiple of batch_size·context·world_size "
            f"= {batch_size}·{context_length}·{world_size} = {per_pass}; pick a multiple of {per_pass}"
        )
    return tokens_per_step // per_pass


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
def validation_loss(model: Transformer, shards: Shards, split: str, context_length: int, windows: int, batch_size: int, rt: Runtime) -> float:
    """Mean loss over the fixed evaluation windows of ``split``, summed across ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)
    batches = eval_batches(shards, split, context_length, windows, batch_size, rt.rank, rt.world_size, rt.device)
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


class BatchSource(Protocol):
    """Where a training loop's data comes from; its whole state is what ``state_dict`` returns."""

    # Whether a step's micro-batches weigh by their targets (``target_shares``: fine-tuning's
    # completions differ in length) or equally (pretraining's windows, DPO's pairs).
    weigh_by_targets: bool

    def next(self) -> list[tuple]:
        """The micro-batches of the next optimizer step: (x, y) windows of equal size (pretraining),
        or masked (x, y, inputs) batches, y = -100 where no loss is wanted and ``inputs`` more
        keyword arguments for the model (fine-tuning: ``segments`` of packed rows)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def target_shares(micro_batches: list[tuple], rt: Runtime) -> list[torch.Tensor]:
    """What each masked micro-batch's mean loss weighs in the step's loss.

    Masked batches have as many targets as their completions have tokens, so a mean of micro-batch
    means would weigh a short answer's tokens more than a long one's: each weighs its share of the
    step's targets (summed over every rank, times world_size since DDP averages the gradients),
    making the step's loss the mean over every target token of the step. That is how transformers'
    Trainer (num_items_in_batch) and TRL's SFTTrainer normalise it.
    """
    counts = torch.stack([batch[1].ne(IGNORE_INDEX).sum() for batch in micro_batches]).double()
    total = counts.sum()
    if rt.world_size > 1:
        dist.all_reduce(total)
    return list((counts * rt.world_size / total).float())


# Activations backward keeps, per layer and token: ACTIVATION_D values per d_model and ACTIVATION_H
# per mlp_hidden unit; logits, their softmax and its gradient: LOGIT_COPIES fp32 copies; and what
# any step holds besides (allocator, temporaries). Fitted to peak RSS on CPU within a few percent
# from 0.4 to 7 GB (benchmarks/train_memory.py).
ACTIVATION_D, ACTIVATION_H, LOGIT_COPIES, OVERHEAD = 16, 6, 4, 150_000_000


class NotEnoughMemory(RuntimeError):
    """Training as configured would not fit in this machine's (or GPU's) memory."""


def training_memory(model: ModelConfig, params: int, trainable: int, batch_size: int, context: int, half: bool) -> dict[str, int]:
    """What one training process holds at its peak, roughly, in bytes: the fp32 weights, the
    gradients and AdamW's two moments of the trainable ones, the activations backward keeps (bf16
    under autocast), and the logits with their softmax and gradient."""
    tokens = batch_size * context
    return {
        "weights and optimizer": 4 * params + 12 * trainable,
        "activations": (2 if half else 4) * model.n_layer * tokens * (ACTIVATION_D * model.d_model + ACTIVATION_H * model.mlp_hidden),
        "logits": 4 * LOGIT_COPIES * tokens * model.vocab_size,
        "the rest": OVERHEAD,
    }


def available_memory(device: torch.device, processes: int | None = None) -> tuple[int, str]:
    """Bytes one process of this machine's training may use, and where the figure comes from: the
    GPU's free memory, or MemAvailable shared by this machine's ``processes`` (unset: torchrun's LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {torch.cuda.get_device_name(device)}"
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(info["MemAvailable"].split()[0]) * 1024 // processes, "MemAvailable" + (f" / {processes} processes" if processes > 1 else "")


def require_memory(model: ModelConfig, params: int, trainable: int, batch_size: int, context: int, rt: "Runtime", processes: int | None = None) -> None:
    """A one-line error, before anything is allocated, when training as configured cannot fit."""
    needed = training_memory(model, params, trainable, batch_size, context, rt.autocast_dtype is not None)
    have, where = available_memory(rt.device, processes)
    if sum(needed.values()) > have:
        parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in needed.items())
        raise NotEnoughMemory(
            f"training {params / 1e6:,.0f}M parameters at batch_size {batch_size} x {context} tokens needs about "
            f"{sum(needed.values()) / 1e9:.1f} GB ({parts}) and {rt.device.type} has {have / 1e9:.1f} GB ({where}); "
            f"lower batch_size (tokens_per_step keeps the global batch by accumulating) or the context length, use a smaller preset, or train on a GPU"
        )


def require_training_fits(config: TrainConfig, vocab_size: int) -> None:
    """``train``'s checks of the batch and of memory, made before anything starts (no process
    group, no shards read): the model the shape gives at ``vocab_size``, on the device, precision
    and processes per machine the run configuration picks."""
    shape, optim, run = config.shape, config.optim, config.run
    model = ModelConfig.preset(shape.preset, **{**shape.model, "vocab_size": vocab_size})
    context = shape.context_length or model.context_length
    resolve_grad_accum(shape.tokens_per_step, optim.batch_size, context, run.devices * run.nodes)
    with torch.device("meta"):
        params = sum(p.numel() for p in Transformer(model).parameters())
    cuda = torch.cuda.is_available() and run.device != "cpu"
    rt = Runtime(0, 0, 1, torch.device("cuda:0" if cuda else "cpu"), torch.bfloat16 if cuda and run.dtype != "fp32" else None)
    require_memory(model, params, params, optim.batch_size, context, rt, processes=run.devices)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 FLOP/s of the GPU, from its name (for MFU); None when not known (and on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    known = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
    return next((value for key, value in known.items() if key in name), None)


def train(
    config: TrainConfig,
    shards_dir: str | Path,
    out_dir: str | Path,
) -> dict:
    """Pretrain (or resume) on a shards folder into out_dir; return the run summary."""
    shape, optim = config.shape, config.optim
    rt = setup_runtime(config.run)
    try:
        shards = Shards.open(shards_dir)
        model_cfg = resolve_model_config(shape, shards)
        context = shape.context_length or model_cfg.context_length
        if context > model_cfg.context_length:
            raise ValueError(
                f"context_length {context} is longer than the model's context_length {model_cfg.context_length}; "
                f"lower --context-length or raise the model's context_length"
            )
        grad_accum = resolve_grad_accum(shape.tokens_per_step, optim.batch_size, context, rt.world_size)
        with torch.device("meta"):  # the parameter count, nothing allocated
            params = sum(p.numel() for p in Transformer(model_cfg).parameters())
        require_memory(model_cfg, params, params, optim.batch_size, context, rt)
        batches = TrainBatches(shards, context, optim.batch_size, grad_accum, optim.seed, rt.rank, rt.world_size, rt.device)
        torch.manual_seed(optim.seed)  # the same initial weights on every rank
        model = Transformer(model_cfg).to(rt.device)
        return train_loop(
            optim, config.run, rt, model, model_cfg.to_dict(), batches,
            validate=lambda model: validation_loss(model, shards, "val", context, shape.eval_windows, optim.batch_size, rt),
            out=Path(out_dir),
            tokens_per_step=optim.batch_size * context * rt.world_size * grad_accum,
            run_info={"shape": asdict(shape), "tokens": shards.special_tokens},
        )
    finally:
        if rt.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train_loop(
    optim: OptimConfig,
    run: RunConfig,
    rt: Runtime,
    model: torch.nn.Module,
    model_config: dict,
    batches: BatchSource,
    validate: Callable[[torch.nn.Module], float],
    out: Path,
    tokens_per_step: int,
    run_info: dict,
    init_from: Path | None = None,
    what: str = "training",
    perplexity: bool = True,
) -> dict:
    """Train (or resume) ``optim.max_steps`` optimizer steps of ``model`` into ``out``; return the run summary.

    ``model`` (on rt.device) maps (x, y, **inputs) to (logits, mean loss over y != -100): ours, or a
    wrapped Hugging Face model, with or without adapters, or DPO's objective (model/dpo.py: the
    mean loss over pairs). The step's loss is the mean over its targets (``target_shares``). A fresh run starts from its weights as given, or
    from the checkpoint ``init_from`` (fine-tuning); a run folder with checkpoints resumes from its
    latest one, data position included. ``model_config`` describes the network (a resumed run must
    match it); it and ``run_info`` go into every checkpoint's config.json. Rank 0 reports progress
    as ``what`` (storage/progress.py: step N of max_steps, tokens/s, time left, MFU on a GPU whose
    peak it knows). ``perplexity``: the validation loss is a cross-entropy, whose exponential is
    reported beside it (DPO's loss is not).
    """
    started = time.time()

    def validation(loss: float) -> dict:
        return {"val_loss": loss} | ({"val_ppl": math.exp(min(loss, 50.0))} if perplexity else {})

    run_config = {"model": model_config, "optim": asdict(optim), "run": asdict(run), **run_info}

    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_unfinished(out)
    resume_from = latest_checkpoint(out) if out.is_dir() else None
    weights_from = resume_from or init_from
    if weights_from is not None:
        saved = load_checkpoint_config(weights_from)["model"]
        if saved != model_config:
            raise ValueError(
                f"{weights_from} holds a different model ({saved}) than this run ({model_config}); "
                f"use a fresh run folder or the same model settings"
            )
        load_weights(model, weights_from, rt.device)
    optimizer = adamw(model, optim, rt.device.type)
    start_step = 0
    if resume_from is not None:
        load_optimizer_state(resume_from, optimizer, rt.device)
        state = load_state(resume_from)
        start_step = state["step"]
        if start_step > optim.max_steps:
            raise ValueError(
                f"{resume_from} is at step {start_step}, past max_steps {optim.max_steps}; raise max_steps or use a fresh run folder"
            )
        batches.load_state_dict(state["sampler"])

    metrics_path = out / METRICS
    if rt.is_main:  # drop records of steps after the checkpoint: they are about to be redone
        kept = [r for r in read_metrics(metrics_path) if r["step"] <= start_step]
        write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    raw_model = model
    if run.compile:
        model = torch.compile(model)
    if rt.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

    steps = Progress(what, optim.max_steps, "steps", _log)
    peak = peak_flops(rt.device)
    flops = raw_model.flops_per_token() if peak and hasattr(raw_model, "flops_per_token") else None

    def log(record: dict) -> None:
        if rt.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if "loss" in record:
                mfu = f", MFU {100 * record['tokens_per_s'] * flops / peak / rt.world_size:.1f}%" if flops and peak else ""
                steps.update(record["step"], f"loss {record['loss']:.4g}, {record['tokens_per_s']:,.0f} tokens/s{mfu}")
            else:
                ppl = f" (perplexity {record['val_ppl']:.4g})" if "val_ppl" in record else ""
                _log.info("%s: step %d, validation loss %.4g%s", what, record["step"], record["val_loss"], ppl)

    def checkpoint(step: int) -> None:
        if rt.is_main:
            state = {"step": step, "sampler": batches.state_dict(), "tokens_seen": step * tokens_per_step}
            save_checkpoint(out, step, raw_model, optimizer, run_config, state, run.keep_last)
        if rt.world_size > 1:
            dist.barrier()

    model.train()
    loss_value = float("nan")
    val_loss = grad_accum = None
    tuner = ThreadTuner.for_device(rt.device, what)
    for step in range(start_step, optim.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(optim.seed, rt.rank, step))
        loss_sum = torch.zeros((), device=rt.device)
        micro_batches = batches.next()
        grad_accum = len(micro_batches)
        shares = target_shares(micro_batches, rt) if batches.weigh_by_targets else None
        for i, (x, y, *inputs) in enumerate(micro_batches):
            # Gradients are all-reduced once per step, on the last micro-batch.
            sync = rt.world_size == 1 or i == len(micro_batches) - 1
            with (nullcontext() if sync else model.no_sync()), rt.autocast():
                _, loss = model(x, y, **(inputs[0] if inputs else {}))
            if shares is None:
                (loss / grad_accum).backward()
                loss_sum += loss.detach()
            else:
                (loss * shares[i]).backward()
                loss_sum += loss.detach() * shares[i]
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), optim.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        threads = torch.get_num_threads()
        tuner.after_step(time.perf_counter() - t0, done)  # on the CPU only, where no queued work is left to wait for

        if done % run.log_every == 0 or done == optim.max_steps:
            mean_loss = loss_sum / grad_accum if shares is None else loss_sum
            if rt.world_size > 1:  # SUM then divide: gloo has no AVG
                dist.all_reduce(mean_loss)
                mean_loss /= rt.world_size
            loss_value = mean_loss.item()
            elapsed = time.perf_counter() - t0
            log({
                "step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(),
                "tokens_per_s": tokens_per_step / elapsed, "step_s": elapsed, "tokens_seen": done * tokens_per_step, "threads": threads,
            })
        if done % run.eval_every == 0 or done == optim.max_steps:
            val_loss = validate(raw_model)
            log({"step": done, **validation(val_loss)})
        if done % run.checkpoint_every == 0 or done == optim.max_steps:
            checkpoint(done)

    tuner.close()
    if val_loss is None:  # resumed from the final checkpoint: report the finished run's numbers
        val_loss = validate(raw_model)
    records = read_metrics(metrics_path) if rt.is_main else []
    train_losses = [r["loss"] for r in records if "loss" in r]
    summary = {
        "steps": optim.max_steps,
        "resumed_from_step": start_step if resume_from is not None else None,
        "final_loss": train_losses[-1] if train_losses else loss_value,
        **validation(val_loss),
        "tokens_seen": optim.max_steps * tokens_per_step,
        "tokens_per_step": tokens_per_step,
        "grad_accum": grad_accum,  # None when resumed from the final checkpoint
        "world_size": rt.world_size,
        "params": sum(p.numel() for p in raw_model.parameters()),
        "trainable_params": sum(p.numel() for p in raw_model.parameters() if p.requires_grad),
        "checkpoint": checkpoint_name(optim.max_steps),
        "seconds": round(time.time() - started, 3),
    }
    if rt.is_main:
        plot_losses(records, out / "loss.png")
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    from model.training_stages import training_stage

    training_stage("model.train").main()
