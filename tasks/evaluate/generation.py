"""Greedy answers within a token budget, scored by exact match and token F1 (SQuAD
normalisation), ROUGE-L F1 (rouge-score, Porter stemming) and corpus BLEU (sacrebleu, its own
bootstrap of 1,000 resamples for the interval), with seconds per answer (the answers of a set are
generated together: each item's seconds are the set's over its size). Baseline: the question
itself given as the answer.
"""

from __future__ import annotations

import math
import re
import string
import time
from collections import Counter
from typing import Sequence

from model.prompts import doc_to_text, reference
from model.scoring import CausalLM
from tasks.evaluate.kinds import Kind
from tasks.evaluate.statistics import mean, proportion


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_NO_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, truth: str) -> float:
    """SQuAD token F1 on normalised words; 1.0 when both are empty, 0.0 when only one is."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def generation(lm: CausalLM, records: Sequence[dict], name: str, max_new_tokens: int = 128, until: Sequence[str] = ("\n\n",)) -> dict:
    """Greedy answers to free-text items (PubMedQA's long answer, instruction sets' answer_text)."""
    started = time.perf_counter()
    predictions = lm.generate_many([doc_to_text(r) for r in records], max_new_tokens, until)
    seconds = (time.perf_counter() - started) / max(1, len(records))
    per_item = [
        {"id": r["id"], "question": r["question"], "reference": reference(r), "prediction": p.strip(), "seconds": seconds}
        for r, p in zip(records, predictions)
    ]
    result = {
        "kind": GENERATION.name,
        "name": name,
        "max_new_tokens": max_new_tokens,
        "until": list(until),
        "baseline_rule": {"rule": "question as the answer"},
        "per_item": per_item,
    }
    return result | GENERATION.summarise(result)


def _generation_metrics(predictions: list[str], references: list[str]) -> dict:
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    bleu = BLEU().corpus_score(predictions, [references], n_bootstrap=1000)
    # sacrebleu reports its bootstrap as mean ± half the 2.5-97.5 percentile range.
    bleu_ci = [bleu._mean - bleu._ci, bleu._mean + bleu._ci] if len(predictions) > 1 else [math.nan, math.nan]
    return {
        "exact_match": proportion([normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]),
        "f1": mean([token_f1(p, r) for p, r in zip(predictions, references)]),
        "rougeL": mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]),
        "bleu": {"value": bleu.score, "ci95": bleu_ci, "ci_method": "sacrebleu bootstrap", "n": len(predictions)},
    }


class Generation(Kind):
    name = "generation"
    main_metric = "rougeL"

    def summary(self, items: list[dict], rule: dict) -> dict:
        references = [i["reference"] for i in items]
        metrics = _generation_metrics([i["prediction"] for i in items], references)
        metrics["seconds_per_answer"] = mean([i["seconds"] for i in items])
        baseline_metrics = _generation_metrics([i["question"] for i in items], references)
        baseline = {m: {"name": "the question as the answer", "value": v["value"]} for m, v in baseline_metrics.items()}
        return {"metrics": metrics, "baseline": baseline}

    def setting(self, result: dict) -> str:
        return f"greedy, ≤{result['max_new_tokens']} tokens"


GENERATION = Generation()
