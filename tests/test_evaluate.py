"""Prompts, shots, metrics, confidence intervals and reports of the evaluation core.

Models here are either stand-ins whose numbers can be worked out by hand, or a tiny seeded
Transformer with the real tokenizer (conftest). The comparison with lm-evaluation-harness's
numbers is tests/test_scoring.py; the few-shot prompt text is compared with its code here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="medlm-test-datasets-"))

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import write_corpus
from eval_records import DATA, LM_EVAL_TASKS, lm_eval_docs, load_records, source_lm_eval_docs

from model.data import write_shards
from model.model import ModelConfig, Transformer
from model.prompts import choices, doc_to_text, fewshot_context, select_shots, target
from model.scoring import CausalLM, TransformerLM
from storage.formats import load_tokenizer
import tasks.evaluate.statistics
from tasks.evaluate import (
    BENCHMARKS,
    BOOTSTRAP_RESAMPLES,
    benchmark_records,
    bootstrap_interval,
    generation,
    mean,
    multiple_choice,
    multiple_choice_suite,
    normalize_answer,
    ratio,
    render_markdown,
    score_subset,
    shards_perplexity,
    text_bits_per_byte,
    token_f1,
    wilson_interval,
)

RECORDS = load_records()


def record(id="q1", source="medqa", split="test", question="Which drug?", options=("Aspirin", "Heparin", "Warfarin", "Insulin"), answer_idx=0, context=(), explanation=None) -> dict:
    options = list(options)
    return {"id": id, "source": source, "split": split, "question": question, "context": list(context), "options": options,
            "answer_idx": answer_idx, "answer_text": options[answer_idx] if options else "", "explanation": explanation, "meta": "{}"}


# -- prompts ----------------------------------------------------------------------------------


def test_prompts_are_the_harness_templates():
    medqa = record(options=["Aspirin", "Heparin", "Warfarin", "Insulin", "Digoxin"], answer_idx=2)
    assert doc_to_text(medqa) == "Question: Which drug?\nA. Aspirin\nB. Heparin\nC. Warfarin\nD. Insulin\nE. Digoxin\nAnswer:"
    assert choices(medqa, "letters") == ["A", "B", "C", "D", "E"] and target(medqa, "letters") == " C"
    assert target(medqa, "cloze") == " Warfarin"
    medmcqa = record(source="medmcqa", split="validation")
    assert doc_to_text(medmcqa) == "Question: Which drug?\nChoices:\nA. Aspirin\nB. Heparin\nC. Warfarin\nD. Insulin\nAnswer:"
    pubmedqa = record(source="pubmedqa", question="Does it work?", options=["yes", "no", "maybe"], answer_idx=1,
                      context=["Background one.", "Results two."], explanation="It did not work, we conclude.")
    assert doc_to_text(pubmedqa) == "Abstract: Background one.\nResults two.\nQuestion: Does it work?\nAnswer:"
    assert target(pubmedqa, "cloze") == " no"
    with pytest.raises(ValueError, match="style='cloze'"):
        choices(pubmedqa, "letters")
    assert doc_to_text(record(source="instructions", options=[])) == "Question: Which drug?\nAnswer:"


def test_no_prompt_carries_the_long_answer():
    for r in RECORDS:
        if r["explanation"]:
            assert r["explanation"] not in doc_to_text(r)


@pytest.mark.parametrize("source, task_module", [("pubmedqa", "pubmedqa.preprocess_pubmedqa"), ("medmcqa", "medmcqa.utils_medmcqa")])
def test_few_shot_prompt_is_the_harness_few_shot_prompt(source, task_module, tmp_path):
    """The harness's own fewshot_context, made to take our two shots in order (first_n sampler)."""
    import importlib

    from lm_eval.tasks import TaskManager

    pool = [r for r in RECORDS if r["source"] == source]
    item = next(r for r in pool if r["split"] in ("test", "validation"))
    shots = [r for r in pool if r["id"] != item["id"]][:2]
    name = "pubmedqa" if source == "pubmedqa" else "medmcqa"
    files = {}
    for split, rows in (("train", shots), ("test", [item])):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(d) + "\n" for d in lm_eval_docs([{**r, "split": "test"} for r in rows])[name]))
    config = {
        "task": f"fewshot_{source}", "dataset_path": "json", "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
        "output_type": "multiple_choice", "training_split": "train", "test_split": "test", "fewshot_split": "train",
        "fewshot_config": {"sampler": "first_n"},
        "doc_to_text": importlib.import_module(f"lm_eval.tasks.{task_module}").doc_to_text,
        "doc_to_target": "final_decision" if source == "pubmedqa" else "cop",
        "doc_to_choice": ["yes", "no", "maybe"] if source == "pubmedqa" else ["A", "B", "C", "D"],
    }
    (task,) = TaskManager(include_path=str(LM_EVAL_TASKS), include_defaults=False).load([config])["tasks"].values()
    style = "cloze" if source == "pubmedqa" else "letters"
    assert fewshot_context(item, shots, style) == task.fewshot_context(next(iter(task.test_docs())), num_fewshot=2)


