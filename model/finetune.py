"""Fine-tuning, full or LoRA (through PEFT), of our checkpoint or of a local Hugging Face causal LM,
on QA records (model/sft.py), with the pretraining loop (model/train.py ``train_loop``).

    python -m model.finetune --base CHECKPOINT_DIR --data QA_DIR [QA_DIR ...] --out RUN_DIR [--config run.json]
    python -m model.finetune --hf-base LLAMA_DIR --data QA_DIR --out RUN_DIR

(run.json: {"finetune": {FinetuneConfig fields}, "optim": {OptimConfig fields}, "run": {RunConfig fields}}). RUN_DIR gets
checkpoints, metrics.jsonl, loss.png and summary.json, as pretraining's does; started again it
resumes with the same data and the same losses. ``publish`` then writes the fine-tuned model:

- from our checkpoint: ``model.safetensors`` + ``config.json`` + ``state.json`` + the tokenizer
  files, a checkpoint like pretraining's (so evaluation, ``medlm export-hf`` and the next
  curriculum stage read it as they read any checkpoint). LoRA is merged into these weights; the
  adapter itself is in ``adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``, keyed
  by the exported LlamaForCausalLM's module names): ``PeftModel.from_pretrained(
  AutoModelForCausalLM.from_pretrained(exported_base), "adapter")`` loads it. GPT-2-style models
  (arch "gpt2") get no adapter folder: transformers' GPT2 fuses q, k and v into one c_attn, which
  our separate q/k/v adapters do not map onto; their merged weights are published as usual.
- from a Hugging Face base: a Hugging Face folder (``save_pretrained``: config.json,
  model.safetensors, the tokenizer), LoRA merged, ``adapter/`` as PEFT saves it, ``finetune.json``.

Either way ``tokenizer_config.json`` carries a chat template that renders the prompt the model
was trained on (model/sft.py ``chat_template``).

Run checkpoints of a LoRA run hold the base weights too (simple and resumable; for a large base
that is its size per kept checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator

from model.checkpoint import (
    CHECKPOINT_FILES,
    CONFIG_FILE,
    RUN_FILES,
    STATE_FILE,
    WEIGHTS_FILE,
    check_causal_lm,
    is_hf_folder,
    load_checkpoint_config,
    load_weights,
    remove_run,
)
from model.model import IGNORE_INDEX, ModelConfig, Transformer, segment_positions
from model.sft import (
    Encoder,
    HFEncoder,
    SFTBatches,
    TokenizerEncoder,
    completion_loss,
    encode_examples,
    eval_batches,
    write_chat_template,
)
from model.train import OptimConfig, RunConfig, require_memory, setup_runtime, train_loop
from storage.config import ArgumentParser, config_dataclass
from storage.formats import SPECIAL_IDS, TOKENIZER_FILE, TOKENIZER_FILES, load_tokenizer

ADAPTER_DIR = "adapter"
RUN_CONFIG_FILE = "finetune.json"  # the run's config of a model published as a Hugging Face folder
LORA_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@config_dataclass
class FinetuneConfig:
    """How a model is fine-tuned on QA records (the optimizer, its schedule and steps: an OptimConfig)."""

    method: Literal["full", "lora"] = Field("lora", description="full: every weight trains; lora: low-rank adapters (PEFT) on lora_targets, merged into the published weights.")
    lora_rank: int = Field(16, ge=1, le=1024, description="LoRA rank r.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha: the adapter's update is scaled by alpha / rank.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    lora_targets: tuple[Literal["q", "k", "v", "o", "gate", "up", "down"], ...] = Field(
        tuple(LORA_TARGETS), description="Projections that get adapters: attention q, k, v, o and the MLP's gate, up, down."
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


# -- the base ------------------------------------------------------------------------------------


@dataclass
class Base:
    """The model a fine-tuning starts from: ours (a checkpoint folder) or a Hugging Face folder."""

    path: Path
    hf: bool
    encoder: Encoder
    tokens: dict  # special-token ids, for checkpoints' config.json
    description: dict  # what the network is: a resumed run must match it
    context_length: int
    tokenizer: object  # ours: tokenizers.Tokenizer; HF: its PreTrainedTokenizer

    def network(self, weights: bool = True) -> torch.nn.Module:
        """A fresh copy of the base network (fp32, CPU), with its weights unless ``weights=False``."""
        if self.hf:
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True, dtype=torch.float32)
        model = Transformer(ModelConfig.from_dict(self.description))
        if weights:
            load_weights(model, self.path)
        return model


def load_base(path: str | Path) -> Base:
    """Our checkpoint folder (weights, config.json and the tokenizer files), or a Hugging Face
    causal-LM folder; checked: a one-line error when the tokenizer does not fit the model."""
    path = Path(path)
    if is_hf_folder(path) or not (path / CONFIG_FILE).is_file():
        return _load_hf_base(path)
    config = load_checkpoint_config(path)
    model_config = ModelConfig.from_dict(config["model"])
    if not (path / TOKENIZER_FILE).is_file():
        raise ValueError(f"{path} has no {TOKENIZER_FILE}; fine-tune a checkpoint artifact (it carries its tokenizer) or copy the tokenizer files in")
    tokenizer = load_tokenizer(path / TOKENIZER_FILE)
    if tokenizer.get_vocab_size() != model_config.vocab_size:
        raise ValueError(
            f"{path}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocabulary is {model_config.vocab_size}; "
            f"use the tokenizer the model was trained with"
        )
    tokens = config.get("tokens") or SPECIAL_IDS
    encoder = TokenizerEncoder(tokenizer, eos_id=tokens["eos_id"], pad_id=tokens["pad_id"])
    return Base(path, False, encoder, tokens, model_config.to_dict(), model_config.context_length, tokenizer)


def _load_hf_base(path: Path) -> Base:
    from transformers import AutoConfig, AutoTokenizer

    check_causal_lm(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    vocab = config.get_text_config().vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}; "
            f"use the tokenizer the model was trained with (or resize the model's embeddings first)"
        )
    encoder = HFEncoder(tokenizer)
    tokens = {"pad_id": encoder.pad_id, "eos_id": encoder.eos_id, "bos_id": tokenizer.bos_token_id}
    context = next((getattr(config, a) for a in ("max_position_embeddings", "n_positions", "n_ctx") if getattr(config, a, None)), None)
    if context is None:
        raise ValueError(f"{path}: config.json names no context length (max_position_embeddings, n_positions, n_ctx)")
    description = {"hf": json.loads(config.to_json_string(use_diff=False))}
    return Base(path, True, encoder, tokens, description, context, tokenizer)


class HFTrainable(torch.nn.Module):
    """A transformers causal LM as ``train_loop`` trains ours: (x, y, segments) -> (logits, mean
    loss over y != -100). Packed rows become position_ids restarting at 0 per example, from which
    transformers (sdpa, no attention_mask) builds the same block-diagonal causal mask as ours."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, segments: torch.Tensor | None = None):
        positions = segment_positions(segments) if segments is not None else None
        logits = self.model(input_ids=idx, position_ids=positions, use_cache=False).logits
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return logits, loss


