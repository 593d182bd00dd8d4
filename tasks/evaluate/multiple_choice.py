"""Accuracy by log-likelihood on the benchmarks the datasets declare (tasks/qa: PubMedQA (test),
MedMCQA (validation) and MedQA (test, 4 and 5 options)), as lm-evaluation-harness 0.4.13 scores
them: acc = argmax of the summed log-probabilities, acc_norm = argmax of log-probability /
len(choice) in characters (the choice string without its leading space; the harness's
``acc_bytes`` would use UTF-8 bytes). Zero- or k-shot, "letters" or "cloze" style (model/prompts.py).

Baseline: the best constant answer (always the same option position: its share of the gold
answers, which beats chance, the mean of 1/options it names, wherever the answer key is
unbalanced) or, for PubMedQA, the majority class, taken from the other split's labels when the
records have one, else from the evaluated items themselves (the result says which).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from model.prompts import TARGET_DELIMITER, choices, fewshot_context, gold_index, select_shots
from model.scoring import CausalLM
from tasks.evaluate.kinds import Kind
from tasks.evaluate.statistics import format_value, proportion
from tasks.qa.records import Benchmark
from tasks.qa.registry import BENCHMARKS  # each dataset's module declares its own (tasks/qa/)


def benchmark_records(records: Iterable[dict], name: str) -> tuple[list[dict], list[dict]]:
    """(the records scored for benchmark ``name``, every record of the benchmark: the shot pool)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    b = BENCHMARKS[name]
    pool = [r for r in records if r["source"] == b.source and r["options"] and (b.n_options is None or len(r["options"]) == b.n_options)]
    return [r for r in pool if r["split"] == b.split], pool


def multiple_choice(lm: CausalLM, records: Sequence[dict], benchmark: str, style: str, num_fewshot: int = 0) -> dict:
    """Accuracy on one benchmark by log-likelihood of each choice, as the harness scores it."""
    return multiple_choice_styles(lm, records, benchmark, (style,), num_fewshot)[style]


def multiple_choice_styles(lm: CausalLM, records: Sequence[dict], benchmark: str, styles: Sequence[str], num_fewshot: int = 0) -> dict[str, dict]:
    """``multiple_choice`` in each of several styles, scored in one call: a prompt the styles share
    (zero-shot, letters and cloze ask the same question) is read once for all their choices."""
    items, pool = benchmark_records(records, benchmark)
    spec = BENCHMARKS[benchmark]
    if not items:
        raise ValueError(f"no {spec.source} records of split {spec.split!r} with options among the {len(records)} given")
    if unknown := [s for s in styles if s not in spec.styles]:
        raise ValueError(f"{benchmark} is scored in styles {spec.styles}, not {unknown[0]!r}")
    shots = [select_shots(record, pool, num_fewshot) for record in items]
    requests = [
        (fewshot_context(record, chosen, style), [TARGET_DELIMITER + c for c in choices(record, style)])
        for style in styles
        for record, (chosen, _) in zip(items, shots)
    ]
    scores = lm.loglikelihoods(requests)
    results = {}
    for n, style in enumerate(styles):
        per_item = []
        for record, item_scores in zip(items, scores[n * len(items) : (n + 1) * len(items)]):
            logprobs = np.array([s[0] for s in item_scores])
            chars = np.array([len(c) for c in choices(record, style)], dtype=float)
            per_item.append({
                "id": record["id"],
                "gold": gold_index(record),
                "pred": int(np.argmax(logprobs)),  # np.argmax: the first of tied options, as the harness
                "pred_norm": int(np.argmax(logprobs / chars)),
                "logprobs": logprobs.tolist(),
                "is_greedy": [s[1] for s in item_scores],
                "n_options": len(record["options"]),
            })
        result = {
            "kind": MULTIPLE_CHOICE.name,
            "name": benchmark,
            "split": spec.split,
            "style": style,
            "num_fewshot": num_fewshot,
            "shots_from": dict(Counter(source for _, source in shots)),
            "baseline_rule": _baseline_rule(spec, items, pool),
            "per_item": per_item,
        }
        results[style] = result | MULTIPLE_CHOICE.summarise(result)
    return results


def _baseline_rule(spec: Benchmark, items: list[dict], pool: list[dict]) -> dict:
    if spec.baseline == "constant":
        return {"rule": "constant"}
    others = [r["answer_idx"] for r in pool if r["split"] != spec.split and r["answer_idx"] is not None]
    labels, origin = (others, "labels of the other splits") if others else ([r["answer_idx"] for r in items], "labels of the evaluated items themselves (no other split given)")
    label = Counter(labels).most_common(1)[0][0]
    return {"rule": "majority", "label": label, "option": items[0]["options"][label], "from": origin}


def multiple_choice_suite(lm: CausalLM, records: Sequence[dict], shots: Sequence[int] = (0, 5)) -> list[dict]:
    """Every benchmark present in records, in each of its styles, at each number of shots."""
    results = []
    for name, spec in BENCHMARKS.items():
        if benchmark_records(records, name)[0]:
            by_shots = {k: multiple_choice_styles(lm, records, name, spec.styles, k) for k in shots}
            results += [by_shots[k][style] for style in spec.styles for k in shots]
    return results


class MultipleChoice(Kind):
    name = "multiple_choice"
    main_metric = "acc"
    task_type = "multiple-choice"

    def summary(self, items: list[dict], rule: dict) -> dict:
        metrics = {
            "acc": proportion([i["pred"] == i["gold"] for i in items]),
            "acc_norm": proportion([i["pred_norm"] == i["gold"] for i in items]),
        }
        if rule["rule"] == "constant":
            # Answer keys are rarely balanced: a model that always picks one letter beats 1/options
            # without reading a question, so the bar is the best such letter on these very items.
            golds = Counter(i["gold"] for i in items)
            position = max(sorted(golds), key=golds.get)
            chance = float(np.mean([1 / i["n_options"] for i in items]))
            name = f"always {chr(ord('A') + position)}, the commonest answer; chance {format_value('acc', chance)}"
            baseline = {"name": name, "value": golds[position] / len(items)}
        else:
            share = float(np.mean([i["gold"] == rule["label"] for i in items]))
            baseline = {"name": f"majority class {rule['option']!r} (from {rule['from']})", "value": share}
        return {"metrics": metrics, "baseline": {m: baseline for m in metrics}}

    def title(self, result: dict) -> str:
        return f"{result['name']} ({result['split']})"

    def how(self, result: dict) -> str:
        return f"{result['style']}, {result['num_fewshot']}-shot"

    def setting(self, result: dict) -> str:
        return self.how(result) + (f", shots from {'; '.join(result['shots_from'])}" if result["num_fewshot"] else "")

    def headline_name(self, result: dict) -> str:
        return f"{result['name']}_{result['style']}_{result['num_fewshot']}shot_acc"


MULTIPLE_CHOICE = MultipleChoice()
