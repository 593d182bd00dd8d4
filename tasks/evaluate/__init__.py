"""Evaluation: pure functions from a model (a ``model.scoring.CausalLM``) and data to results.

No Prefect and no artifact store here; the pipeline stage wraps these. Every function returns a
JSON-able result dict:

    {"kind", "name", ... what was run ..., "metrics": {metric: {"value", "ci95", "ci_method", "n"}},
     "baseline": {...} | None, "per_item": [...]}

- ``multiple_choice``: accuracy by log-likelihood on PubMedQA (test), MedMCQA (validation) and
  MedQA (test, 4 and 5 options), as lm-evaluation-harness 0.4.13 scores them: acc = argmax of the
  summed log-probabilities, acc_norm = argmax of log-probability / len(choice) in characters
  (the choice string without its leading space; the harness's ``acc_bytes`` would use UTF-8 bytes).
  Zero- or k-shot, "letters" or "cloze" style (model/prompts.py). Baseline: the best constant
  answer (always the same option position: its share of the gold answers, which beats chance,
  the mean of 1/options it names, wherever the answer key is unbalanced) or, for PubMedQA, the
  majority class, taken from the other split's labels when the records have one, else from the
  evaluated items themselves (the result says which).
- ``shards_perplexity`` / ``text_bits_per_byte``: lm-eval's ``loglikelihood_rolling`` convention
  (see model/scoring.py): every document scored alone, conditioned on the model's prefix token;
  bits per byte = total negative log-likelihood in bits / total UTF-8 bytes of the text, which
  compares models with different tokenizers; token perplexity = exp(NLL / tokens) does not.
- ``generation``: greedy answers within a token budget, scored by exact match and token F1
  (SQuAD normalisation), ROUGE-L F1 (rouge-score, Porter stemming) and corpus BLEU (sacrebleu),
  with seconds per answer. Baseline: the question itself given as the answer.

Confidence intervals (95%): Wilson score interval for proportions (acc, exact match); percentile
bootstrap over items (2,000 resamples, seed 0) for means and ratios (F1, ROUGE-L, seconds, bits
per byte, perplexity); sacrebleu's own bootstrap (1,000 resamples) for BLEU.

Per-item results are kept, so ``score_subset(result, ids)`` recomputes every number on a subset
(e.g. items with no overlap with the pretraining corpus) with the same code.
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from model.prompts import TARGET_DELIMITER, choices, doc_to_text, fewshot_context, gold_index, reference, select_shots
from model.scoring import CausalLM
from storage import Artifact, Input, Stage
from storage.config import config_dataclass
from tasks.hf_model import MODEL_KINDS
from storage.progress import Progress

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2_000
log = logging.getLogger("medlm.evaluate")


# -- confidence intervals ----------------------------------------------------------------------


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; unlike the normal approximation it stays in
    [0, 1] and is honest at 0 or n successes and small n."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2))
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(n: int, statistic: Callable[[np.ndarray], float], seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of statistic(indices) over n items resampled with replacement."""
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, n)) for _ in range(BOOTSTRAP_RESAMPLES)]
    low, high = np.percentile(values, [2.5, 97.5])
    return (float(low), float(high))


def proportion(hits: Sequence[bool]) -> dict:
    k, n = int(sum(hits)), len(hits)
    return {"value": k / n if n else math.nan, "ci95": list(wilson_interval(k, n)), "ci_method": "wilson", "n": n}


def mean(values: Sequence[float]) -> dict:
    x = np.asarray(values, dtype=float)
    ci = bootstrap_interval(len(x), lambda idx: float(x[idx].mean()))
    return {"value": float(x.mean()) if len(x) else math.nan, "ci95": list(ci), "ci_method": "bootstrap", "n": len(x)}


def ratio(numerators: Sequence[float], denominators: Sequence[float], transform: Callable[[float], float] = lambda r: r) -> dict:
    """transform(sum(num) / sum(den)), resampling items (documents) as wholes."""
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)

    def stat(idx: np.ndarray) -> float:
        return transform(float(num[idx].sum() / den[idx].sum()))

    ci = bootstrap_interval(len(num), stat)
    return {"value": stat(np.arange(len(num))), "ci95": list(ci), "ci_method": "bootstrap", "n": len(num)}


