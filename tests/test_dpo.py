"""Preference tuning (DPO): pairs from real QA rows, the leak guard, the loss against TRL's
DPOTrainer on the same pairs, full and LoRA, resume after SIGKILL, the stage and the flow (CPU, tiny)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import kill_once_written
from eval_records import DATA, load_records

from model.checkpoint import load_model
from model.dpo import DPOConfig, PairBatches, dpo, dpo_loss, encode_pairs, for_validation, likeliest_wrong, policy_logps, preference_pairs, question_key
from model.export_hf import to_hf_model
from model.base import load_base
from model.finetune import FinetuneConfig, finetune
from model.sft import render
from model.train import OptimConfig, RunConfig, TrainConfig, adamw, lr_at

RECORDS = load_records()
PAIRED = [dict(r, split="train") for r in RECORDS if r["source"] == "medmcqa"]  # test-only relabelling: the stage never does this

def small(**overrides) -> tuple[OptimConfig, RunConfig]:
    config = TrainConfig.of(**(dict(max_steps=4, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=1, eval_every=100, checkpoint_every=100) | overrides))
    return config.optim, config.run


def metrics(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r}


FT = FinetuneConfig(method="full", max_length=256, completion="letter+text")


@pytest.fixture(scope="module")
def sft(tiny_checkpoint, tmp_path_factory) -> Path:
    """The reference: conftest's tiny checkpoint, fine-tuned a few steps on PubMedQA's train split."""
    out = tmp_path_factory.mktemp("sft")
    finetune(FT, *small(), tiny_checkpoint.path, [r for r in RECORDS if r["source"] == "pubmedqa" and r["split"] == "train"], out)
    return out / "model"


def test_pairs_are_the_gold_answer_against_distractors_of_train_questions_evaluation_never_asks():
    medmcqa = [r for r in RECORDS if r["source"] == "medmcqa"]
    train = [dict(r, split="train") for r in medmcqa]
    # Five of them are also asked, reworded only in spacing and case, by another dataset's test split.
    asked = [dict(r, id=f"other:{i}", source="medqa", split="test", question="  " + r["question"].upper().replace(" ", "\n ")) for i, r in enumerate(medmcqa[:5])]
    pairs, validation, report = preference_pairs(train, asked, per_question=2, seed=3)
    assert validation == [] and report["held_out_questions_skipped"] == 5 and report["questions"] == len(train) - 5 and len(pairs) == 2 * (len(train) - 5)
    assert not {question_key(c) for c, _ in pairs} & {question_key(r) for r in asked}
    by_question: dict[str, set[int]] = {}
    for chosen, rejected in pairs:
        original = next(r for r in train if r["id"] == chosen["id"].split(">")[0])
        assert chosen["answer_idx"] == original["answer_idx"] and rejected["answer_idx"] != original["answer_idx"]
        assert chosen["explanation"] is None is rejected["explanation"] and chosen["question"] == rejected["question"] == original["question"]
        by_question.setdefault(original["id"], set()).add(rejected["answer_idx"])
    assert all(len(distractors) == 2 for distractors in by_question.values())  # two different distractors
    assert preference_pairs(train, asked, 2, seed=3)[0] == pairs  # a function of the seed
    assert preference_pairs(train, asked, 2, seed=4)[0] != pairs
    # The test split itself never pairs, and a record without options (instruction data) neither.
    assert preference_pairs(medmcqa, [], 1, 0)[0] == []
    assert preference_pairs([dict(train[0], options=[], answer_idx=None)], [], 1, 0)[2]["without_options_skipped"] == 1


def questions(pairs) -> set[str]:
    return {chosen["id"].split(">")[0] for chosen, _ in pairs}


def test_validation_questions_are_held_out_by_a_hash_of_the_record_id_and_never_trained_on():
    pairs, validation, report = preference_pairs(PAIRED, [], 2, seed=0, val_fraction=0.25)
    held = {r["id"] for r in PAIRED if for_validation(r["id"], 0.25)}
    assert questions(validation) == held and not questions(pairs) & held and questions(pairs) | held == {r["id"] for r in PAIRED}
    assert 0 < report["validation_questions"] == len(held) < report["questions"] == len(PAIRED) - len(held) and len(validation) == 2 * len(held)
    # A question keeps its side whatever the seed, the order, or the other records: data that grows moves nothing.
    assert questions(preference_pairs(PAIRED[::-1], [], 1, seed=5, val_fraction=0.25)[1]) == held
    assert questions(preference_pairs(PAIRED[:20], [], 1, seed=0, val_fraction=0.25)[1]) == held & {r["id"] for r in PAIRED[:20]}
    assert held < {r["id"] for r in PAIRED if for_validation(r["id"], 0.5)}  # a larger share holds out more, the same ones first
    assert preference_pairs(PAIRED, [], 1, seed=0)[1] == []  # val_fraction 0: none


def test_the_validation_loss_is_dpo_s_loss_on_the_held_out_pairs(sft, tmp_path):
    """What the summary reports as validation is the loss, by the published model against the
    reference, on the pairs of the held-out questions: pairs it never trained on."""
    from model.train import setup_runtime

    cfg = DPOConfig(beta=0.5, val_fraction=0.25)
    summary = dpo(FT, cfg, *small(max_steps=3), sft, PAIRED, [], tmp_path)
    _, held, report = preference_pairs(PAIRED, [], 1, seed=small()[0].seed, val_fraction=0.25)
    assert summary["validation_questions"] == report["validation_questions"] == summary["val_pairs"] > 0
    assert summary["val_on"] == f"{report['validation_questions']} held-out train questions (val_fraction 0.25, by a hash of the record id), never trained on"
    base = load_base(sft)
    encoded, _ = encode_pairs(held, base, FT, 256)
    autocast = setup_runtime(RunConfig(device="cpu")).autocast
    policy, reference = (policy_logps(load_model(folder), encoded, 8, base.encoder.pad_id, "cpu", autocast) for folder in (tmp_path / "model", sft))
    losses, _, _ = dpo_loss(policy.T.reshape(-1), reference.T.reshape(-1), cfg.beta)
    assert summary["val_loss"] == pytest.approx(losses.mean().item(), rel=1e-5) and summary["val_loss"] != pytest.approx(math.log(2))


@pytest.mark.parametrize("method, lr, at_most, at_least", [("full", 3e-3, 0.5, 0.9), ("lora", 1e-2, 0.95, 0.6)])
def test_the_first_loss_is_log_2_and_training_prefers_the_gold_answers(sft, tmp_path, method, lr, at_most, at_least):
    """Before the first update the policy is the reference (full: the same weights; LoRA: adapters
    at zero), so every pair's loss is log 2 and no reward is ahead; 30 steps on the pairs bring the
    loss down and put the chosen answer's reward ahead on most of the pairs trained on (the
    adapters of a 2-layer model of width 32 move less)."""
    ft = FinetuneConfig(method=method, max_length=256, completion="letter+text")
    summary = dpo(ft, DPOConfig(beta=0.5, val_fraction=0), *small(max_steps=30, lr=lr), sft, PAIRED, [], tmp_path)
    assert summary["val_on"] == "training pairs: no held-out train question to validate on (val_fraction 0)"
    assert metrics(tmp_path, "loss")[1] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["val_loss"] < at_most * math.log(2) and summary["val_reward_accuracy"] > at_least and summary["val_reward_margin"] > 0, summary
    assert "val_ppl" not in summary and "val_ppl" not in (tmp_path / "metrics.jsonl").read_text()
    assert summary["method"] == method and load_base(tmp_path / "model").context_length == 256  # the published model loads


def test_model_rejected_answers_are_the_reference_s_likeliest_wrong_options(sft, tmp_path):
    """rejected="model": every distractor scored by the fine-tuned model, the likeliest kept, so
    the rejected answer is the one the model would give where it answers wrong."""
    from model.train import setup_runtime

    summary = dpo(FT, DPOConfig(rejected="model", val_fraction=0), *small(max_steps=1), sft, PAIRED, [], tmp_path)
    base = load_base(sft)
    every, _ = encode_pairs(preference_pairs(PAIRED, [], 25, seed=0)[0], base, FT, 256)
    scores = policy_logps(load_model(sft), every, 8, base.encoder.pad_id, "cpu", setup_runtime(RunConfig(device="cpu")).autocast)
    best: dict[str, tuple[float, str]] = {}
    gold: dict[str, float] = {}
    for pair, (chosen, rejected) in zip(every, scores.tolist()):
        question = pair.id.rsplit(">", 1)[0]
        best[question] = max(best.get(question, (-math.inf, "")), (rejected, pair.id))
        gold[question] = chosen
    assert summary["pairs"] == summary["questions"] == len(best) == len(PAIRED)
    assert summary["questions_answered_wrong"] == sum(best[q][0] > gold[q] for q in best) > 0
    kept, kept_scores, _ = likeliest_wrong(every, scores, keep=1)
    assert sorted(p.id for p in kept) == sorted(pair_id for _, pair_id in best.values())
    assert kept_scores[:, 1].tolist() == [best[p.id.rsplit(">", 1)[0]][0] for p in kept]


def test_a_base_that_was_never_fine_tuned_is_refused(tiny_checkpoint, sft, tmp_path):
    with pytest.raises(ValueError, match=r"has no chat template: preference tuning starts from a fine-tuned model .* fine-tune first"):
        dpo(FT, DPOConfig(), *small(), tiny_checkpoint.path, PAIRED, [], tmp_path / "a")
    with pytest.raises(ValueError, match=r"was fine-tuned with another prompt template than 'instruction'; set finetune.template"):
        dpo(FinetuneConfig(template="instruction"), DPOConfig(), *small(), sft, PAIRED, [], tmp_path / "b")
    with pytest.raises(ValueError, match=r"no preference pairs: the QA data has no train questions with options that evaluation does not ask"):
        dpo(FT, DPOConfig(), *small(), sft, PAIRED, PAIRED_AS_TEST, tmp_path / "c")


PAIRED_AS_TEST = [dict(r, split="test") for r in PAIRED]


# -- the peer: TRL's DPOTrainer ---------------------------------------------------------------------

PEER_STEPS = 6
PEER_TOLERANCE = 1e-6  # relative; measured at most 4.3e-7 (float32 rounding)


def test_the_first_losses_equal_trl_dpo_trainer_s(sft, tmp_path):
    """The same reference and starting weights (ours, exported to LlamaForCausalLM for TRL), the
    same pairs in the same order (TRL's sampler sequential), batch 2 x gradient accumulation 2,
    the same AdamW groups, warmup + cosine, clipping; sigmoid loss, beta 0.1; no dropout. Our
    reference log-probabilities are computed once before training, TRL's by its reference model
    at every step."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig as TRLConfig, DPOTrainer

    base = load_base(sft)
    cfg = DPOConfig(beta=0.1)
    pairs, _, _ = preference_pairs(PAIRED, [], 1, seed=7, val_fraction=cfg.val_fraction)
    uncut, _ = encode_pairs(pairs, base, FT, max_length=10_000)
    fits = {p.id for p in uncut if max(p.chosen.length, p.rejected.length) <= FT.max_length}  # TRL would not cut a prompt as we do
    records = [r for r in PAIRED if any(i.startswith(r["id"] + ">") for i in fits)]
    optim, run = small(max_steps=PEER_STEPS, batch_size=2, warmup_steps=2, weight_decay=0.1, seed=7, lr=1e-3)
    ft = FinetuneConfig(method="full", max_length=256, completion="letter+text", grad_accum=2)
    dpo(ft, cfg, optim, run, sft, records, [], tmp_path / "ours")
    ours = metrics(tmp_path / "ours", "loss")

    pairs, _, _ = preference_pairs(records, [], 1, seed=7, val_fraction=cfg.val_fraction)
    encoded, report = encode_pairs(pairs, base, ft, ft.max_length)
    assert report["prompts_cut"] == 0 and len(encoded) == len(pairs)
    order = [row[0] for row in PairBatches(encoded, torch.zeros(len(encoded), 2), 2, 2, seed=optim.seed).epoch_rows(0)]
    assert len(order) >= PEER_STEPS * 4
    by_id = {c["id"]: (c, r) for c, r in pairs}
    rows = []
    for i in order:
        chosen, rejected = by_id[encoded[i].id]
        prompt, answer = render(chosen, ft.template, ft.completion)
        rows.append({"prompt": prompt, "chosen": answer, "rejected": render(rejected, ft.template, ft.completion)[1]})
    tokens = json.loads((sft / "config.json").read_text())["tokens"]
    model = to_hf_model(load_model(sft), tokens).train()
    optimizer = adamw(model, optim, "cpu")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, optim) / optim.lr)
    args = TRLConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=PEER_STEPS,
        learning_rate=optim.lr, max_grad_norm=optim.grad_clip, seed=optim.seed, train_sampling_strategy="sequential", beta=0.1,
        loss_type=["sigmoid"], max_length=None, gradient_checkpointing=False, bf16=False, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True,
    )
    reference = to_hf_model(load_model(sft), tokens)  # TRL's default: a frozen copy, run at every step
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(sft),
                         optimizers=(optimizer, schedule))
    trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(theirs) == PEER_STEPS
    for step, loss in enumerate(theirs, 1):
        assert ours[step] == pytest.approx(loss, rel=PEER_TOLERANCE), f"step {step}: ours {ours[step]}, TRL {loss}"