def test_shots_come_from_another_split_deterministically_and_never_the_item():
    pool = [r for r in RECORDS if r["source"] == "pubmedqa"]
    item = next(r for r in pool if r["split"] == "test")
    shots, source = select_shots(item, pool, 3)
    assert source == "other split: train" and {s["split"] for s in shots} == {"train"}
    assert [s["id"] for s in select_shots(item, list(reversed(pool)), 3)[0]] == [s["id"] for s in shots]
    other = next(r for r in pool if r["split"] == "test" and r is not item)
    assert [s["id"] for s in select_shots(other, pool, 3)[0]] != [s["id"] for s in shots]  # seeded by the item id

    medqa, _ = benchmark_records(RECORDS, "medqa_4options")  # the test split only
    shots, source = select_shots(medqa[0], medqa, 3)
    assert source.startswith("same split (test)") and medqa[0]["id"] not in {s["id"] for s in shots}
    duplicate = {**medqa[1], "id": "copy", "question": medqa[0]["question"]}
    others = len(medqa) - 1
    assert all(s["question"] != medqa[0]["question"] for s in select_shots(medqa[0], medqa + [duplicate], others)[0])
    with pytest.raises(ValueError, match="lower num_fewshot"):
        select_shots(medqa[0], medqa, others + 1)


class RecordingLM(CausalLM):
    """Scores a continuation by minus its length in characters; remembers every context."""

    def __init__(self):
        super().__init__(max_length=2048, prefix_token_id=3, eos_token_id=3, device=torch.device("cpu"))
        self.contexts: list[str] = []

    def loglikelihoods(self, requests):
        self.contexts += [context for context, _ in requests]
        return [[(-float(len(c)), False) for c in continuations] for _, continuations in requests]


def test_k_shot_prompts_never_contain_the_evaluated_item():
    lm = RecordingLM()
    for name, spec in BENCHMARKS.items():
        items, _ = benchmark_records(RECORDS, name)
        for style in spec.styles:
            multiple_choice(lm, RECORDS, name, style, num_fewshot=3)
            for item, context in zip(items, lm.contexts[-len(items):]):
                assert context.count(item["question"]) == 1 and context.endswith(doc_to_text(item))
                assert context.count("\nAnswer:") == 4


# -- multiple-choice metrics and baselines ------------------------------------------------------