# -- LoRA (PEFT) -----------------------------------------------------------------------------------


def lora_config(cfg: FinetuneConfig, for_hf: bool):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=[LORA_TARGETS[t] for t in cfg.lora_targets], task_type="CAUSAL_LM" if for_hf else None,
    )


def add_lora(model: torch.nn.Module, cfg: FinetuneConfig, hf: bool, seed: int):
    """``model`` with LoRA adapters (only they train; B starts at zero, so nothing changes yet)."""
    from peft import get_peft_model

    torch.manual_seed(seed)  # the adapters' A matrices
    return get_peft_model(model, lora_config(cfg, for_hf=hf))


def save_adapter(peft_model, cfg: FinetuneConfig, hf: bool, out_dir: Path) -> str:
    """The adapter in PEFT's format (adapter_config.json + adapter_model.safetensors), under the
    module names of the Hugging Face model it applies to; returns what was written, or why not."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from model.export_hf import hf_module_name

    if hf:
        peft_model.save_pretrained(out_dir)
        config_file = out_dir / "adapter_config.json"  # PEFT writes the base's local path: not in an artifact
        config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"base_model_name_or_path": None}, indent=2, sort_keys=True) + "\n")
        return ADAPTER_DIR
    if peft_model.get_base_model().config.arch != "llama":
        return "not written: transformers' GPT-2 fuses q, k, v into c_attn, which our adapters do not map onto (the merged weights have them)"
    renamed = {}
    for key, tensor in get_peft_model_state_dict(peft_model).items():  # base_model.model.blocks.0.attn.q_proj.lora_A.weight
        module, _, leaf = key.removeprefix("base_model.model.").rpartition(".lora_")
        renamed[f"base_model.model.{hf_module_name(module)}.lora_{leaf}"] = tensor.detach().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(renamed, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora_config(cfg, for_hf=True).save_pretrained(str(out_dir))
    return ADAPTER_DIR


# -- training ----------------------------------------------------------------------------------------


def trainable(base: Base, cfg: FinetuneConfig, seed: int) -> tuple[torch.nn.Module, dict, Path | None]:
    """(the module train_loop trains, its description for checkpoints, the init_from checkpoint).
    Full fine-tuning of ours starts from the base checkpoint through train_loop's init_from."""
    if cfg.method == "full":
        if base.hf:
            return HFTrainable(base.network()), base.description, None
        return base.network(weights=False), base.description, base.path
    network = add_lora(base.network(), cfg, base.hf, seed)
    description = {"lora_of": base.description, "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "targets": list(cfg.lora_targets)}}
    return (HFTrainable(network) if base.hf else network), description, None


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
        require_memory(_shape(base), sum(p.numel() for p in model.parameters()), trained, optim.batch_size, max_length, rt)
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
        (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _shape(base: Base) -> ModelConfig:
    """The base's shape as a ModelConfig (a Hugging Face model's from its config), for the memory estimate."""
    if not base.hf:
        return ModelConfig.from_dict(base.description)
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(base.path, local_files_only=True)
    return ModelConfig(vocab_size=c.vocab_size, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, d_model=c.hidden_size,
                       mlp_hidden=c.intermediate_size, context_length=base.context_length, n_kv_head=None)


# -- publishing ---------------------------------------------------------------------------------------


def publish(run: Path, summary: dict, out_dir: Path, base_path: str | Path, cfg: FinetuneConfig, seed: int) -> dict:
    """Write the fine-tuned model of a finished run into out_dir (see the module docstring), then
    drop the run folder; returns what the summary adds (where the adapter is)."""
    base = load_base(base_path)
    final = run / summary["checkpoint"]
    extra = {}
    if cfg.method == "full" and not base.hf:
        for name in CHECKPOINT_FILES:
            shutil.copyfile(final / name, out_dir / name)
    else:
        model, _, _ = trainable(base, cfg, seed)
        load_weights(model, final)
        network = model.model if base.hf else model
        if cfg.method == "lora":
            extra["adapter"] = save_adapter(network, cfg, base.hf, out_dir / ADAPTER_DIR)
            network = network.merge_and_unload()
        if base.hf:
            network.save_pretrained(out_dir, safe_serialization=True)
            shutil.copyfile(final / CONFIG_FILE, out_dir / RUN_CONFIG_FILE)
        else:
            from safetensors.torch import save_model

            save_model(network, str(out_dir / WEIGHTS_FILE))
            config = load_checkpoint_config(final) | {"model": base.description}  # a plain checkpoint of the merged model
            (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        shutil.copyfile(final / STATE_FILE, out_dir / STATE_FILE)
    for name in RUN_FILES:
        shutil.copyfile(run / name, out_dir / name)
    if base.hf:
        from model.sft import chat_template

        base.tokenizer.chat_template = chat_template(cfg.template)
        base.tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    else:
        for name in TOKENIZER_FILES:
            shutil.copyfile(base.path / name, out_dir / name)
        write_chat_template(out_dir / "tokenizer_config.json", cfg.template)
    summary = summary | extra
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    remove_run(run)
    return summary


# -- the data -----------------------------------------------------------------------------------------


def read_data(paths: Sequence[str | Path], names: Sequence[str] = ()) -> tuple[list[dict], list[dict]]:
    """(train, validation) records of qa artifact folders or records.parquet files (``names``: what
    the error calls them); a one-line error when none is for training."""
    from storage.formats import read_records

    records = [r for p in paths for r in read_records(Path(p))]
    train = [r for r in records if r["split"] == "train"]
    if not train:
        splits = ", ".join(f"{n} {s}" for s, n in sorted(Counter(r["split"] for r in records).items())) or "no records"
        raise ValueError(
            f"no training examples: the QA data {', '.join(names or map(str, paths))} has no train split ({splits}); fine-tune on a "
            f"source with train records (the MedMCQA/MedQA validation and test rows are for evaluation only)"
        )
    return train, [r for r in records if r["split"] == "validation"]


# -- command line -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base = parser.add_mutually_exclusive_group(required=True)
    base.add_argument("--base", help="checkpoint folder (a pretrain or finetune artifact, or a ckpt_NNNNNNN folder with the tokenizer files)")
    base.add_argument("--hf-base", help="a Hugging Face causal-LM folder")
    parser.add_argument("--data", nargs="+", required=True, help="qa artifact folders or records.parquet files (their train split is trained on)")
    parser.add_argument("--out", required=True, help="run folder (resumed if it has checkpoints)")
    parser.add_argument("--config", help='JSON file: {"finetune": {...}, "optim": {...}, "run": {...}}')
    args = parser.parse_args(argv)
    tables = json.loads(Path(args.config).read_text()) if args.config else {}
    cfg, optim, run = FinetuneConfig(**tables.get("finetune", {})), OptimConfig(**tables.get("optim", {})), RunConfig(**tables.get("run", {}))
    try:
        records, validation = read_data(args.data)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress lines, to the console (or the launching stage)
    summary = finetune(cfg, optim, run, args.base or args.hf_base, records, args.out, validation)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