# -- multiple choice ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    source: str
    split: str  # the split that is scored
    n_options: int | None  # records with this many options only (None: any)
    styles: tuple[str, ...]
    baseline: str  # "constant" (the best constant answer) or "majority"


BENCHMARKS = {
    "pubmedqa": Benchmark("pubmedqa", "test", None, ("cloze",), "majority"),
    "medmcqa": Benchmark("medmcqa", "validation", None, ("letters", "cloze"), "constant"),  # test has no labels
    "medqa_4options": Benchmark("medqa", "test", 4, ("letters", "cloze"), "constant"),
    "medqa_5options": Benchmark("medqa", "test", 5, ("letters", "cloze"), "constant"),
}


def benchmark_records(records: Iterable[dict], name: str) -> tuple[list[dict], list[dict]]:
    """(the records scored for benchmark ``name``, every record of the benchmark: the shot pool)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    b = BENCHMARKS[name]
    pool = [r for r in records if r["source"] == b.source and r["options"] and (b.n_options is None or len(r["options"]) == b.n_options)]
    return [r for r in pool if r["split"] == b.split], pool


def multiple_choice(lm: CausalLM, records: Sequence[dict], benchmark: str, style: str, num_fewshot: int = 0) -> dict:
    """Accuracy on one benchmark by log-likelihood of each choice, as the harness scores it."""
    items, pool = benchmark_records(records, benchmark)
    spec = BENCHMARKS[benchmark]
    if not items:
        raise ValueError(f"no {spec.source} records of split {spec.split!r} with options among the {len(records)} given")
    if style not in spec.styles:
        raise ValueError(f"{benchmark} is scored in styles {spec.styles}, not {style!r}")
    requests, shots_from = [], Counter()
    for record in items:
        shots, source = select_shots(record, pool, num_fewshot)
        shots_from[source] += 1
        requests.append((fewshot_context(record, shots, style), [TARGET_DELIMITER + c for c in choices(record, style)]))
    scores = lm.loglikelihoods(requests)
    per_item = []
    for record, item_scores in zip(items, scores):
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
        "kind": "multiple_choice",
        "name": benchmark,
        "split": spec.split,
        "style": style,
        "num_fewshot": num_fewshot,
        "shots_from": dict(shots_from),
        "baseline_rule": _baseline_rule(spec, items, pool),
        "per_item": per_item,
    }
    return result | _summarise(result)


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
            results += [multiple_choice(lm, records, name, style, k) for style in spec.styles for k in shots]
    return results


# -- perplexity and bits per byte --------------------------------------------------------------


def shard_documents(shards_dir: str | Path, split: str = "test") -> list[list[int]]:
    """The token ids of each document of a shards folder's ``{split}.bin`` (cut at [EOS], which is dropped)."""
    root = Path(shards_dir)
    path = root / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; pass a shards folder written by the shards stage")
    meta = json.loads((root / "meta.json").read_text())
    stream = np.fromfile(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
    ends = np.flatnonzero(stream == meta["eos_id"])
    starts = np.concatenate(([0], ends + 1))
    return [stream[a:b].tolist() for a, b in zip(starts, np.append(ends, len(stream))) if b > a]


def shards_perplexity(lm: CausalLM, shards_dir: str | Path, split: str = "test", max_documents: int | None = None, stride: int | None = None, name: str | None = None) -> dict:
    """Bits per byte and perplexity on a shards folder's ``{split}.bin``, made with lm's tokenizer.

    Each document (the first max_documents, if given) is scored alone, as lm-eval scores one; its
    bytes are those of its decoded text.
    """
    all_documents = shard_documents(shards_dir, split)
    documents = all_documents[:max_documents]
    result = _language_modelling(lm, documents, [lm.decode(d) for d in documents], stride)
    return {"name": name or f"{Path(shards_dir).name}/{split}.bin", "documents_in_file": len(all_documents)} | result


def text_bits_per_byte(lm: CausalLM, texts: Sequence[str], name: str = "held-out text", stride: int | None = None) -> dict:
    """Bits per byte on raw texts, each encoded by lm's own tokenizer: fair across tokenizers."""
    return {"name": name} | _language_modelling(lm, [lm.encode(t) for t in texts], list(texts), stride)


def _language_modelling(lm: CausalLM, documents: list[list[int]], texts: list[str], stride: int | None) -> dict:
    if not documents:
        raise ValueError("no documents to score")
    logprobs = lm.rolling_loglikelihoods(documents, stride)
    per_item = [
        {"id": str(i), "nll": -lp, "tokens": len(d), "bytes": len(t.encode("utf-8"))}
        for i, (lp, d, t) in enumerate(zip(logprobs, documents, texts))
    ]
    result = {
        "kind": "language_modelling",
        "window": lm.max_length,
        "stride": stride or lm.max_length,
        "method": (
            f"lm-eval loglikelihood_rolling: each document alone after prefix token {lm.prefix_token_id}, "
            f"windows of {lm.max_length} tokens, stride {stride or lm.max_length}"
        ),
        "baseline_rule": {"rule": "none"},
        "per_item": per_item,
    }
    return result | _summarise(result)


# -- free-text generation ----------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
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
    per_item = []
    for record in records:
        started = time.perf_counter()
        prediction = lm.generate(doc_to_text(record), max_new_tokens, until).strip()
        per_item.append({
            "id": record["id"],
            "question": record["question"],
            "reference": reference(record),
            "prediction": prediction,
            "seconds": time.perf_counter() - started,
        })
    result = {
        "kind": "generation",
        "name": name,
        "max_new_tokens": max_new_tokens,
        "until": list(until),
        "baseline_rule": {"rule": "question as the answer"},
        "per_item": per_item,
    }
    return result | _summarise(result)


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


# -- summaries, recomputable on any subset -----------------------------------------------------


def _summarise(result: dict) -> dict:
    """metrics and baseline of a result from its per-item records (and its baseline rule)."""
    items, rule = result["per_item"], result["baseline_rule"]
    if not items:
        raise ValueError("no items to summarise")
    kind = result["kind"]
    if kind == "multiple_choice":
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
            name = f"always {chr(ord('A') + position)}, the commonest answer; chance {_format('acc', chance)}"
            baseline = {"name": name, "value": golds[position] / len(items)}
        else:
            share = float(np.mean([i["gold"] == rule["label"] for i in items]))
            baseline = {"name": f"majority class {rule['option']!r} (from {rule['from']})", "value": share}
        return {"metrics": metrics, "baseline": {m: baseline for m in metrics}}
    if kind == "language_modelling":
        nll, tokens, nbytes = ([i[k] for i in items] for k in ("nll", "tokens", "bytes"))
        metrics = {
            "bits_per_byte": ratio(nll, nbytes, lambda r: r / math.log(2)),
            "byte_perplexity": ratio(nll, nbytes, math.exp),
            "token_perplexity": ratio(nll, tokens, math.exp),
        }
        return {"metrics": metrics, "baseline": None, "tokens": int(sum(tokens)), "bytes": int(sum(nbytes))}
    if kind == "generation":
        references = [i["reference"] for i in items]
        metrics = _generation_metrics([i["prediction"] for i in items], references)
        metrics["seconds_per_answer"] = mean([i["seconds"] for i in items])
        baseline_metrics = _generation_metrics([i["question"] for i in items], references)
        baseline = {m: {"name": "the question as the answer", "value": v["value"]} for m, v in baseline_metrics.items()}
        return {"metrics": metrics, "baseline": baseline}
    raise ValueError(f"unknown result kind {kind!r}")


def score_subset(result: dict, ids: Iterable[str]) -> dict:
    """The result recomputed on the items whose id is in ``ids`` (all of which must be in it)."""
    wanted = set(ids)
    known = {i["id"] for i in result["per_item"]}
    if missing := wanted - known:
        raise ValueError(f"{len(missing)} ids are not items of {result.get('name')!r}, e.g. {sorted(missing)[:3]}")
    subset = {k: v for k, v in result.items() if k not in ("metrics", "baseline")}
    subset["per_item"] = [i for i in result["per_item"] if i["id"] in wanted]
    return subset | _summarise(subset)


# -- report ---------------------------------------------------------------------------------------


def _format(metric: str, value: float) -> str:
    if math.isnan(value):
        return "–"
    if metric in ("acc", "acc_norm", "exact_match", "f1", "rougeL"):
        return f"{100 * value:.1f}%"
    if metric == "bleu":
        return f"{value:.2f}"
    return f"{value:.3f}" if metric == "bits_per_byte" else f"{value:.2f}"


def render_markdown(results: Sequence[dict]) -> str:
    """One table per benchmark: metric, value, 95% CI, n, baseline."""
    tables: dict[str, list[str]] = {}
    for r in results:
        if r["kind"] == "multiple_choice":
            title = f"{r['name']} ({r['split']})"
            shots = f"{r['num_fewshot']}-shot" + (f", shots from {'; '.join(r['shots_from'])}" if r["num_fewshot"] else "")
            label = f"{r['style']}, {shots}"
        elif r["kind"] == "language_modelling":
            title, label = r["name"], f"rolling windows of {r['window']} tokens, stride {r['stride']}"
        else:
            title, label = r["name"], f"greedy, ≤{r['max_new_tokens']} tokens"
        rows = tables.setdefault(title, ["| metric | value | 95% CI | n | baseline |", "| --- | --- | --- | --- | --- |"])
        for metric, m in r["metrics"].items():
            base = (r["baseline"] or {}).get(metric)
            base_text = f"{_format(metric, base['value'])} ({base['name']})" if base else "–"
            ci = f"{_format(metric, m['ci95'][0])} – {_format(metric, m['ci95'][1])}"
            rows.append(f"| {metric} ({label}) | {_format(metric, m['value'])} | {ci} | {m['n']} | {base_text} |")
    return "\n\n".join(f"### {title}\n\n" + "\n".join(rows) for title, rows in tables.items()) + "\n"


# -- contamination: what the pretraining corpus already held --------------------------------------

NGRAM = 13  # GPT-3's decontamination length: long enough that a match is copied text, not shared phrasing


def _ngrams(text: str, n: int = NGRAM) -> set[int]:
    words = normalize_answer(text).split()
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


def contamination(records: Sequence[dict], corpus_dir: Path) -> dict[str, str]:
    """id -> how an item overlaps the pretraining corpus, for the items that do: PubMedQA by its
    PMID (its context is that abstract), the others by a 13-gram of the question found in the
    corpus text (lower-cased, punctuation and articles dropped)."""
    from storage.formats import iter_corpus, read_corpus

    pmids = {int(r["id"].split(":", 1)[1]): r["id"] for r in records if r["source"] == "pubmedqa"}
    by_gram: dict[int, list[str]] = {}
    for r in records:
        if r["source"] != "pubmedqa":
            for gram in _ngrams(r["question"]):
                by_gram.setdefault(gram, []).append(r["id"])
    found: dict[str, str] = {}
    in_corpus = read_corpus(corpus_dir, ["pmid"]).column("pmid").to_pylist()
    found |= {pmids[p]: "PMID in the corpus" for p in set(in_corpus) & set(pmids)}
    if by_gram:
        for _, texts in iter_corpus(corpus_dir):
            for text in texts:
                for gram in _ngrams(text) & by_gram.keys():
                    found |= {item: f"{NGRAM}-gram of the question in the corpus" for item in by_gram[gram]}
    return found


# -- the stage ----------------------------------------------------------------------------------------

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


@config_dataclass
class EvaluationConfig:
    """What to measure, and how much of it."""

    benchmarks: tuple[Literal["pubmedqa", "medmcqa", "medqa_4options", "medqa_5options"], ...] = Field(
        tuple(BENCHMARKS), description="Multiple-choice benchmarks to score (each where its QA data is given)."
    )
    shots: tuple[int, ...] = Field((0, 5), description="Worked examples in the prompt; one run per number (0: zero-shot).")
    max_items: int | None = Field(None, ge=1, description="Score at most this many items per benchmark, the first by id (unset: all).")
    perplexity_documents: int | None = Field(None, ge=1, description="Documents of the checkpoint's test.bin for perplexity (unset: all).")
    held_out_documents: int | None = Field(None, ge=1, description="Abstracts new since the model's corpus (from a newer snapshot in the store) for bits per byte (unset: all).")
    generation_items: int = Field(20, ge=0, description="Free-text answers generated per set (PubMedQA long answers, instruction data; 0: none).")
    max_new_tokens: int = Field(64, ge=1, description="Token budget of a generated answer.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (unset: torch's default).")

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("threads",)

    @model_validator(mode="after")
    def _shots(self):
        if any(k < 0 for k in self.shots) or not self.shots:
            raise ValueError(f"shots must be numbers >= 0, at least one; got {self.shots}")
        return self


def load_lm(checkpoint: Artifact) -> CausalLM:
    """Our checkpoint artifact (weights, config and tokenizer files), or a Hugging Face folder: an
    hf_model artifact, or a checkpoint fine-tuned from one (published as a Hugging Face folder)."""
    from model.checkpoint import is_hf_folder
    from model.scoring import HFCausalLM, TransformerLM
    from storage.formats import TOKENIZER_FILE, load_tokenizer

    if is_hf_folder(checkpoint.path):
        return HFCausalLM.from_folder(checkpoint.path)
    return TransformerLM.from_checkpoint(checkpoint.path, load_tokenizer(checkpoint.file(TOKENIZER_FILE)))


def _first(records: list[dict], benchmark: str, n: int | None) -> list[dict]:
    """The records with only the first ``n`` scored items (by id) of a benchmark; the shot pool is kept whole."""
    if n is None:
        return records
    items, _ = benchmark_records(records, benchmark)
    dropped = {r["id"] for r in sorted(items, key=lambda r: r["id"])[n:]}
    return [r for r in records if r["id"] not in dropped]


def newer_abstracts(newer_dir: Path, corpus_dir: Path, limit: int | None) -> list[str]:
    """Documents of a snapshot newer than the model's corpus whose PMIDs that corpus never had: the
    articles published since it was trained (a temporal hold-out, what a nightly-retrained model
    meets next), first by PMID."""
    from storage.formats import corpus_tables, iter_corpus

    seen = {pmid for table in corpus_tables(corpus_dir, ["pmid"]) for pmid in table.column("pmid").to_pylist()}
    texts: list[str] = []
    for pmids, batch in iter_corpus(newer_dir):
        texts += [t for p, t in zip(pmids, batch) if p not in seen]
        if limit is not None and len(texts) >= limit:
            return texts[:limit]
    return texts


def evaluate_model(inputs: dict, out_dir: Path, config: EvaluationConfig) -> dict:
    """Every measurement the inputs allow, written as results.json and report.md; returns the
    headline numbers. Progress: one step per measurement (storage/progress.py)."""
    import torch

    from storage.formats import read_records

    if config.threads:
        torch.set_num_threads(config.threads)
    lm = load_lm(inputs["model"])
    records = [r for qa in inputs["qa"] for r in read_records(qa.path)]
    corpus, shards, newer = inputs.get("corpus"), inputs.get("shards"), inputs.get("newer")
    overlaps = contamination(records, corpus.path) if corpus is not None else None

    def scored(name: str, chosen: list[dict], style: str, k: int) -> dict:
        result = multiple_choice(lm, chosen, name, style, k)
        if overlaps is not None:
            result["contamination"] = _clean_score(result, overlaps)
        return result

    plan: list[tuple[str, Callable[[], dict | None]]] = []  # (what is measured, how), in report order
    for name in config.benchmarks:
        if benchmark_records(records, name)[0]:
            chosen = _first(records, name, config.max_items)
            plan += [(f"{name} {style} {k}-shot", partial(scored, name, chosen, style, k)) for style in BENCHMARKS[name].styles for k in config.shots]
    if shards is not None:
        plan.append(("test split", lambda: shards_perplexity(lm, shards.path, "test", config.perplexity_documents, name=f"test split of {shards.ref}")))
    if newer is not None and corpus is not None:
        def held_out() -> dict | None:
            texts = newer_abstracts(newer.path, corpus.path, config.held_out_documents)
            return text_bits_per_byte(lm, texts, f"abstracts new since its corpus (in {newer.ref})") if texts else None

        plan.append(("new abstracts", held_out))
    if config.generation_items:
        free_text = {
            "PubMedQA long answers": [r for r in records if r["source"] == "pubmedqa" and r["split"] == "test" and r["explanation"]],
            "instruction answers": [r for r in records if not r["options"] and r["split"] != "train"],
        }
        plan += [(name, partial(generation, lm, sorted(chosen, key=lambda r: r["id"])[: config.generation_items], name, config.max_new_tokens))
                 for name, chosen in free_text.items() if chosen]
    if not plan:
        raise ValueError("nothing to evaluate: no benchmark records in the QA inputs, no shards and no corpus; give QA data")

    progress, results = Progress("evaluation", len(plan), "measurements", log, every_s=0), []
    for done, (what, measure) in enumerate(plan, 1):
        if (result := measure()) is not None:
            results.append(result)
        progress.update(done, f"{what}: {_format(_main_metric(result), result['metrics'][_main_metric(result)]['value'])}" if result else what)
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / REPORT_FILE).write_text(render_markdown(results))
    return {_headline(r): r["metrics"][_main_metric(r)]["value"] for r in results}