def test_accuracy_and_length_normalised_accuracy_by_hand():
    # Minus length in characters: acc picks the shortest option text, acc_norm the longest
    # (-(len + 1) / len grows with len; the +1 is the space of the continuation " " + option).
    records = [
        record("a", options=["A1", "Bbbb", "Cc", "Dddddd"], answer_idx=0),  # shortest is gold: acc hit
        record("b", options=["Aaaa", "Bb", "Cccccc", "D"], answer_idx=2),  # longest is gold: acc_norm hit
        record("c", options=["Aa", "Bbbbbbb", "Cc", "Ddd"], answer_idx=3),  # neither
    ]
    result = multiple_choice(RecordingLM(), records, "medqa_4options", "cloze")
    assert [(i["pred"], i["pred_norm"]) for i in result["per_item"]] == [(0, 3), (3, 2), (0, 1)]
    assert result["metrics"]["acc"]["value"] == pytest.approx(1 / 3) and result["metrics"]["acc_norm"]["value"] == pytest.approx(1 / 3)
    assert result["metrics"]["acc"]["ci95"] == pytest.approx(list(wilson_interval(1, 3)))
    assert result["metrics"]["acc"]["n"] == 3
    letters = multiple_choice(RecordingLM(), records, "medqa_4options", "letters")
    assert letters["metrics"]["acc"]["value"] == letters["metrics"]["acc_norm"]["value"]  # one-letter choices


def test_multiple_choice_baseline_is_the_best_constant_answer_not_chance():
    """A model that always answers "B" scores the share of B in the key; with an unbalanced key
    that beats chance, and a baseline of chance would make such a model look like it learned."""
    records = [record(str(i), answer_idx=gold) for i, gold in enumerate([1, 1, 1, 0, 2, 3, 1, 0])]
    result = multiple_choice(RecordingLM(), records, "medqa_4options", "letters")
    assert result["baseline"]["acc"] == {"name": "always B, the commonest answer; chance 25.0%", "value": 0.5}
    always_b = {**result, "per_item": [{**i, "pred": 1, "pred_norm": 1} for i in result["per_item"]]}
    assert score_subset(always_b, [r["id"] for r in records])["metrics"]["acc"]["value"] == result["baseline"]["acc"]["value"]
    balanced = multiple_choice(RecordingLM(), records[2:6], "medqa_4options", "letters")  # golds 1, 0, 2, 3
    assert balanced["baseline"]["acc"] == {"name": "always A, the commonest answer; chance 25.0%", "value": 0.25}


def test_pubmedqa_majority_baseline_comes_from_the_train_labels():
    result = multiple_choice(RecordingLM(), RECORDS, "pubmedqa", "cloze")
    test = [r for r in RECORDS if r["source"] == "pubmedqa" and r["split"] == "test"]
    assert result["baseline_rule"] == {"rule": "majority", "label": 0, "option": "yes", "from": "labels of the other splits"}
    assert result["baseline"]["acc"]["value"] == pytest.approx(sum(r["answer_idx"] == 0 for r in test) / len(test)) == 0.55
    test_only = multiple_choice(RecordingLM(), test, "pubmedqa", "cloze")
    assert "evaluated items themselves" in test_only["baseline_rule"]["from"]


def test_score_subset_recomputes_as_if_only_those_items_were_run():
    lm = RecordingLM()
    full = multiple_choice(lm, RECORDS, "medmcqa", "cloze")
    ids = [i["id"] for i in full["per_item"][::3]]
    alone = multiple_choice(lm, [r for r in RECORDS if r["id"] in ids], "medmcqa", "cloze")
    subset = score_subset(full, ids)
    assert subset["metrics"] == alone["metrics"] and subset["baseline"] == alone["baseline"]
    assert subset["per_item"] == alone["per_item"]
    with pytest.raises(ValueError, match="not items of 'medmcqa'"):
        score_subset(full, ["no-such-id"])


