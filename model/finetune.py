"""Fine-tuning, full or LoRA (model/lora.py), of a base (model/base.py: our checkpoint or a local
Hugging Face causal LM) on QA records (model/sft.py), with the pretraining loop (model/train.py
``train_loop``).

    python -m model.finetune --base CHECKPOINT_DIR --data QA_DIR [QA_DIR ...] --out RUN_DIR [--config run.json]
    python -m model.finetune --base LLAMA_DIR --data QA_DIR --out RUN_DIR      # a Hugging Face folder

(run.json: {"finetune": {FinetuneConfig fields}, "optim": {OptimConfig fields}, "run": {RunConfig fields}}). RUN_DIR gets
checkpoints, metrics.jsonl, loss.png and summary.json, as pretraining's does; started again it
resumes with the same data and the same losses. At the end the trained network, still in memory,
is written as it is published into ``RUN_DIR/model/`` (the finetune stage copies that folder into
its artifact, as pretraining's stage copies the final checkpoint: model/checkpoint.py
``publish_checkpoint``):

- from our checkpoint: ``model.safetensors`` + ``config.json`` + ``state.json`` + the tokenizer
  files, a checkpoint like pretraining's (so evaluation, ``medlm export-hf`` and a
  curriculum's next fine-tuning read it as they read any checkpoint). LoRA is merged into these weights; the
  adapter itself is in ``adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``, keyed
  by the exported LlamaForCausalLM's module names): ``PeftModel.from_pretrained(
  AutoModelForCausalLM.from_pretrained(exported_base), "adapter")`` loads it.
- from a Hugging Face base: a Hugging Face folder (``save_pretrained``: config.json,
  model.safetensors, the tokenizer), LoRA merged, ``adapter/`` as PEFT saves it, ``finetune.json``.

Either way ``tokenizer_config.json`` carries a chat template that renders the prompt the model
was trained on (model/sft.py ``chat_template``).

Run checkpoints of a LoRA run hold the base weights too (simple and resumable; for a large base
that is its size per kept checkpoint).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.distributed as dist
from pydantic import Field, model_validator

from model.base import Base, HFTrainable, load_base
from model.checkpoint import CONFIG_FILE, STATE_FILE, WEIGHTS_FILE, load_checkpoint_config
from model.lora import ADAPTER_DIR, TARGETS, Lora, add_lora, save_adapter
from model.sft import SFTBatches, completion_loss, encode_examples, eval_batches
from model.train import OptimConfig, RunConfig, require_memory, setup_runtime, train_loop
from storage.config import config_dataclass
from storage.store import MANIFEST

MODEL_DIR = "model"  # in the run folder: the fine-tuned model as it is published
RUN_CONFIG_FILE = "finetune.json"  # the run's config of a model published as a Hugging Face folder


@config_dataclass
class FinetuneConfig:
    """How a model is fine-tuned on QA records (the optimizer, its schedule and steps: an OptimConfig)."""

    method: Literal["full", "lora"] = Field("lora", description="full: every weight trains; lora: low-rank adapters (PEFT) on lora_targets, merged into the published weights.")
    lora_rank: int = Field(16, ge=1, le=1024, description="LoRA rank r.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha: the adapter's update is scaled by alpha / rank.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    lora_targets: tuple[Literal["q", "k", "v", "o", "gate", "up", "down"], ...] = Field(
        tuple(TARGETS), description="Projections that get adapters: attention q, k, v, o and the MLP's gate, up, down."
    )
    template: Literal["eval", "instruction"] = Field("eval", description="Prompt: eval (the evaluation prompt, ending 'Answer:') or instruction (### Instruction: / ### Input: / ### Response:).")
    completion: Literal["letter", "letter+text", "letter+text+explanation"] = Field(
        "letter", description="Multiple-choice answer: the letter, then the option's text, then the explanation where there is one (PubMedQA: yes/no/maybe)."
    )
    packing: bool = Field(True, description="Several examples per row of max_length tokens, kept apart by the attention mask (measured faster; benchmarks/finetune.py); else one example per row, padded.")
    max_length: int | None = Field(None, ge=8, description="Tokens per row; a longer prompt is cut from its start (unset: the model's context length).")
    grad_accum: int = Field(1, ge=1, le=4096, description="Micro-batches of batch_size rows per optimizer step.")
    val_examples: int = Field(64, ge=1, description="Examples of the validation split (else of the training set) for the validation loss.")

    @model_validator(mode="after")
    def _targets(self):
        if self.method == "lora" and not self.lora_targets:
            raise ValueError("lora needs at least one of lora_targets (q, k, v, o, gate, up, down)")
        return self

    @property
    def lora(self) -> Lora:
        return Lora(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)



@config_dataclass
class FinetuneRun:
    """One fine-tuning stage: how (FinetuneConfig), the optimization (OptimConfig) and where it runs (RunConfig)."""

    finetune: FinetuneConfig = FinetuneConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()


# -- training ----------------------------------------------------------------------------------------


def trainable(base: Base, cfg: FinetuneConfig, seed: int) -> tuple[torch.nn.Module, dict, Path | None]:
    """(the module train_loop trains, its description for checkpoints, the init_from checkpoint).
    Full fine-tuning of ours starts from the base checkpoint through train_loop's init_from."""
    if cfg.method == "full":
        if base.hf:
            return HFTrainable(base.network()), base.description, None
        return base.network(weights=False), base.description, base.path
    network = add_lora(base.network(), cfg.lora, base.hf, seed)
    return (HFTrainable(network) if base.hf else network), cfg.lora.describe(base.description), None