def _clean_score(result: dict, overlaps: dict[str, str]) -> dict:
    """How many scored items the pretraining corpus held, and the score without them."""
    ids = [i["id"] for i in result["per_item"]]
    seen = [i for i in ids if i in overlaps]
    clean = [i for i in ids if i not in overlaps]
    report = {"overlapping_items": len(seen), "why": sorted({overlaps[i] for i in seen})}
    if clean:
        subset = score_subset(result, clean)
        report["clean"] = {"n": len(clean), "metrics": subset["metrics"]}
    return report


def _main_metric(result: dict) -> str:
    return {"multiple_choice": "acc", "language_modelling": "bits_per_byte", "generation": "rougeL"}[result["kind"]]


def _headline(result: dict) -> str:
    if result["kind"] == "multiple_choice":
        return f"{result['name']}_{result['style']}_{result['num_fewshot']}shot_acc"
    return f"{result['name']} {_main_metric(result)}"


def evaluation_rows(artifact) -> list[dict]:
    """The results as table rows: benchmark, metric, value, 95% CI, n, baseline, and the clean score."""
    rows = []
    for r in json.loads(artifact.file(RESULTS_FILE).read_text()):
        metric = _main_metric(r)
        m, base = r["metrics"][metric], (r["baseline"] or {}).get(metric)
        label = f"{r['style']}, {r['num_fewshot']}-shot" if r["kind"] == "multiple_choice" else ""
        row = {
            "benchmark": r["name"], "how": label, "metric": metric, "value": _format(metric, m["value"]),
            "ci95": f"{_format(metric, m['ci95'][0])} – {_format(metric, m['ci95'][1])}", "n": m["n"],
            "baseline": f"{_format(metric, base['value'])} ({base['name']})" if base else "",
        }
        if "contamination" in r:
            c = r["contamination"]
            clean = c.get("clean", {}).get("metrics", {}).get(metric)
            row["in pretraining corpus"] = c["overlapping_items"]
            row["clean value"] = f"{_format(metric, clean['value'])} (n={clean['n']})" if clean else "–"
        rows.append(row)
    return rows


