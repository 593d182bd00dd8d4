"""The figures of the README and docs/ are their recorded results' (benchmarks/figures.py): a
printed number that differs from its JSON fails here, and `make bench` rewrites it."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks.figures import DOCUMENTS, REPO, RECORDED, figures, provenance, refresh


def _printed() -> list:
    return [f for document in DOCUMENTS for f in figures(document.read_text(), str(document.relative_to(REPO)))]


def test_every_figure_the_readme_and_the_docs_print_is_its_recorded_result():
    found = _printed()
    assert len(found) >= 100 and {"README.md", "docs/benchmarks.md"} <= {f.document for f in found}  # the demo's times, the benchmark table
    stale = [f"{f.document} line {f.line}: prints {f.printed}, {f.source} says {expected}" for f in found if (expected := f.stale())]
    assert not stale, "figures differ from benchmarks/results (python -m benchmarks.figures rewrites them):\n" + "\n".join(stale)


def test_the_readmes_demo_output_is_the_recorded_demo_runs():
    """The evaluation table the README shows (its rows, in order) is the one `medlm demo` printed in
    the recorded run (benchmarks/demo.py), and the cached rerun printed the same."""
    shown, inside = [], False
    for line in (REPO / "README.md").read_text().splitlines():
        inside = inside != line.startswith("```")  # a fence opens or closes a block
        if inside and line.startswith("| "):
            shown.append(line)
    recorded = json.loads((RECORDED / "demo.json").read_text())
    table = recorded["first_run"]["evaluation_table"]
    assert len(shown) >= 5 and shown == [row for row in table if row in shown], "README.md's demo table is not the recorded run's (python -m benchmarks.demo)"
    assert recorded["cached_rerun"]["same_evaluation_table"]


def test_every_result_the_pages_quote_records_its_commit_and_machine():
    for file in {f.file for f in _printed()}:
        assert provenance(file).startswith("commit ")


@pytest.fixture
def copies(tmp_path):
    """A README of three figures and a copy of the results they read."""
    results = tmp_path / "results"
    results.mkdir()
    for name in ("train_throughput_cpu.json", "finetune_cpu.json"):
        shutil.copy(RECORDED / name, results)
    readme = tmp_path / "README.md"
    run = "results.max_length=256."
    readme.write_text(
        "Ours 3,202<!-- train_throughput_cpu.json results.medlm.tokens_per_s --> tokens/s "
        "(3,050<!-- train_throughput_cpu.json results.medlm.tokens_per_s_every_round.min -->-), "
        f"packing {run}: 1.25<!-- finetune_cpu.json {run}ours_packing.tokens_per_s / {run}ours_padding.tokens_per_s -->x, "
        f"padding 18<!-- finetune_cpu.json {run}ours_padding.padding_share * 100 -->% of positions.\n"
    )
    return readme, results


def test_a_new_result_makes_the_figure_stale_and_a_refresh_rewrites_it_as_printed(copies):
    readme, results = copies
    assert [f.stale(results) for f in figures(readme.read_text())] == [None] * 4
    record = json.loads((results / "train_throughput_cpu.json").read_text())
    record["results"]["medlm"]["tokens_per_s"] = 12345.6
    record["results"]["medlm"]["tokens_per_s_every_round"] = [12000.2, 12345.6]
    (results / "train_throughput_cpu.json").write_text(json.dumps(record))
    assert [f.stale(results) for f in figures(readme.read_text())] == ["12,346", "12,000", None, None]
    refreshed = refresh(readme, results)
    assert [line.split(": ", 1)[1].split("  (")[0] for line in refreshed] == ["3,202 -> 12,346", "3,050 -> 12,000"]
    assert "commit " in refreshed[0]
    assert readme.read_text().startswith("Ours 12,346<!-- train_throughput_cpu.json results.medlm.tokens_per_s --> tokens/s (12,000<!--")
    assert refresh(readme, results) == []  # nothing left to refresh


def test_a_figure_whose_result_is_missing_says_what_is_missing(copies):
    readme, results = copies
    readme.write_text("x 1.5<!-- finetune_cpu.json results.max_length=1024.ours_packing.tokens_per_s --> y\n")
    with pytest.raises(LookupError, match=r"README.md line 1: .*no 'max_length=1024'"):
        figures(readme.read_text())[0].stale(results)
    readme.write_text("x 1.5<!-- nothing.json a.b -->\n")
    with pytest.raises(LookupError, match="no .*nothing.json"):
        figures(readme.read_text())[0].stale(results)


def test_a_result_without_its_commit_and_machine_is_refused(copies):
    _, results = copies
    record = json.loads((results / "finetune_cpu.json").read_text())
    del record["commit"]
    (results / "finetune_cpu.json").write_text(json.dumps(record))
    with pytest.raises(LookupError, match="does not record the commit and the machine"):
        provenance("finetune_cpu.json", results)