def finetune(
    cfg: FinetuneConfig,
    optim: OptimConfig,
    run: RunConfig,
    base_path: str | Path,
    records: Sequence[dict],
    out: str | Path,
    validation: Sequence[dict] = (),
) -> dict:
    """Fine-tune the base (our checkpoint folder or a Hugging Face folder) on ``records`` into the
    run folder ``out`` (resumed if it has checkpoints); return the run summary."""
    base = load_base(base_path)
    max_length = cfg.max_length or base.context_length
    if max_length > base.context_length:
        raise ValueError(f"max_length {max_length} is longer than the model's context of {base.context_length} tokens; lower finetune.max_length")
    examples, report = encode_examples(records, base.encoder, cfg.template, cfg.completion, max_length)
    if validation:
        held_out, _ = encode_examples(sorted(validation, key=lambda r: r["id"])[: cfg.val_examples], base.encoder, cfg.template, cfg.completion, max_length)
        val_on = f"validation split ({len(held_out)} examples)"
    else:
        held_out = sorted(examples, key=lambda e: e.id)[: cfg.val_examples]
        val_on = f"training examples ({len(held_out)}; the data has no validation split)"

    rt = setup_runtime(run)
    try:
        model, description, init_from = trainable(base, cfg, optim.seed)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        require_memory(base.shape(), sum(p.numel() for p in model.parameters()), trained, optim.batch_size, max_length, rt)
        model.to(rt.device)
        batches = SFTBatches(examples, optim.batch_size, cfg.grad_accum, optim.seed, cfg.packing, max_length, base.encoder.pad_id, rt.device,
                             rank=rt.rank, world_size=rt.world_size)
        val_batches = eval_batches(held_out, optim.batch_size, base.encoder.pad_id, rt.device)
        summary = train_loop(
            optim, run, rt, model, description, batches,
            validate=lambda m: completion_loss(m, val_batches, rt.autocast),
            out=Path(out),
            tokens_per_step=optim.batch_size * cfg.grad_accum * max_length * rt.world_size,  # at most: rows are padded, or packed nearly full
            run_info={"tokens": base.tokens, "finetune": asdict(cfg)},
            init_from=init_from,
            what="fine-tuning",
        )
    finally:
        if rt.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    summary |= report | {"method": cfg.method, "max_length": max_length, "val_on": val_on, "format": "hf" if base.hf else "medlm"}
    if rt.is_main:
        summary |= write_model(model, base, cfg, Path(out), Path(out) / summary["checkpoint"])
        (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def finetune_on(config: FinetuneRun, out: Path, *, base: Path, data: Sequence[Path]) -> dict:
    """The fine-tuning stage in this process (model/training_stages.py): ``finetune`` on the train
    split of the ``data`` folders, validated on their validation split."""
    records, validation = read_data(data)
    return finetune(config.finetune, config.optim, config.run, base, records, out, validation)


def write_model(model: torch.nn.Module, base: Base, cfg: FinetuneConfig, run: Path, final: Path) -> dict:
    """The trained network as it is published, into ``run/model`` (see the module docstring), from
    memory; ``final`` is the run's last checkpoint (its config and state go along). Returns what
    the summary adds: where the adapter is."""
    out = run / MODEL_DIR
    shutil.rmtree(out, ignore_errors=True)  # a write a crash interrupted
    out.mkdir()
    network = (model.model if base.hf else model).cpu()
    added = {}
    if cfg.method == "lora":
        added["adapter"] = save_adapter(network, cfg.lora, base.hf, out / ADAPTER_DIR)
        network = network.merge_and_unload()
    if base.hf:
        network.save_pretrained(out, safe_serialization=True)
        shutil.copyfile(final / CONFIG_FILE, out / RUN_CONFIG_FILE)
    else:  # a plain checkpoint of the base's shape, the adapter merged in
        from safetensors.torch import save_model

        save_model(network, str(out / WEIGHTS_FILE))
        (out / CONFIG_FILE).write_text(json.dumps(load_checkpoint_config(final) | {"model": base.description}, indent=2))
    shutil.copyfile(final / STATE_FILE, out / STATE_FILE)
    base.save_tokenizer(out, cfg.template)
    return added


def model_files(run: Path, summary: dict) -> list[Path]:
    """What a fine-tuning stage publishes (model/distributed.py ``train_stage``): the folder ``write_model`` wrote."""
    return sorted((run / MODEL_DIR).iterdir())


# -- the data -----------------------------------------------------------------------------------------


def read_data(paths: Sequence[str | Path]) -> tuple[list[dict], list[dict]]:
    """(train, validation) records of qa artifact folders or records.parquet files; a one-line
    error when none is for training."""
    from storage.formats import read_records

    records = [r for p in paths for r in read_records(Path(p))]
    train = [r for r in records if r["split"] == "train"]
    if not train:
        splits = ", ".join(f"{n} {s}" for s, n in sorted(Counter(r["split"] for r in records).items())) or "no records"
        raise ValueError(
            f"no training examples: the QA data {', '.join(map(data_name, paths))} has no train split ({splits}); fine-tune on a "
            f"source with train records (the MedMCQA/MedQA validation and test rows are for evaluation only)"
        )
    return train, [r for r in records if r["split"] == "validation"]


def data_name(path: str | Path) -> str:
    """What an error calls a folder of QA data: its artifact's label (the source, e.g. medqa), else its path."""
    manifest = Path(path) / MANIFEST
    return (json.loads(manifest.read_text()).get("label") if manifest.is_file() else None) or str(path)


if __name__ == "__main__":
    from model.training_stages import training_stage

    training_stage("model.finetune").main()