# -- crashes -------------------------------------------------------------------------------------------


def test_a_killed_lora_run_resumes_with_the_same_losses(sft, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.formats import qa_schema

    optim, run = small(max_steps=30, batch_size=2, checkpoint_every=5, eval_every=15)
    ft = FinetuneConfig(method="lora", max_length=256, completion="letter+text")
    tables = {"finetune": asdict(ft), "dpo": {"beta": 0.2}, "optim": asdict(optim), "run": asdict(run)}
    (tmp_path / "run.json").write_text(json.dumps(tables))
    data = tmp_path / "records"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(PAIRED, schema=qa_schema()), data / "records.parquet")
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "model.dpo", "--base", str(sft), "--data", str(data), "--out", str(killed), "--config", str(tmp_path / "run.json")]
    kill_once_written(command, killed / "ckpt_0000010")
    assert not (killed / "ckpt_0000030").exists()

    summary = dpo(ft, DPOConfig(beta=0.2), optim, run, sft, PAIRED, [], killed)
    dpo(ft, DPOConfig(beta=0.2), optim, run, sft, PAIRED, [], tmp_path / "straight")
    assert summary["resumed_from_step"] >= 10
    resumed, straight = metrics(killed, "loss"), metrics(tmp_path / "straight", "loss")
    assert sorted(resumed) == list(range(1, 31))
    for step in range(summary["resumed_from_step"] + 1, 31):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7)
    assert (killed / "model" / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model" / "model.safetensors").read_bytes()


# -- the stage and the flow ------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_server")
def test_the_finetune_flow_preference_tunes_after_the_curriculum_and_evaluates_before_and_after(tiny_checkpoint, store):
    from flows.finetune import Curriculum, comparison, finetune as finetune_flow
    from storage import ArtifactSpec
    from storage.lineage import lineage
    from tasks.evaluate import EvaluationConfig
    from tasks.qa import QASources

    pretrained = store.get_or_build(ArtifactSpec("pretrain", "test"), lambda work: [shutil.copy2(p, work) for p in tiny_checkpoint.path.iterdir() if p.name != "manifest.json"] and None)
    qa = QASources(pubmedqa=str(DATA / "pubmedqa"), medqa=str(DATA / "medqa"))
    evaluation = EvaluationConfig(benchmarks=("pubmedqa", "medqa_4options"), shots=(0,), max_items=4, generation_items=0)
    curriculum = Curriculum(sources=("pubmedqa",), preference_sources=("pubmedqa",))
    optim, run = small(max_steps=2)
    refs = finetune_flow(finetune=FT, finetune_optim=optim, finetune_run=run, curriculum=curriculum, qa=qa, evaluation=evaluation,
                         dpo=DPOConfig(beta=0.2, rejected_per_question=2), dpo_optim=optim, base_ref=pretrained.ref)

    assert len(refs) == 3  # the base, after fine-tuning, after DPO
    tuned = store.require(store.require(refs[2]).parents[0])
    sft_model = store.require(store.require(refs[1]).parents[0])
    assert tuned.kind == "dpo" and tuned.parents[0] == sft_model.ref and sft_model.kind == "finetune"
    data, *held_out = map(store.require, tuned.parents[1:])
    assert data.kind == "trainset" and data.label == "pubmedqa" and data.ref == sft_model.parents[1]  # pairs from PubMedQA's cleaned train split, as fine-tuning's
    assert sorted(a.label for a in held_out) == ["medqa", "pubmedqa"]  # every evaluated QA artifact's test questions guarded, in the lineage
    assert {n.ref for n in lineage(store, tuned.ref).parents} == {sft_model.ref, data.ref, *(a.ref for a in held_out)}
    assert tuned.summary["pairs"] == 2 * tuned.summary["questions"] and tuned.summary["questions"] + tuned.summary["validation_questions"] == 26
    assert tuned.summary["validation_questions"] > 0 and tuned.summary["held_out_questions_skipped"] == 0
    assert (tuned.path / "tokenizer_config.json").read_text() == (sft_model.path / "tokenizer_config.json").read_text()  # the chat template goes on
    rows = comparison(store, refs)
    assert list(rows[0]) == ["benchmark", "how", "metric", "base", "1. pubmedqa", "2. DPO on pubmedqa", "baseline"]
    with pytest.raises(ValueError, match=rf"preference tuning starts from a fine-tuned model, not {pretrained.ref}: name --sources to fine-tune it first"):
        finetune_flow(finetune=FT, finetune_optim=optim, finetune_run=run, curriculum=Curriculum(preference_sources=("pubmedqa",)), qa=qa, evaluation=evaluation,
                      dpo_optim=optim, base_ref=pretrained.ref)
    # Run again: every stage is in the store.
    assert finetune_flow(finetune=FT, finetune_optim=optim, finetune_run=run, curriculum=curriculum, qa=qa, evaluation=evaluation,
                         dpo=DPOConfig(beta=0.2, rejected_per_question=2), dpo_optim=optim, base_ref=pretrained.ref) == refs


def test_the_stage_under_torchrun_equals_one_process_with_the_same_global_batch(tiny_checkpoint, session_store):
    """The stage with devices=2 (torchrun, gloo, DDP) against one process accumulating the same
    pairs: each rank takes its share of a step's pairs, each micro-batch weighs the same."""
    from tasks.dpo import DPO, DPORun
    from tasks.finetune import FINETUNE, FinetuneRun
    from tasks.qa import QA, QAConfig

    pubmedqa = QA.run(session_store, {}, QAConfig(source=str(DATA / "pubmedqa")))
    sft_model = FINETUNE.run(session_store, {"base": tiny_checkpoint, "data": [pubmedqa]}, FinetuneRun(FT, *small()))
    inputs = {"base": sft_model, "data": [pubmedqa]}  # no other QA data to guard: held_out left out
    one = DPORun(replace(FT, grad_accum=2), DPOConfig(beta=0.3), *small(max_steps=4, batch_size=2, eval_every=4))
    two = DPORun(FT, one.dpo, one.optim, replace(one.run, devices=2))
    single, double = DPO.run(session_store, inputs, one), DPO.run(session_store, inputs, two)
    assert double.summary["world_size"] == 2 and single.summary["world_size"] == 1
    first, second = metrics(single.path, "loss"), metrics(double.path, "loss")
    assert sorted(first) == sorted(second) == [1, 2, 3, 4] and first[1] == pytest.approx(math.log(2), abs=1e-6)
    for step in first:
        assert second[step] == pytest.approx(first[step], rel=1e-4)
    assert double.summary["val_reward_accuracy"] == pytest.approx(single.summary["val_reward_accuracy"])
    assert single.label == "DPO on pubmedqa" and (single.path / "model.safetensors").is_file() and (single.path / "adapter").is_dir() is False
