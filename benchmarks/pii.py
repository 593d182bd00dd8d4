"""What the PII scrubbers catch, miss and wrongly mask: tasks/pii.py (presidio's pattern
recognizers as we configure them) against presidio's own default recognizers on the same blank
spaCy pipeline, and against scrubadub's defaults (when it is installed: it is not a dependency).

    python -m benchmarks.pii [--qa FILE_OR_DIR ...] [--examples 3]

- planted: every case of tests/data/pii/planted.json, caught or missed by each (a case is caught
  when none of its personal data is left), and its medical sentences that must come out unchanged;
- real text: the records of the QA files (default: the bundled ones; the recorded figures come
  from the fuller copies in shared/data), every field a fine-tuning can train on: how many records
  each scrubber changes (none of them hold personal data: every change is a false positive), by
  kind, with examples, and characters scrubbed per second in one process.

JSON in benchmarks/results/pii.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from benchmarks.common import REPO, allow_reading, write_result
from storage.formats import read_records
from tasks.qa import QAConfig, convert_qa
from tasks.trainset import fields

PLANTED = REPO / "tests" / "data" / "pii" / "planted.json"
QA_FILES = ["tests/data/pubmedqa", "tests/data/medqa/US_test.jsonl", "tests/data/medmcqa/medmcqa_val.json", "tests/data/instructions"]
Scrubber = Callable[[str], tuple[str, list[str]]]


def ours() -> Scrubber:
    from tasks.pii import scrub

    return scrub


def presidio_defaults() -> Scrubber:
    """presidio's AnalyzerEngine with every recognizer it loads by default, on the same blank pipeline."""
    import spacy
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_anonymizer import AnonymizerEngine

    nlp = SpacyNlpEngine()
    nlp.nlp = {"en": spacy.blank("en")}
    analyzer, anonymizer = AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"]), AnonymizerEngine()

    def scrub(text: str) -> tuple[str, list[str]]:
        found = analyzer.analyze(text, language="en")
        return (anonymizer.anonymize(text, found).text, [r.entity_type for r in found]) if found else (text, [])

    return scrub


def scrubadub_defaults() -> Scrubber | None:
    try:
        import scrubadub
    except ImportError:
        return None
    scrubber = scrubadub.Scrubber()

    def scrub(text: str) -> tuple[str, list[str]]:
        return scrubber.clean(text), [f.type for f in scrubber.iter_filth(text)]

    return scrub


def planted(scrub: Scrubber) -> dict:
    cases = json.loads(PLANTED.read_text())
    results = []
    for case in cases["cases"]:
        masked, _ = scrub(case["text"])
        results.append({"kind": case["kind"], "caught": all(p not in masked for p in case["pii"]), "out": masked})
    changed = [{"text": t, "out": out} for t in cases["not_pii"] if (out := scrub(t)[0]) != t]
    return {"caught": sum(r["caught"] for r in results), "cases": len(results), "per_case": results,
            "medical_sentences": len(cases["not_pii"]), "medical_changed": len(changed), "medical_sentences_changed": changed}


def real_text(scrub: Scrubber, sources: dict[str, list[dict]], examples: int) -> dict:
    out = {}
    for name, records in sources.items():
        changed, kinds, shown, chars = 0, {}, [], 0
        started = time.perf_counter()
        for record in records:
            found = []
            for text in fields(record):
                chars += len(text)
                masked, kinds_found = scrub(text)
                if kinds_found:
                    found += kinds_found
                    if len(shown) < examples:
                        shown.append({"id": record["id"], "out": masked[:300]})
            changed += bool(found)
            for kind in found:
                kinds[kind] = kinds.get(kind, 0) + 1
        seconds = time.perf_counter() - started
        out[name] = {"records": len(records), "records_changed": changed, "by_kind": kinds, "chars": chars, "chars_per_s": round(chars / seconds), "examples": shown}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qa", nargs="+", default=QA_FILES, help="QA files or folders whose records are scrubbed (real text without personal data)")
    parser.add_argument("--examples", type=int, default=3, help="changed records shown per source and scrubber")
    args = parser.parse_args()
    os.environ["TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS"] = ""  # presidio's default e-mail check would fetch the list: tldextract's snapshot instead
    load_before = os.getloadavg()[0]
    paths = [(REPO / p).resolve() for p in args.qa]
    allow_reading(*paths)
    sources = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(paths):
            convert_qa(QAConfig(source=str(path)), Path(tmp) / str(i))
            records = read_records(Path(tmp) / str(i))
            sources[records[0]["source"]] = records  # the dataset's name: a figure's path can hold it (a file name's dot it cannot)
    results = {"load_average_1min_before": load_before, "qa": [str(p) for p in paths]}
    for name, make in (("ours", ours), ("presidio_defaults", presidio_defaults), ("scrubadub_defaults", scrubadub_defaults)):
        started = time.perf_counter()
        scrub = make()
        if scrub is None:
            results[name] = "not installed (pip install scrubadub==2.0.1 to compare)"
            continue
        scrub("warm up: imports and models")
        results[name] = {"load_s": round(time.perf_counter() - started, 2), "planted": planted(scrub), "real_text": real_text(scrub, sources, args.examples)}
        p, real = results[name]["planted"], results[name]["real_text"]
        results[name]["chars_per_s"] = [r["chars_per_s"] for r in real.values()]  # one per source: the docs print the spread
        print(f"{name}: planted {p['caught']}/{p['cases']} caught, {len(p['medical_sentences_changed'])} medical sentences changed; "
              + "; ".join(f"{src} {r['records_changed']}/{r['records']} records changed, {r['chars_per_s']:,} chars/s" for src, r in real.items()), flush=True)
    results["load_average_1min_after"] = os.getloadavg()[0]
    print(write_result("pii", results))


if __name__ == "__main__":
    main()
