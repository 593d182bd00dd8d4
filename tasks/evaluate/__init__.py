"""Evaluation: pure functions from a model (a ``model.scoring.CausalLM``) and data to results, and
the stage that runs them. No Prefect and no artifact store below the stage.

- ``statistics.py``: metrics with 95% confidence intervals (Wilson, bootstrap), and how a
  metric's value is written;
- ``kinds.py``: ``Kind``, what each kind of result owns: its summary, its headline metric and how
  it is shown;
- ``multiple_choice.py``: the benchmarks, scored by log-likelihood as lm-evaluation-harness does,
  and their baselines;
- ``language_modelling.py``: bits per byte and perplexity of a shards folder's documents or of
  raw texts (abstracts newer than the model's corpus);
- ``generation.py``: greedy free-text answers, scored by exact match, token F1, ROUGE-L and BLEU;
- ``results.py``: the result dict, ``KINDS`` (each kind by the ``kind`` string a result stores),
  ``headline_metric`` and ``score_subset``;
- ``contamination.py``: the items the pretraining corpus already held, and the score without them;
- ``report.py``: report.md and the row tables of one or several evaluations;
- ``stage.py``: ``EvaluationConfig``, ``evaluate_model`` and the ``EVALUATE`` stage.
"""

from tasks.evaluate.contamination import NGRAM, clean_score, contamination
from tasks.evaluate.generation import generation, normalize_answer, token_f1
from tasks.evaluate.kinds import Kind
from tasks.evaluate.language_modelling import newer_abstracts, shard_documents, shards_perplexity, text_bits_per_byte
from tasks.evaluate.multiple_choice import BENCHMARKS, Benchmark, benchmark_records, multiple_choice, multiple_choice_styles, multiple_choice_suite
from tasks.evaluate.report import REPORT_FILE, comparison_rows, evaluation_rows, render_markdown, rows_markdown
from tasks.evaluate.results import KINDS, RESULTS_FILE, headline_metric, kind_of, score_subset
from tasks.evaluate.stage import EVALUATE, EvaluationConfig, evaluate_model, load_lm
from tasks.evaluate.statistics import BOOTSTRAP_RESAMPLES, bootstrap_interval, format_value, mean, proportion, ratio, wilson_interval

__all__ = [
    "BENCHMARKS", "BOOTSTRAP_RESAMPLES", "EVALUATE", "KINDS", "NGRAM", "REPORT_FILE", "RESULTS_FILE", "Benchmark", "EvaluationConfig",
    "Kind", "benchmark_records", "bootstrap_interval", "clean_score", "comparison_rows", "contamination", "evaluate_model",
    "evaluation_rows", "format_value", "generation", "headline_metric", "kind_of", "load_lm", "mean", "multiple_choice",
    "multiple_choice_styles", "multiple_choice_suite", "newer_abstracts", "normalize_answer", "proportion", "ratio", "render_markdown", "rows_markdown",
    "score_subset", "shard_documents", "shards_perplexity", "text_bits_per_byte", "token_f1", "wilson_interval",
]
