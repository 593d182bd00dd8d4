"""Preference tuning (DPO: Rafailov et al. 2023, "Direct Preference Optimization") of a fine-tuned
model on pairs made from multiple-choice QA records, full or LoRA, with the pretraining loop.

    python -m model.dpo --base SFT_DIR --data QA_DIR [QA_DIR ...] --held-out QA_DIR ... --out RUN_DIR [--config run.json]

(run.json: {"finetune": {FinetuneConfig}, "dpo": {DPOConfig}, "optim": {OptimConfig}, "run": {RunConfig}}.)

Pairs (``preference_pairs``): every train record with options gives ``rejected_per_question``
pairs, each the record's prompt with the gold answer (chosen) and one distractor (rejected),
the distractors drawn from (seed, record id), or (``rejected="model"``) the model's own
likeliest wrong answers: every option scored by the fine-tuned model, judged by the gold answer. Both are rendered as fine-tuning renders an answer
(model/sft.py, the base's template and completion), without the explanation: it argues for the
gold answer, so a pair differs in the answer alone. A question that any held-out record (the
validation and test splits of the QA data evaluation scores) also asks never becomes a pair,
whichever dataset it came from; the pairs dropped so are counted. A share of the train questions
(``val_fraction``, chosen by a stable hash of the record id, so a question stays on its side
however the data grows or is ordered) is held out: their pairs are the validation pairs, never
trained on.

The loss is DPO's sigmoid loss, as TRL's DPOTrainer computes it (``loss_type="sigmoid"``):
-log σ(β((log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r)))), each log-probability the sum
over the completion's tokens ([EOS] included), the mean over the step's pairs. The reference is
the base, the model fine-tuning made: its log-probabilities are computed once, before training
(eval mode, no dropout), which is TRL's ``precompute_ref_log_probs``; a resumed run computes the
same numbers again from the same base. Validation reports the loss, the reward accuracy (how
often the chosen answer's implicit reward β(log π - log π_ref) beats the rejected one's) and the
mean reward margin, on the held-out questions' pairs; where none is held out (``val_fraction`` 0,
or data so small that no question falls in it), on the first training pairs, and the summary's
``val_on`` says which.

The run folder is fine-tuning's: checkpoints, metrics.jsonl, loss.png, summary.json and, at the
end, the trained network as it is published in ``RUN_DIR/model/`` (model/finetune.py ``write_model``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field

from model.base import Base, load_base
from model.checkpoint import load_weights
from model.finetune import FinetuneConfig, read_data, trainable, write_model
from model.model import IGNORE_INDEX
from model.sft import Example, SFTBatches, chat_template, collate, encode_examples
from model.train import OptimConfig, RunConfig, require_memory, setup_runtime, train_loop
from storage.config import config_dataclass
from storage.formats import read_records


@config_dataclass
class DPOConfig:
    """How preference tuning weighs and makes its pairs (the network's training, LoRA or full: a FinetuneConfig)."""

    beta: float = Field(0.1, gt=0, description="DPO's beta: how far the tuned model may move from the reference (the fine-tuned base); larger stays closer.")
    rejected_per_question: int = Field(1, ge=1, le=25, description="Pairs per question, each with another distractor as the rejected answer (at most the question's options but one).")
    rejected: Literal["random", "model"] = Field(
        "random", description="Which distractors are rejected: random (drawn from the seed), or model: the fine-tuned model's own likeliest wrong answers (every option scored by it, judged by the gold answer)."
    )
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of the train questions held out, by a stable hash of the record id: their pairs are the validation pairs, never trained on (0: validate on training pairs, which the summary's val_on says)."
    )



@config_dataclass
class DPORun:
    """One preference tuning: how the network trains (FinetuneConfig), DPO's own settings, the optimization and where it runs."""

    finetune: FinetuneConfig = FinetuneConfig()
    dpo: DPOConfig = DPOConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()


# -- pairs ------------------------------------------------------------------------------------------------


def question_key(record: dict) -> str:
    """What makes two records the same question wherever they come from: the question's words."""
    return " ".join(record["question"].split()).casefold()


def for_validation(record_id: str, fraction: float) -> bool:
    """Whether a train question is held out for validation: a stable hash of its id, below ``fraction``."""
    return int(hashlib.sha256(f"dpo-validation:{record_id}".encode()).hexdigest()[:15], 16) < fraction * 16**15


Pairs = list[tuple[dict, dict]]


def preference_pairs(
    records: Sequence[dict], held_out: Sequence[dict], per_question: int, seed: int, val_fraction: float = 0.0
) -> tuple[Pairs, Pairs, dict]:
    """(chosen, rejected) records of every train record with options whose question no held-out
    record outside the train split asks: the training pairs, and the validation pairs of the
    questions ``for_validation`` holds out; and a report of what was paired and what was left out."""
    guarded = {question_key(r) for r in held_out if r["split"] != "train"}
    pairs: Pairs = []
    validation: Pairs = []
    report = {"questions": 0, "pairs": 0, "validation_questions": 0, "held_out_questions_skipped": 0, "without_options_skipped": 0}
    for record in records:
        if record["split"] != "train":
            continue
        if len(record["options"]) < 2:
            report["without_options_skipped"] += 1
            continue
        if question_key(record) in guarded:
            report["held_out_questions_skipped"] += 1
            continue
        gold = {**record, "explanation": None}
        distractors = [i for i in range(len(record["options"])) if i != record["answer_idx"]]
        rng = np.random.default_rng([seed, int(hashlib.sha256(record["id"].encode()).hexdigest()[:15], 16)])
        held = for_validation(record["id"], val_fraction)
        for i in sorted(rng.choice(distractors, size=min(per_question, len(distractors)), replace=False).tolist()):
            pair_id = f"{record['id']}>{i}"
            (validation if held else pairs).append(({**gold, "id": pair_id}, {**gold, "id": pair_id, "answer_idx": i}))
        report["validation_questions" if held else "questions"] += 1
    report["pairs"] = len(pairs)
    return pairs, validation, report


@dataclass(frozen=True)
class Pair:
    id: str
    chosen: Example
    rejected: Example


def encode_pairs(pairs: Sequence[tuple[dict, dict]], base: Base, cfg: FinetuneConfig, max_length: int) -> tuple[list[Pair], dict]:
    """Tokens of both sides of every pair, as fine-tuning encodes an example; a pair one side of
    which is too long for max_length is dropped and counted."""
    (chosen, chosen_report), (rejected, rejected_report) = (
        encode_examples([pair[side] for pair in pairs], base.encoder, cfg.template, cfg.completion, max_length) for side in (0, 1)
    )
    by_id = {e.id: e for e in rejected}
    encoded = [Pair(c.id, c, by_id[c.id]) for c in chosen if c.id in by_id]
    report = {"pairs_encoded": len(encoded), "pairs_dropped_too_long": len(pairs) - len(encoded),
              "prompts_cut": chosen_report["prompts_cut"] + rejected_report["prompts_cut"]}
    return encoded, report


class PairBatches(SFTBatches):
    """``batch_size`` pairs per micro-batch, drawn as fine-tuning draws its examples: x holds the
    chosen rows then the rejected rows, padded; ``reference_logps`` their reference log-probabilities."""

    weigh_by_targets = False  # every micro-batch holds batch_size pairs, and the loss is a mean over pairs

    def __init__(self, pairs: Sequence[Pair], reference_logps: torch.Tensor, *args, **kwargs):
        super().__init__(pairs, *args, packing=False, **kwargs)
        self.reference_logps = reference_logps  # (pairs, 2): chosen, rejected

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
        rows = self.step_rows(self.step)
        self.step += 1
        micro = [[row[0] for row in rows[i : i + self.batch_size]] for i in range(0, len(rows), self.batch_size)]
        return [pair_batch([self.examples[i] for i in batch], self.reference_logps[batch], self.pad_id, self.device) for batch in micro]


def pair_batch(pairs: Sequence[Pair], reference_logps: torch.Tensor | None, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    x, y, _ = collate([[p.chosen] for p in pairs] + [[p.rejected] for p in pairs], pad_id, False, device)
    inputs = {} if reference_logps is None else {"reference_logps": reference_logps.T.reshape(-1).to(x.device)}
    return x, y, inputs


MAX_OPTIONS = 26  # letters A to Z


def likeliest_wrong(pairs: Sequence[Pair], reference: torch.Tensor, keep: int) -> tuple[list[Pair], torch.Tensor, int]:
    """Of each question's pairs (one per distractor), the ``keep`` whose rejected answer the
    reference finds likeliest, with their reference log-probabilities; and how many questions the
    reference answers wrong (a distractor likelier than the gold answer, as evaluation scores it)."""
    by_question: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        by_question.setdefault(pair.id.rsplit(">", 1)[0], []).append(i)
    kept = sorted(i for rows in by_question.values() for i in sorted(rows, key=lambda i: -reference[i, 1].item())[:keep])
    wrong = sum(bool((reference[rows, 1] > reference[rows[0], 0]).any()) for rows in by_question.values())
    return [pairs[i] for i in kept], reference[kept], wrong


# -- the objective --------------------------------------------------------------------------------------


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of the log-probabilities of its targets (y != -100)."""
    mask = targets != IGNORE_INDEX
    logps = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (logps * mask).sum(-1)


def dpo_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: DPO's sigmoid loss, and the chosen and rejected rewards β(log π - log π_ref).
    Both arguments hold the chosen rows, then the rejected rows."""
    rewards = beta * (policy_logps - reference_logps)
    chosen, rejected = rewards.chunk(2)
    return -F.logsigmoid(chosen - rejected), chosen, rejected


class DPOObjective(torch.nn.Module):
    """The policy as ``train_loop`` trains a model: (x, y, reference_logps) -> (None, mean DPO loss of the pairs)."""

    def __init__(self, policy: torch.nn.Module, beta: float):
        super().__init__()
        self.policy, self.beta = policy, beta

    def forward(self, x: torch.Tensor, y: torch.Tensor, reference_logps: torch.Tensor):
        logits, _ = self.policy(x)
        losses, _, _ = dpo_loss(sequence_logps(logits, y), reference_logps, self.beta)
        return None, losses.mean()


@torch.no_grad()
def policy_logps(policy: torch.nn.Module, pairs: Sequence[Pair], batch_size: int, pad_id: int, device, autocast) -> torch.Tensor:
    """(pairs, 2) log-probabilities of the chosen and rejected answers, in eval mode (no dropout)."""
    was_training = policy.training
    policy.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        x, y, _ = pair_batch(pairs[i : i + batch_size], None, pad_id, device)
        with autocast():
            logits, _ = policy(x)
        out.append(sequence_logps(logits, y).view(2, -1).T.cpu())
    policy.train(was_training)
    return torch.cat(out)


def preference_metrics(objective: DPOObjective, pairs: Sequence[Pair], reference_logps: torch.Tensor, batch_size: int, pad_id: int, device, autocast) -> dict:
    """Mean DPO loss, reward accuracy and reward margin over ``pairs``."""
    logps = policy_logps(objective.policy, pairs, batch_size, pad_id, device, autocast)
    losses, chosen, rejected = dpo_loss(logps.T.reshape(-1), reference_logps.T.reshape(-1), objective.beta)
    return {"loss": losses.mean().item(), "reward_accuracy": (chosen > rejected).float().mean().item(),
            "reward_margin": (chosen - rejected).mean().item()}


# -- training ---------------------------------------------------------------------------------------------


def require_template(base: Base, template: str) -> None:
    """The base must be a model fine-tuned with ``template``: its chat template is the one DPO's prompts use."""
    config = base.path / "tokenizer_config.json"
    saved = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    if saved is None:
        raise ValueError(f"{base.path} has no chat template: preference tuning starts from a fine-tuned model (a finetune artifact); fine-tune first")
    if saved != chat_template(template):
        raise ValueError(f"{base.path} was fine-tuned with another prompt template than {template!r}; set finetune.template to the one it was fine-tuned with")


def dpo(
    ft: FinetuneConfig,
    cfg: DPOConfig,
    optim: OptimConfig,
    run: RunConfig,
    base_path: str | Path,
    records: Sequence[dict],
    held_out: Sequence[dict],
    out: str | Path,
) -> dict:
    """Preference-tune the base on pairs from ``records``' train split (none asked by ``held_out``
    records) into the run folder ``out`` (resumed if it has checkpoints); return the run summary."""
    base = load_base(base_path)
    require_template(base, ft.template)
    max_length = ft.max_length or base.context_length
    if max_length > base.context_length:
        raise ValueError(f"max_length {max_length} is longer than the model's context of {base.context_length} tokens; lower finetune.max_length")
    per_question = MAX_OPTIONS if cfg.rejected == "model" else cfg.rejected_per_question  # model: all, the likeliest kept below
    train_pairs, held_pairs, report = preference_pairs(records, held_out, per_question, optim.seed, cfg.val_fraction)
    if not train_pairs:
        raise ValueError(f"no preference pairs: the QA data has no train questions with options that evaluation does not ask ({report})")
    pairs, encoding = encode_pairs(train_pairs, base, ft, max_length)
    val_pairs = encode_pairs(held_pairs, base, ft, max_length)[0] if held_pairs else []

    rt = setup_runtime(run)
    try:
        policy, description, init_from = trainable(base, ft, optim.seed)
        if init_from is not None:  # full fine-tuning of ours: the weights now, so the reference is computed from them
            load_weights(policy, init_from)
        model = DPOObjective(policy, cfg.beta)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        require_memory(base.shape(), sum(p.numel() for p in model.parameters()), trained, 2 * optim.batch_size, max_length, rt)
        model.to(rt.device)
        pad_id = base.encoder.pad_id
        # Before training the policy is the base (LoRA's B matrices start at zero): the reference.
        reference = policy_logps(policy, pairs, optim.batch_size, pad_id, rt.device, rt.autocast)
        if cfg.rejected == "model":
            pairs, reference, report["questions_answered_wrong"] = likeliest_wrong(pairs, reference, cfg.rejected_per_question)
            report["pairs"] = len(pairs)
        held = bool(val_pairs)
        if not held:  # nothing held out: the first training pairs, which val_on says
            val_pairs = sorted(pairs, key=lambda p: p.id)[: ft.val_examples]
        val_reference = policy_logps(policy, val_pairs, optim.batch_size, pad_id, rt.device, rt.autocast)
        if held and cfg.rejected == "model":
            val_pairs, val_reference, _ = likeliest_wrong(val_pairs, val_reference, cfg.rejected_per_question)
        val_pairs, val_reference = val_pairs[: ft.val_examples], val_reference[: ft.val_examples]
        val_on = (f"{report['validation_questions']} held-out train questions (val_fraction {cfg.val_fraction:g}, by a hash of the record id), never trained on"
                  if held else f"training pairs: no held-out train question to validate on (val_fraction {cfg.val_fraction:g})")
        batches = PairBatches(pairs, reference, optim.batch_size, ft.grad_accum, optim.seed, max_length=max_length, pad_id=pad_id,
                              device=rt.device, rank=rt.rank, world_size=rt.world_size)

        final: dict = {}  # the last validation's metrics: train_loop validates at the last step, or on resuming a finished run

        def validate(m: DPOObjective) -> float:
            final.update(preference_metrics(m, val_pairs, val_reference, optim.batch_size, pad_id, rt.device, rt.autocast))
            return final["loss"]

        summary = train_loop(
            optim, run, rt, model, description, batches, validate=validate, out=Path(out),
            tokens_per_step=2 * optim.batch_size * ft.grad_accum * max_length * rt.world_size,  # at most: rows are padded
            run_info={"tokens": base.tokens, "finetune": asdict(ft), "dpo": asdict(cfg)},
            what="preference tuning", perplexity=False,
        )
    finally:
        if rt.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    summary |= report | encoding | {
        "method": ft.method, "beta": cfg.beta, "max_length": max_length, "val_on": val_on, "val_pairs": len(val_pairs),
        "val_reward_accuracy": final["reward_accuracy"], "val_reward_margin": final["reward_margin"], "format": "hf" if base.hf else "medlm",
    }
    if rt.is_main:
        summary |= write_model(policy, base, ft, Path(out), Path(out) / summary["checkpoint"])
        (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def dpo_on(config: DPORun, out: Path, *, base: Path, data: Sequence[Path], held_out: Sequence[Path] = ()) -> dict:
    """The preference-tuning stage in this process (model/training_stages.py): ``dpo`` on pairs from the
    ``data`` folders' questions, none that the ``held_out`` folders or the data ask outside a train split."""
    train, validation = read_data(data)
    guarded = [r for path in (*held_out, *data) for r in read_records(Path(path))]
    return dpo(config.finetune, config.dpo, config.optim, config.run, base, train + validation, guarded, out)


if __name__ == "__main__":
    from model.training_stages import training_stage

    training_stage("model.dpo").main()