def test_suite_runs_every_benchmark_style_and_shot_count_and_renders_a_report():
    results = multiple_choice_suite(RecordingLM(), RECORDS, shots=(0, 2))
    assert {(r["name"], r["style"], r["num_fewshot"]) for r in results} == {
        (name, style, k) for name, spec in BENCHMARKS.items() for style in spec.styles for k in (0, 2)
    }
    json.dumps(results)  # JSON-able as it is
    report = render_markdown(results)
    assert report.count("| metric | value | 95% CI | n | baseline |") == 4
    assert "### medqa_5options (test)" in report and "the commonest answer; chance 20.0%" in report
    assert "### pubmedqa (test)" in report and "majority class 'yes'" in report and "shots from other split: train" in report


# -- confidence intervals and text metrics ------------------------------------------------------


def test_wilson_interval_by_hand():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_bootstrap_interval_brackets_the_mean_and_collapses_on_constants():
    x = np.arange(100, dtype=float)
    low, high = bootstrap_interval(len(x), lambda idx: x[idx].mean(axis=1))
    assert low < 49.5 < high and high - low == pytest.approx(2 * 1.96 * x.std() / 10, rel=0.15)
    assert bootstrap_interval(5, lambda idx: np.full(len(idx), 7.0)) == (7.0, 7.0)


@pytest.mark.parametrize("chunk", [1 << 20, 100])  # 100: two resamples of 37 items a draw
def test_resamples_drawn_at_once_give_the_interval_of_resamples_drawn_one_by_one(chunk, monkeypatch):
    monkeypatch.setattr(tasks.evaluate.statistics, "BOOTSTRAP_CHUNK", chunk)
    x = np.random.default_rng(1).random(37) * 1e3
    rng = np.random.default_rng(0)  # bootstrap_interval's seed
    one_by_one = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(BOOTSTRAP_RESAMPLES)]
    assert mean(x)["ci95"] == list(np.percentile(one_by_one, [2.5, 97.5]))
    num, den = x / 1e3, np.arange(1, 38, dtype=float)
    rng = np.random.default_rng(0)
    one_by_one = [math.exp(num[i].sum() / den[i].sum()) for i in (rng.integers(0, len(x), len(x)) for _ in range(BOOTSTRAP_RESAMPLES))]
    assert ratio(num, den, math.exp)["ci95"] == list(np.percentile(one_by_one, [2.5, 97.5]))


def test_squad_normalisation_and_token_f1_by_hand():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)  # precision 1, recall 2/3
    assert token_f1("dog", "cat") == 0.0 and token_f1("", "") == 1.0 and token_f1("a", "cat") == 0.0


class FixedAnswerLM(CausalLM):
    def __init__(self, answers: dict[str, str]):
        super().__init__(max_length=2048, prefix_token_id=3, eos_token_id=3, device=torch.device("cpu"))
        self.answers = answers

    def generate_many(self, contexts, max_new_tokens, until=("\n\n",)):
        return [next(a for q, a in self.answers.items() if q in context) for context in contexts]


def test_generation_metrics_by_hand():
    records = [
        record("x", source="pubmedqa", question="Does aspirin work?", options=["yes", "no", "maybe"], context=["Ctx."],
               explanation="Aspirin reduces the risk of stroke."),
        record("y", source="instructions", question="Name a beta blocker.", options=[]),
    ]
    records[1]["answer_text"] = "Propranolol"
    lm = FixedAnswerLM({"Does aspirin work?": "Aspirin reduces the risk of stroke.", "beta blocker": "Metoprolol"})
    result = generation(lm, records, "free text")
    m = result["metrics"]
    assert [i["reference"] for i in result["per_item"]] == ["Aspirin reduces the risk of stroke.", "Propranolol"]
    assert m["exact_match"]["value"] == 0.5 and m["f1"]["value"] == 0.5 and m["rougeL"]["value"] == 0.5
    assert m["exact_match"]["ci_method"] == "wilson" and m["f1"]["ci_method"] == "bootstrap" and m["f1"]["n"] == 2
    assert 0 < m["bleu"]["value"] < 100 and m["seconds_per_answer"]["value"] >= 0
    assert result["baseline"]["f1"]["name"] == "the question as the answer"
    assert score_subset(result, ["x"])["metrics"]["exact_match"]["value"] == 1.0
    assert score_subset(result, ["x"])["metrics"]["bleu"]["value"] == pytest.approx(100.0)
    assert "### free text" in render_markdown([result])


