"""Trainset: QA artifacts -> the records fine-tuning and preference tuning train on, cleaned, and a
report of what was removed and changed.

Only the train split is cleaned. The other splits pass through as they are (fine-tuning's
validation loss and DPO's leak guard read them), and evaluation reads the QA artifacts
themselves, so nothing it scores is touched. Rules, in order; a record removed by one is counted
there and not judged by the next:

1. evaluation 13-gram: a field of the record (question, context, option, answer, explanation)
   shares a 13-gram, normalised as the evaluation's contamination check normalises, with an
   evaluation item's question, context or options: a record outside the train split of the data
   itself or of the ``held_out`` QA artifacts (the other QA data the flow evaluates on; lineage
   parents, as DPO's). Judged before PII is masked, so a mask never hides a copy;
2. PII: e-mail addresses, phone numbers, URLs, names after a cue ... replaced by their kind
   ("<PHONE_NUMBER>", tasks/pii.py) in every field; the record is changed, not removed;
3. exact duplicate: an earlier record has the same text (after 2; case and spacing ignored);
4. near-duplicate: an earlier record that the rules above keep has 5-word shingles with a Jaccard
   similarity of at least ``near_duplicate_threshold``: candidates by MinHash LSH, each checked
   exactly, with the hygiene stage's functions and its shingle and band settings.

Earlier: in the order of the data (the artifacts as given, each in its file's order), so of a
group of duplicates the first is kept. All rules off: the records as they are.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from storage import Artifact, Input, Stage
from storage.config import config_dataclass
from storage.formats import RECORDS_FILE, qa_schema, read_records
from tasks.hygiene import EXAMPLE_CHARS, HygieneConfig, band_keys, item_ngrams, jaccard, shingles

REPORT_JSON = "trainset.json"
REPORT_MD = "report.md"
_NEAR = HygieneConfig()  # shingle words, bands and rows as the hygiene stage measured them (precision and recall >= 0.95 at 0.8)

# (name, the setting that switches it on), in the order they apply
RULES = (
    ("evaluation 13-gram", "evaluation_ngrams"),
    ("PII masked", "scrub_pii"),
    ("exact duplicate", "exact_duplicates"),
    ("near-duplicate", "near_duplicates"),
)
REMOVING = {"evaluation 13-gram", "exact duplicate", "near-duplicate"}  # the PII rule changes records


@config_dataclass
class TrainsetConfig:
    """What fine-tuning and preference tuning must not train on; every rule has its own switch (all off: the train split as it is)."""

    evaluation_ngrams: bool = Field(True, description="Drop the training records sharing a 13-gram (normalised as the evaluation's contamination check) with any evaluation item's question, context or options (every record outside the train split of the QA data the flow evaluates).")
    scrub_pii: bool = Field(True, description="Replace e-mail addresses, phone numbers, URLs, IP addresses, card and social security numbers, and names, dates of birth, record numbers and street addresses after a cue ('my name is', 'Dr.', 'DOB', 'MRN') by their kind, e.g. <PHONE_NUMBER> (presidio patterns, no NER: a name without a cue stays).")
    exact_duplicates: bool = Field(True, description="Drop a training record whose text (question, context, options, answer; case and spacing ignored) an earlier record has.")
    near_duplicates: bool = Field(True, description="Drop a training record when an earlier one has 5-word shingles with Jaccard similarity >= near_duplicate_threshold (MinHash LSH candidates, each checked exactly).")
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1, description="The Jaccard similarity from which two training records are near-duplicates.")
    examples: int = Field(5, ge=0, description="Examples per rule in the report (record id and 100 characters, PII masked).")

    def on(self, setting: str) -> bool:
        return bool(getattr(self, setting))


def fields(record: dict) -> list[str]:
    """What fine-tuning can train on of a record: question, context, options, answer, explanation."""
    return [record["question"], *record["context"], *record["options"], record["answer_text"], record["explanation"] or ""]


def _masked(record: dict, scrub) -> tuple[dict, list[str], str]:
    """The record with every field scrubbed; the kinds masked; the first changed field."""
    kinds, first = [], ""

    def one(text: str | None) -> str | None:
        nonlocal first
        if text is None:
            return None
        cleaned, found = scrub(text)
        kinds.extend(found)
        first = first or (cleaned if found else "")
        return cleaned

    masked = dict(record, question=one(record["question"]), context=[one(t) for t in record["context"]], options=[one(t) for t in record["options"]],
                  answer_text=one(record["answer_text"]), explanation=one(record["explanation"]))
    return masked, kinds, first


def _excerpt(text: str, at: int = 0) -> str:
    start = max(0, at - 30)
    return ("..." if start else "") + " ".join(text[start : start + EXAMPLE_CHARS].split())


def clean(train: Sequence[dict], evaluation: Sequence[dict], config: TrainsetConfig) -> tuple[list[dict], dict]:
    """The train records the rules keep (PII masked), in order, and the report: per rule the
    records removed or changed, with examples (record id, 100 characters, PII masked)."""
    from tasks.evaluate.contamination import ngrams
    from tasks.pii import scrub

    counts = {name: 0 for name, _ in RULES}
    examples: dict[str, list[dict]] = {name: [] for name, _ in RULES}
    masked_kinds: dict[str, int] = {}

    def note(rule: str, record: dict, text: str, at: int = 0, **detail) -> None:
        counts[rule] += 1
        if len(examples[rule]) < config.examples:
            examples[rule].append({"id": record["id"], "text": _excerpt(text, at), **detail})

    grams = item_ngrams(evaluation) if config.evaluation_ngrams else {}
    scrubbed = lru_cache(maxsize=4096)(scrub)  # instruction data repeats its instruction in every record
    kept: list[dict] = []
    first_of_text: dict[bytes, str] = {}  # digest -> the id of the first record with that text
    for record in train:
        if grams:
            hit = next(((text, item) for text in fields(record) for gram in ngrams(text) if (item := grams.get(gram))), None)
            if hit:
                note("evaluation 13-gram", record, hit[0], matches=hit[1])
                continue
        if config.scrub_pii:
            record, kinds, changed = _masked(record, scrubbed)
            if kinds:
                note("PII masked", record, changed, changed.find(f"<{kinds[0]}>"))
                for kind in kinds:
                    masked_kinds[kind] = masked_kinds.get(kind, 0) + 1
        text = "\n".join(fields(record))
        if config.exact_duplicates:
            digest = hashlib.blake2b(" ".join(text.split()).casefold().encode(), digest_size=16).digest()
            if digest in first_of_text:
                note("exact duplicate", record, text, duplicate_of=first_of_text[digest])
                continue
            first_of_text[digest] = record["id"]
        kept.append(record)
    if config.near_duplicates:
        texts = ["\n".join(fields(r)) for r in kept]
        duplicate_of = near_duplicates(texts, config.near_duplicate_threshold)
        for later, earlier in duplicate_of.items():
            note("near-duplicate", kept[later], texts[later], duplicate_of=kept[earlier]["id"])
        kept = [r for i, r in enumerate(kept) if i not in duplicate_of]
    report = {
        "train": {"before": len(train), "after": len(kept)},
        "evaluation": {"items": len(evaluation), "ngrams": len(grams)},
        "rules": [{"rule": name, "setting": setting, "on": config.on(setting), "records": counts[name], "examples": examples[name]} for name, setting in RULES],
        "masked": dict(sorted(masked_kinds.items())),
    }
    return kept, report


def near_duplicates(texts: Sequence[str], threshold: float) -> dict[int, int]:
    """index -> the first earlier index whose text's shingles have a Jaccard similarity of at
    least ``threshold`` with its own, for the texts that have one."""
    buckets: dict[int, list[int]] = {}
    found: dict[int, int] = {}
    for j, text in enumerate(texts):
        grams = shingles(text, _NEAR.shingle_words)
        keys = band_keys(grams, _NEAR.minhash_bands, _NEAR.minhash_rows)
        for i in sorted({i for key in keys for i in buckets.get(key, ())}):
            if jaccard(shingles(texts[i], _NEAR.shingle_words), grams) >= threshold:
                found[j] = i
                break
        for key in keys:
            buckets.setdefault(key, []).append(j)
    return found


# -- report --------------------------------------------------------------------------------------


def render_report(report: dict, data: str) -> str:
    """report.md: the train split before and after, per rule what it removed or changed, with examples."""
    train, evaluation = report["train"], report["evaluation"]
    lines = [
        f"# What the trainset stage removed and changed: {data}",
        "",
        f"Train records: {train['before']:,} before, {train['after']:,} after; {report['other_splits']:,} records of other splits passed through unchanged. "
        f"Screened against {evaluation['items']:,} evaluation items ({evaluation['ngrams']:,} 13-grams).",
        "",
        "| rule | on | records removed | records changed |",
        "| --- | --- | --- | --- |",
    ]
    for r in report["rules"]:
        removed, changed = (r["records"], 0) if r["rule"] in REMOVING else (0, r["records"])
        lines.append(f"| {r['rule']} (`{r['setting']}`) | {'yes' if r['on'] else 'no'} | {removed:,} | {changed:,} |")
    if report["masked"]:
        lines += ["", "| PII masked | times |", "| --- | --- |", *[f"| {kind} | {n:,} |" for kind, n in report["masked"].items()]]
    for r in report["rules"]:
        if r["examples"]:
            lines += ["", f"## {r['rule']}: examples", ""]
            lines += [f"- `{e['id']}`{_detail(e)}: {e['text']}" for e in r["examples"]]
    return "\n".join(lines) + "\n"


def _detail(example: dict) -> str:
    if "matches" in example:
        return f" (shares a 13-gram with evaluation item `{example['matches']}`)"
    if "duplicate_of" in example:
        return f" (duplicate of `{example['duplicate_of']}`)"
    return ""


def report_rows(artifact: Artifact) -> list[dict]:
    """The report as table rows (the run page in the UI): records, minus those each rule removed."""
    report = json.loads(artifact.file(REPORT_JSON).read_text())
    rows = [{"rule": "train records", "on": "", "records": report["train"]["before"], "changed": 0}]
    for r in report["rules"]:
        removing = r["rule"] in REMOVING
        rows.append({"rule": r["rule"], "on": "yes" if r["on"] else "no", "records": -r["records"] if removing else 0, "changed": 0 if removing else r["records"]})
    rows.append({"rule": "train records kept", "on": "", "records": report["train"]["after"], "changed": 0})
    rows.append({"rule": "records of the other splits, unchanged", "on": "", "records": report["other_splits"], "changed": 0})
    return rows


# -- the stage -------------------------------------------------------------------------------------


def build_trainset(inputs: dict, out_dir: Path, config: TrainsetConfig) -> dict:
    """records.parquet: the data's train records cleaned, then its other records as they are;
    trainset.json and report.md: what was done."""
    data: list[Artifact] = inputs["data"]
    records = [r for a in data for r in read_records(a.path)]
    evaluation = [r for a in inputs.get("held_out") or [] for r in read_records(a.path) if r["split"] != "train"]
    evaluation += [r for r in records if r["split"] != "train"]
    kept, report = clean([r for r in records if r["split"] == "train"], evaluation, config)
    others = [r for r in records if r["split"] != "train"]
    pq.write_table(pa.Table.from_pylist(kept + others, schema=qa_schema()), out_dir / RECORDS_FILE, compression="zstd")
    report["other_splits"] = len(others)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / REPORT_MD).write_text(render_report(report, data_label(inputs)), encoding="utf-8")
    return {"train": report["train"], "other_splits": len(others)} | {r["rule"]: r["records"] for r in report["rules"]}


def data_label(inputs: dict) -> str:
    return " + ".join(a.label or a.ref for a in inputs["data"])


TRAINSET = Stage(
    name="trainset",
    version="1",
    config=TrainsetConfig,
    inputs={"data": Input("qa", many=True), "held_out": Input("qa", many=True, optional=True)},  # held_out: the evaluation items screened out, lineage parents
    build=build_trainset,
    label=lambda inputs, config: data_label(inputs),  # the data's: the curriculum's table names a fine-tuning by what it trained on
    report=report_rows,
)