def comparison_rows(columns: Sequence[tuple[str, object]]) -> list[dict]:
    """Evaluations side by side (the base model, then each fine-tuning stage): a row per benchmark
    and way of scoring it, its main metric under each column's label, then the baseline (the
    best constant answer, or PubMedQA's majority class) of the same items. ``columns``: (label, evaluate artifact)."""
    rows: dict[tuple, dict] = {}
    for label, artifact in columns:
        for r in json.loads(artifact.file(RESULTS_FILE).read_text()):
            metric = _main_metric(r)
            how = f"{r['style']}, {r['num_fewshot']}-shot" if r["kind"] == "multiple_choice" else ""
            row = rows.setdefault((r["name"], how, metric), {"benchmark": r["name"], "how": how, "metric": metric})
            row[label] = _format(metric, r["metrics"][metric]["value"])
            base = (r["baseline"] or {}).get(metric)
            row.setdefault("baseline", f"{_format(metric, base['value'])} ({base['name']})" if base else "–")
    labels = [label for label, _ in columns]
    return [{k: row.get(k, "–") for k in ("benchmark", "how", "metric", *labels, "baseline")} for row in rows.values()]


def rows_markdown(rows: Sequence[dict]) -> str:
    """Table rows (dicts) as a markdown table: a column for every key any row has, "–" where a row has none."""
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    return "\n".join(lines + ["| " + " | ".join(str(row.get(k, "–")) for k in keys) + " |" for row in rows]) + "\n"


EVALUATE = Stage(
    name="evaluate",
    version="3",
    config=EvaluationConfig,
    inputs={
        "model": Input(MODEL_KINDS),
        "qa": Input("qa", many=True),
        "shards": Input("shards", optional=True),  # test.bin: perplexity
        "corpus": Input("corpus", optional=True),  # contamination, and what "newer" holds that it did not
        "newer": Input("corpus", optional=True),  # a snapshot built after the model's: articles it never saw
    },
    build=evaluate_model,
    label=lambda inputs, config: f"of {inputs['model'].ref}",
    report=evaluation_rows,
)