# -- bits per byte ------------------------------------------------------------------------------


class UniformLM(CausalLM):
    """Every token has probability 1/16; token i decodes to one letter, 12 to "é" (two bytes)."""

    def __init__(self, max_length: int = 4):
        super().__init__(max_length=max_length, prefix_token_id=3, eos_token_id=3, device=torch.device("cpu"))

    def decode(self, ids):
        return "".join("é" if i == 12 else chr(ord("a") + i) for i in ids)

    def new_cache(self, max_len):
        return None

    def logits(self, ids, cache=None, at=None, positions=None, mask=None):
        return torch.zeros(ids.size(0), ids.size(1) if at is None else at.size(1), 16)


def test_bits_per_byte_on_a_tiny_stream_by_hand(tmp_path):
    stream = np.array([5, 6, 7, 8, 9, 10, 3, 11, 12, 3])  # two documents, each ended by [EOS]
    shards = write_shards(tmp_path, {"test": [stream]}, vocab_size=16)
    result = shards_perplexity(UniformLM(), shards)  # 4-token windows: the 6-token document takes two
    # 8 tokens of 4 bits each (log2 16) over 6 + 1 + 2 bytes ("fghijk", "l", "é").
    assert result["metrics"]["bits_per_byte"]["value"] == pytest.approx(32 / 9)
    assert result["metrics"]["byte_perplexity"]["value"] == pytest.approx(2 ** (32 / 9))
    assert result["metrics"]["token_perplexity"]["value"] == pytest.approx(16)
    assert (result["tokens"], result["bytes"], result["documents_in_file"]) == (8, 9, 2)
    assert [i["nll"] for i in result["per_item"]] == pytest.approx([6 * math.log(16), 2 * math.log(16)])
    assert "| bits_per_byte (rolling windows of 4 tokens, stride 4) | 3.556 |" in render_markdown([result])
    first = shards_perplexity(UniformLM(), shards, max_documents=1)
    assert first["metrics"]["bits_per_byte"]["value"] == pytest.approx(4.0) and first["metrics"]["bits_per_byte"]["n"] == 1


def test_shards_and_raw_text_give_the_same_bits_per_byte(tokenizer, documents, tmp_path):
    encoder = load_tokenizer(tokenizer.file("tokenizer.json"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=encoder.get_vocab_size(), n_layer=1, n_head=2, d_model=32, context_length=128))
    lm = TransformerLM(model, encoder)
    texts = [text for _, text in documents[:5]]
    stream = np.concatenate([np.append(encoder.encode(t, add_special_tokens=False).ids, 3) for t in texts])
    shards = write_shards(tmp_path, {"test": [stream]}, vocab_size=encoder.get_vocab_size())
    from_shards = shards_perplexity(lm, shards, stride=64)
    from_texts = text_bits_per_byte(lm, texts, stride=64)
    for metric in ("bits_per_byte", "token_perplexity"):
        assert from_shards["metrics"][metric]["value"] == pytest.approx(from_texts["metrics"][metric]["value"], rel=1e-6)
    assert from_shards["bytes"] == sum(len(t.encode()) for t in texts)
    assert "stride 64" in from_shards["method"] and "prefix token 3" in from_shards["method"]
    # A random model of this vocabulary is near log2(vocab) bits per token.
    bits_per_token = from_texts["metrics"]["bits_per_byte"]["value"] * from_texts["bytes"] / from_texts["tokens"]
    assert bits_per_token == pytest.approx(math.log2(encoder.get_vocab_size()), rel=0.05)


