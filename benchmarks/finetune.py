"""Fine-tuning throughput and loss: packing vs padding, and our loop vs TRL's SFTTrainer.

    python -m benchmarks.finetune --preset tiny --steps 30 --batch 8 --max-lengths 256 512 --threads 1

Data: every bundled QA row (PubMedQA, MedMCQA, MedQA, ChatDoctor instructions), each rendered
with the evaluation prompt and "letter+text+explanation" completions, so lengths vary from ~40
to the full window. Benchmark only: the MedMCQA/MedQA evaluation rows are used as training rows
here (there are too few train rows bundled); every 8th row is held out for the validation loss.
Tokenizer: a 4,096-token byte-level BPE fitted on those rows; model: a fresh ``--preset`` model
(seed 0) with a context of the longest --max-lengths, full fine-tuning, fp32 on CPU (bf16
autocast on CUDA), AdamW, warmup + cosine. Each max_length (tokens per row) is measured apart.

Runs, all the same number of optimizer steps from the same weights:

- ours, padding: ``--batch`` examples a step, each micro-batch padded to its longest row;
- ours, packing: rows of max_length tokens filled with several examples, as many rows a step as
  make about ``--batch`` examples, so both see the same examples per step and per epoch;
- ours on the same network as a Hugging Face LlamaForCausalLM (``hf_model``), padding;
- TRL's SFTTrainer on that LlamaForCausalLM: the same data order (our epochs' permutations
  in sequence, its sampler sequential), batch, optimizer, schedule and clipping; padding (its
  default), fp32, truncation keeping the end as ours does;
- the same SFTTrainer with its loss computed as transformers' Trainer does (the model's own
  cross-entropy on the collator's labels): TRL 1.16 computes every step's loss through a head
  that also yields per-token entropy and top-1 accuracy for its logs, and has no switch to turn
  that off, so this run is TRL's loop and data without that work, like for like with ours.

Each round runs every one of them once, round after round (``--repeats``), so the machine's load
falls on all; each figure is the median round with the slowest and fastest beside it.
tokens/s counts prompt + completion tokens (padding excluded) over the timed steps (all but the
first), timed per step (ours: the loop's step_s; TRL: a callback around each optimizer step).
Writes benchmarks/results/finetune_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.common import REPO, write_result

DATA = REPO / "tests" / "data"
SOURCES = ("pubmedqa", "medmcqa/medmcqa_val.json", "medqa", "instructions")


def qa_records(tmp: Path) -> tuple[list[dict], list[dict]]:
    from storage.formats import read_records
    from tasks.qa import QAConfig, convert_qa

    records = []
    for i, source in enumerate(SOURCES):
        convert_qa(QAConfig(source=str(DATA / source)), tmp / f"qa{i}")
        records += read_records(tmp / f"qa{i}")
    records = sorted(records, key=lambda r: r["id"])
    train = [dict(r, split="train") for i, r in enumerate(records) if i % 8]
    held_out = [dict(r, split="validation") for i, r in enumerate(records) if not i % 8]
    return train, held_out


def make_base(records: list[dict], preset: str, context: int, folder: Path) -> Path:
    """A fresh model of ``preset`` with a BPE fitted on the rows, as a checkpoint folder."""
    import torch
    from safetensors.torch import save_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from model.model import ModelConfig, Transformer
    from model.sft import render
    from storage.formats import SPECIAL_IDS, SPECIAL_TOKENS

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(("".join(render(r, "eval", "letter+text+explanation")) for r in records), trainer)
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    roles = dict(zip(("pad_token", "unk_token", "bos_token", "eos_token"), SPECIAL_TOKENS))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **roles}))
    (folder / "special_tokens_map.json").write_text(json.dumps(roles))
    torch.manual_seed(0)
    config = ModelConfig.preset(preset, vocab_size=tokenizer.get_vocab_size(), context_length=context)
    save_model(Transformer(config), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model": config.to_dict(), "tokens": SPECIAL_IDS}))
    return folder


def timed(run: Path, examples, batches_of_step, steps: int) -> dict:
    """tokens/s of a finished run of ours from its metrics (steps 2..), with padding's share."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_s = {r["step"]: r["step_s"] for r in records if "step_s" in r}
    losses = [r["loss"] for r in records if "loss" in r]
    tokens = positions = 0
    for step in range(1, steps):  # optimizer step `step` is the (step+1)-th logged
        for micro in batches_of_step(step):
            tokens += sum(len(examples[i].prompt) + len(examples[i].completion) for row in micro for i in row)
            positions += len(micro) * max(sum(examples[i].length for i in row) for row in micro)
    seconds = sum(step_s[s + 1] for s in range(1, steps))
    summary = json.loads((run / "summary.json").read_text())
    return {
        "tokens_per_s": round(tokens / seconds, 1), "positions_per_s": round(positions / seconds, 1),
        "padding_share": round(1 - tokens / positions, 3) if positions else 0.0, "step_s": round(seconds / (steps - 1), 4),
        "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4), "val_loss": round(summary["val_loss"], 4),
    }


def micro_rows(batches, step: int) -> list[list[list[int]]]:
    rows = batches.step_rows(step)
    return [rows[i : i + batches.batch_size] for i in range(0, len(rows), batches.batch_size)]


