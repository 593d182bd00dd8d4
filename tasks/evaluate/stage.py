"""The evaluate stage: every measurement the inputs allow, written as results.json and report.md."""

from __future__ import annotations

import json
import logging
from functools import cache, partial
from pathlib import Path
from typing import Callable, ClassVar, Literal

from pydantic import Field, model_validator

from model.scoring import CausalLM, load_causal_lm
from storage import Artifact, Input, Stage
from storage.config import config_dataclass
from storage.formats import CORPUS_KINDS, MODEL_KINDS
from storage.progress import Progress
from tasks.evaluate.contamination import clean_score, contamination
from tasks.evaluate.generation import generation
from tasks.evaluate.language_modelling import newer_abstracts, shards_perplexity, text_bits_per_byte
from tasks.evaluate.multiple_choice import BENCHMARKS, benchmark_records, multiple_choice_styles
from tasks.evaluate.report import REPORT_FILE, evaluation_rows, render_markdown
from tasks.evaluate.results import RESULTS_FILE, headline_metric, kind_of
from tasks.evaluate.statistics import format_value
from tasks.qa.registry import long_answers

log = logging.getLogger("medlm.evaluate")


@config_dataclass
class EvaluationConfig:
    """What to measure, and how much of it."""

    benchmarks: tuple[Literal[tuple(BENCHMARKS)], ...] = Field(  # the registry's, as an enum for the UI form
        tuple(BENCHMARKS), description="Multiple-choice benchmarks to score (each where its QA data is given)."
    )
    shots: tuple[int, ...] = Field((0, 5), description="Worked examples in the prompt; one run per number (0: zero-shot).")
    max_items: int | None = Field(None, ge=1, description="Score at most this many items per benchmark, the first by id (unset: all).")
    perplexity_documents: int | None = Field(None, ge=1, description="Documents of the checkpoint's test.bin for perplexity (unset: all).")
    held_out_documents: int | None = Field(None, ge=1, description="Abstracts new since the model's corpus (in the snapshot held_out_ref names) for bits per byte (unset: all).")
    generation_items: int = Field(20, ge=0, description="Free-text answers generated per set (PubMedQA long answers, instruction data; 0: none).")
    max_new_tokens: int = Field(64, ge=1, description="Token budget of a generated answer.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (unset: one per core this process may use, or one while that is faster: a busy machine, model/threads.py).")

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("threads",)

    @model_validator(mode="after")
    def _shots(self):
        if any(k < 0 for k in self.shots) or not self.shots:
            raise ValueError(f"shots must be numbers >= 0, at least one; got {self.shots}")
        return self


def load_lm(checkpoint: Artifact) -> CausalLM:
    """Our checkpoint artifact (weights, config and tokenizer files), or a Hugging Face folder: an
    hf_model artifact, or a checkpoint fine-tuned from one (published as a Hugging Face folder)."""
    return load_causal_lm(checkpoint.path)


def _first(records: list[dict], benchmark: str, n: int | None) -> list[dict]:
    """The records with only the first ``n`` scored items (by id) of a benchmark; the shot pool is kept whole."""
    if n is None:
        return records
    items, _ = benchmark_records(records, benchmark)
    dropped = {r["id"] for r in sorted(items, key=lambda r: r["id"])[n:]}
    return [r for r in records if r["id"] not in dropped]


def evaluate_model(inputs: dict, out_dir: Path, config: EvaluationConfig) -> dict:
    """Every measurement the inputs allow, written as results.json and report.md; returns the
    headline numbers. Progress: one step per measurement (storage/progress.py)."""
    from storage.formats import read_records

    lm = load_lm(inputs["model"])
    records = [r for qa in inputs["qa"] for r in read_records(qa.path)]
    corpus, shards, newer = inputs.get("corpus"), inputs.get("shards"), inputs.get("newer")
    overlaps = contamination(records, corpus.path) if corpus is not None else None

    @cache
    def scored(name: str, k: int) -> dict[str, dict]:
        """Every style of a benchmark at k shots, scored together (they share zero-shot prompts)."""
        results = multiple_choice_styles(lm, _first(records, name, config.max_items), name, BENCHMARKS[name].styles, k)
        if overlaps is not None:
            for result in results.values():
                result["contamination"] = clean_score(result, overlaps)
        return results

    plan: list[tuple[str, Callable[[], dict | None]]] = []  # (what is measured, how), in report order
    for name in config.benchmarks:
        if benchmark_records(records, name)[0]:
            plan += [(f"{name} {style} {k}-shot", lambda name=name, style=style, k=k: scored(name, k)[style]) for style in BENCHMARKS[name].styles for k in config.shots]
    if shards is not None:
        plan.append(("test split", lambda: shards_perplexity(lm, shards.path, "test", config.perplexity_documents, name=f"test split of {shards.ref}")))
    if newer is not None and corpus is not None:
        def held_out() -> dict | None:
            texts = newer_abstracts(newer.path, corpus.path, config.held_out_documents)
            return text_bits_per_byte(lm, texts, f"abstracts new since its corpus (in {newer.ref})") if texts else None

        plan.append(("new abstracts", held_out))
    if config.generation_items:
        free_text = {**long_answers(records), "instruction answers": [r for r in records if not r["options"] and r["split"] != "train"]}
        plan += [(name, partial(generation, lm, sorted(chosen, key=lambda r: r["id"])[: config.generation_items], name, config.max_new_tokens))
                 for name, chosen in free_text.items() if chosen]
    if not plan:
        raise ValueError("nothing to evaluate: no benchmark records in the QA inputs, no shards and no corpus; give QA data")

    progress, results = Progress("evaluation", len(plan), "measurements", log, every_s=0), []
    with lm.threads(config.threads):
        for done, (what, measure) in enumerate(plan, 1):
            if (result := measure()) is not None:
                results.append(result)
                metric = headline_metric(result)
                what += f": {format_value(metric, result['metrics'][metric]['value'])}"
            else:
                what += ": none"
            progress.update(done, what)
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / REPORT_FILE).write_text(render_markdown(results))
    return {kind_of(r).headline_name(r): r["metrics"][headline_metric(r)]["value"] for r in results}


EVALUATE = Stage(
    name="evaluate",
    version="3",
    config=EvaluationConfig,
    inputs={
        "model": Input(MODEL_KINDS),
        "qa": Input("qa", many=True),
        "shards": Input("shards", optional=True),  # test.bin: perplexity
        "corpus": Input(CORPUS_KINDS, optional=True),  # contamination, and what "newer" holds that it did not
        "newer": Input(CORPUS_KINDS, optional=True),  # the temporal hold-out the flow names (held_out_ref): articles the model never saw
    },
    build=evaluate_model,
    label=lambda inputs, config: f"of {inputs['model'].ref}",
    report=evaluation_rows,
)