def test_the_harness_reads_the_sources_texts_and_our_records_hold_the_same():
    """The lm-eval data files are the source rows as the harness's hub datasets hold them (not our
    records: then a text we changed would be changed on both sides), and our records map onto
    them exactly: whitespace the sources have, MedMCQA's "nan" options."""
    from_sources = source_lm_eval_docs()
    for name, docs in lm_eval_docs(RECORDS).items():
        written = (LM_EVAL_TASKS / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in written] == from_sources[name], "rerun: python tests/eval_records.py"
        assert docs == from_sources[name]
    assert sum("nan" in (d["opa"], d["opb"], d["opc"], d["opd"]) for d in from_sources["medmcqa"]) == 6
    assert sum(d["sent1"] != d["sent1"].strip() for d in from_sources["medqa_4options"]) == 3


# -- the stage ------------------------------------------------------------------------------------


def test_contamination_finds_pubmedqa_pmids_and_13_grams_of_questions(tmp_path):
    from tasks.evaluate import contamination

    pubmedqa = next(r for r in RECORDS if r["source"] == "pubmedqa" and r["split"] == "test")
    medqa = next(r for r in RECORDS if r["source"] == "medqa")
    words = medqa["question"].split()
    texts = [
        "An unrelated abstract about cardiology.",
        "Earlier text. " + " ".join(words[3:3 + 16]).upper() + " and more.",  # 16 words of the question (13 without articles), other case
        "Close but no: " + " ".join(words[3:3 + 12]),  # 12 words at most: never a 13-gram
    ]
    pmids = [1, 2, int(pubmedqa["id"].split(":")[1])]
    found = contamination(RECORDS, write_corpus(tmp_path / "corpus", pa.table({"pmid": pmids, "text": texts})))
    assert found[pubmedqa["id"]] == "PMID in the corpus"
    assert found[medqa["id"]] == "13-gram of the question in the corpus"
    assert set(found) == {pubmedqa["id"], medqa["id"]} | {r["id"] for r in RECORDS if r["source"] == "medqa" and r["question"] == medqa["question"]}


def test_the_evaluate_stage_scores_a_checkpoint_with_its_baselines_and_clean_subsets(session_store, corpus, tokenizer):
    from model.train import TrainConfig
    from storage.formats import iter_corpus
    from tasks.corpus import CORPUS, CorpusConfig
    from tasks.evaluate import EVALUATE, RESULTS_FILE, EvaluationConfig, evaluation_rows, newer_abstracts
    from tasks.pretrain import PRETRAIN
    from tasks.qa import QA, QAConfig
    from tasks.shards import SHARDS, ShardsConfig

    shards = SHARDS.run(session_store, {"corpus": corpus, "tokenizer": tokenizer}, ShardsConfig())
    tiny = TrainConfig.of(model={"n_layer": 1, "d_model": 32, "n_head": 2, "context_length": 64}, max_steps=2, batch_size=2, eval_windows=2)
    checkpoint = PRETRAIN.run(session_store, {"shards": shards, "tokenizer": tokenizer}, tiny)
    data = [QA.run(session_store, {}, QAConfig(source=str(DATA / name))) for name in ("pubmedqa", "medqa")]
    config = EvaluationConfig(shots=(0, 1), max_items=5, perplexity_documents=3, held_out_documents=3, generation_items=2, max_new_tokens=8)
    # The model's corpus is last year's (the baseline file's); the newer snapshot adds the update file.
    baseline_only = CORPUS.run(session_store, {"parsed": [p for p in session_store.ls("parse") if p.label == "pubmed20n0014.xml.gz"]},
                               CorpusConfig(min_abstract_chars=0, languages=()))
    inputs = {"model": checkpoint, "qa": data, "shards": shards, "corpus": baseline_only, "newer": corpus}
    evaluation = EVALUATE.run(session_store, inputs, config)

    results = json.loads(evaluation.file(RESULTS_FILE).read_text())
    kinds = [(r["kind"], r["name"]) for r in results]
    assert ("multiple_choice", "pubmedqa") in kinds and ("multiple_choice", "medqa_5options") in kinds
    assert ("language_modelling", f"abstracts new since its corpus (in {corpus.ref})") in kinds and ("generation", "PubMedQA long answers") in kinds
    new = newer_abstracts(corpus.path, baseline_only.path, None)
    old = {t for _, batch in iter_corpus(baseline_only.path) for t in batch}
    assert new and not set(new) & old  # articles the model's corpus never held
    [held_out] = [r for r in results if r["name"].startswith("abstracts new since")]
    assert held_out["metrics"]["bits_per_byte"]["n"] == 3
    for r in results:
        assert all(m["n"] > 0 and len(m["ci95"]) == 2 for m in r["metrics"].values())
        if r["kind"] == "multiple_choice":
            assert len(r["per_item"]) == 5 and r["contamination"]["overlapping_items"] == 0 and r["contamination"]["clean"]["n"] == 5
    rows = evaluation_rows(evaluation)
    assert {"benchmark", "metric", "value", "ci95", "n", "baseline"} <= set(rows[0]) and "clean value" in rows[0]
    assert any("25.0%" in row["baseline"] for row in rows) and any("20.0%" in row["baseline"] for row in rows)
    assert evaluation.parents == sorted([checkpoint.ref]) + sorted(a.ref for a in data) + [shards.ref, baseline_only.ref, corpus.ref]
    assert EVALUATE.run(session_store, inputs, EvaluationConfig(**{**config.__dict__, "threads": 1})).reused  # threads: how, not what