def run_ours(name: str, base: Path, train, held_out, cfg, training, tmp: Path) -> dict:
    from model.base import load_base
    from model.finetune import finetune
    from model.sft import SFTBatches, encode_examples

    optim = training.optim
    summary = finetune(cfg, optim, training.run, base, train, tmp / name, held_out)
    examples, _ = encode_examples(train, load_base(base).encoder, cfg.template, cfg.completion, summary["max_length"])
    batches = SFTBatches(examples, optim.batch_size, cfg.grad_accum, optim.seed, cfg.packing, summary["max_length"])
    result = timed(tmp / name, examples, lambda step: micro_rows(batches, step), optim.max_steps)
    examples_per_step = sum(len(row) for step in range(optim.max_steps) for row in batches.step_rows(step)) / optim.max_steps
    return result | {"rows_per_step": optim.batch_size, "examples_per_step": round(examples_per_step, 2)}


def run_trl(base: Path, hf_dir: Path, train, cfg, training, tmp: Path, metrics: bool = True) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):  # the loss as Trainer computes it: no entropy or accuracy
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    from model.base import load_base
    from model.sft import SFTBatches, encode_examples, render
    from model.train import adamw, lr_at

    max_length, optim = cfg.max_length, training.optim
    examples, _ = encode_examples(train, load_base(base).encoder, cfg.template, cfg.completion, max_length)
    by_id = {r["id"]: r for r in train}
    batches = SFTBatches(examples, optim.batch_size, 1, optim.seed)
    epochs = -(-optim.max_steps * optim.batch_size // len(examples))
    order = [i for epoch in range(epochs) for row in batches.epoch_rows(epoch) for i in row]  # ours, epoch after epoch
    rows = [dict(zip(("prompt", "completion"), render(by_id[examples[i].id], cfg.template, cfg.completion))) for i in order]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).train()
    optimizer = adamw(model, optim, "cpu")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, optim) / optim.lr)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    times = StepTimes()
    args = SFTConfig(
        output_dir=str(tmp / "trl"), per_device_train_batch_size=optim.batch_size, gradient_accumulation_steps=1,
        max_steps=optim.max_steps, learning_rate=optim.lr, max_grad_norm=optim.grad_clip, seed=optim.seed,
        train_sampling_strategy="sequential", max_length=max_length + 1, truncation_mode="keep_end", gradient_checkpointing=False,
        bf16=False, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
    )
    trainer = (SFTTrainer if metrics else PlainLossSFTTrainer)(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(hf_dir),
                         optimizers=(optimizer, schedule), callbacks=[times])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = optim.max_steps
    tokens = sum(len(examples[order[i % len(order)]].prompt) + len(examples[order[i % len(order)]].completion)
                 for i in range(optim.batch_size, steps * optim.batch_size))
    seconds = sum(times.seconds[1:])
    return {"tokens_per_s": round(tokens / seconds, 1), "step_s": round(seconds / (steps - 1), 4),
            "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4)}


def median_round(rounds: list[dict]) -> dict:
    """The median round by tokens/s, with every round's tokens/s: the spread."""
    median = sorted(rounds, key=lambda r: r["tokens_per_s"])[len(rounds) // 2]
    every = [r["tokens_per_s"] for r in rounds]
    return median | {"tokens_per_s_every_round": every, "tokens_per_s_min": min(every), "tokens_per_s_max": max(every)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="examples per optimizer step")
    parser.add_argument("--max-lengths", type=int, nargs="+", default=[256, 512], help="tokens per row, each measured")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, every run once a round")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from model.export_hf import export_hf
    from model.finetune import FinetuneConfig
    from model.sft import encode_examples, pack
    from model.base import load_base
    from model.train import TrainConfig

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="medlm-bench-finetune-"))
    try:
        train, held_out = qa_records(tmp)
        base = make_base(train, args.preset, max(args.max_lengths), tmp / "base")
        hf_dir = export_hf(base, tmp / "hf", base)
        results, data = {}, {}
        for max_length in args.max_lengths:
            padding = FinetuneConfig(method="full", packing=False, max_length=max_length, completion="letter+text+explanation")
            packing = replace(padding, packing=True)
            examples, report = encode_examples(train, load_base(base).encoder, "eval", padding.completion, max_length)
            rows = pack(examples, range(len(examples)), max_length)
            rows_per_step = max(1, round(args.batch * len(rows) / len(examples)))  # about args.batch examples a step
            common = dict(max_steps=args.steps, lr=1e-3, min_lr=1e-4, warmup_steps=3, eval_every=args.steps, checkpoint_every=args.steps, device=args.device)
            padded, packed = TrainConfig.of(batch_size=args.batch, **common), TrainConfig.of(batch_size=rows_per_step, **common)
            runs = {
                "ours_padding": lambda run: run_ours("padding", base, train, held_out, padding, padded, run),
                "ours_packing": lambda run: run_ours("packing", base, train, held_out, packing, packed, run),
                "ours_on_hf_llama_padding": lambda run: run_ours("hf", hf_dir, train, held_out, padding, padded, run),
                "trl_sft_trainer_on_hf_llama_padding": lambda run: run_trl(base, hf_dir, train, padding, padded, run),
                "trl_without_its_step_metrics": lambda run: run_trl(base, hf_dir, train, padding, padded, run, metrics=False),
            }
            rounds: dict[str, list[dict]] = {name: [] for name in runs}
            for round_ in range(args.repeats):
                for name, run in runs.items():
                    rounds[name].append(run(tmp / f"runs-{max_length}-{round_}"))
                    print(f"max_length {max_length}, round {round_ + 1}: {name} {rounds[name][-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
            results[f"max_length={max_length}"] = {name: median_round(done) for name, done in rounds.items()}
            data[f"max_length={max_length}"] = report | {"examples_per_packed_row": round(len(examples) / len(rows), 2), "rows_per_step_packing": rows_per_step}
        import transformers
        import trl

        record = {
            "device": args.device, "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "settings": vars(args), "data": data,
            "results": results,
        }
        path = write_result(f"finetune_{args.device}", record)
        print(json.dumps(results, indent=1))
        print(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