@pytest.mark.usefixtures("prefect_server")
def test_the_evaluate_flow_holds_out_the_snapshot_it_is_given_and_none_the_store_builds_later(session_store, tiny_checkpoint, monkeypatch, caplog):
    from flows.evaluate import evaluate
    from tasks.corpus import CORPUS, CorpusConfig
    from tasks.evaluate import EvaluationConfig
    from tasks.qa import QASources

    monkeypatch.setenv("MEDLM_STORE", str(session_store.root))  # the flow's store: the checkpoint and its lineage
    qa = QASources(pubmedqa=str(DATA / "pubmedqa"))
    config = EvaluationConfig(benchmarks=("pubmedqa",), shots=(0,), max_items=3, perplexity_documents=2, held_out_documents=2, generation_items=0, threads=1)
    first = session_store.require(evaluate(evaluation=config, qa=qa, model_ref=tiny_checkpoint.ref))
    # A snapshot built after the model's (of the baseline file alone: its abstracts are all in the model's corpus).
    baseline = [p for p in session_store.ls("parse") if p.label == "pubmed20n0014.xml.gz"]
    later = CORPUS.run(session_store, {"parsed": baseline}, CorpusConfig(min_abstract_chars=1, languages=()))
    assert evaluate(evaluation=config, qa=qa, model_ref=tiny_checkpoint.ref) == first.ref  # the same inputs, found in the store
    assert later.ref not in first.parents

    progress = logging.getLogger("medlm.evaluate")  # its lines, read where they are logged (Prefect's logging setup stops them propagating)
    progress.addHandler(caplog.handler)
    try:
        held = session_store.require(evaluate(evaluation=config, qa=qa, model_ref=tiny_checkpoint.ref, held_out_ref=later.ref))
    finally:
        progress.removeHandler(caplog.handler)
    assert held.parents[-1] == later.ref  # named, so keyed and in its lineage
    assert "new abstracts: none" in caplog.text  # measured, and there are none: said so
    with pytest.raises(ValueError, match=rf"held_out_ref {tiny_checkpoint.ref} is a pretrain artifact; give a corpus snapshot, hygiene/KEY or corpus/KEY"):
        evaluate(evaluation=config, qa=qa, model_ref=tiny_checkpoint.ref, held_out_ref=tiny_checkpoint.ref)
