"""Corpus snapshot: NLM's update rules and the filters, on parsed real PubMed files."""

from __future__ import annotations

import copy
import gzip
import json
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from lxml import etree

from conftest import BASELINE_SAMPLE, UPDATE_SAMPLE
from tasks.corpus import CorpusConfig, build_snapshot
from tasks.parse import parse_xml_file

KEEP_ALL = CorpusConfig(
    require_abstract=False, min_abstract_chars=0, languages=(), drop_retracted=False, drop_duplicate_text=False
)


def parse_into(tmp: Path, xml: Path, seq: int) -> tuple[Path, Path]:
    out = tmp / f"parsed-{seq}"
    parse_xml_file(xml, out, source_file=xml.name, file_seq=seq)
    return out / "articles.parquet", out / "deletions.parquet"


def real_articles(xml_gz: Path) -> list[etree._Element]:
    with gzip.open(xml_gz) as f:
        root = etree.parse(f, etree.XMLParser(resolve_entities=False, load_dtd=False, no_network=True)).getroot()
    return root.findall("PubmedArticle")


def write_update(path: Path, articles: list, deleted_pmids: list[int] = ()) -> Path:
    """An update file in NCBI's format, built from real article elements."""
    root = etree.Element("PubmedArticleSet")
    root.extend(copy.deepcopy(a) for a in articles)
    if deleted_pmids:
        deletion = etree.SubElement(root, "DeleteCitation")
        for pmid in deleted_pmids:
            etree.SubElement(deletion, "PMID", Version="1").text = str(pmid)
    path.write_bytes(etree.tostring(root, xml_declaration=True, encoding="utf-8"))
    return path


def pmid_of(article) -> int:
    return int(article.findtext("MedlineCitation/PMID"))


def snapshot_rows(out: Path) -> dict[int, dict]:
    return {row["pmid"]: row for row in pq.read_table(out / "corpus.parquet").to_pylist()}


@pytest.fixture(scope="module")
def parsed_samples(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parsed")
    return tmp, [parse_into(tmp, BASELINE_SAMPLE, 14), parse_into(tmp, UPDATE_SAMPLE, 1298)]


def test_latest_version_per_pmid_wins(parsed_samples, tmp_path):
    _, files = parsed_samples
    stats = build_snapshot([a for a, _ in files], [d for _, d in files], tmp_path, KEEP_ALL)
    rows = snapshot_rows(tmp_path)
    assert rows[30271887]["version"] == 4  # the sample carries Versions 1-4 of this PMID
    assert len(rows) == stats["documents"] == stats["pmids"] - stats["deleted"]
    assert stats["superseded"] == stats["records"] - stats["pmids"] >= 3
    assert list(rows) == sorted(rows)


def test_a_later_file_supersedes_and_deletions_apply_in_sequence_order(parsed_samples, tmp_path):
    tmp, files = parsed_samples
    baseline = real_articles(BASELINE_SAMPLE)
    revised, deleted_later, deleted_earlier = baseline[0], baseline[1], baseline[2]
    changed = copy.deepcopy(revised)
    changed.find("MedlineCitation/Article/ArticleTitle").text = "A revised title from a later update file."
    update = write_update(tmp_path / "pubmed20n1300.xml", [changed], [pmid_of(deleted_later)])
    # A deletion in a file BEFORE the baseline record's file does not remove it.
    early = write_update(tmp_path / "pubmed20n0010.xml", [], [pmid_of(deleted_earlier)])
    extra = [parse_into(tmp_path, update, 1300), parse_into(tmp_path, early, 10)]
    all_files = files + extra
    stats = build_snapshot([a for a, _ in all_files], [d for _, d in all_files], tmp_path / "out", KEEP_ALL)
    rows = snapshot_rows(tmp_path / "out")
    assert rows[pmid_of(revised)]["title"] == "A revised title from a later update file."
    assert rows[pmid_of(revised)]["file_seq"] == 1300
    assert pmid_of(deleted_later) not in rows
    assert pmid_of(deleted_earlier) in rows
    assert stats["deleted"] == 1


def test_default_filters_match_an_independent_count(parsed_samples, tmp_path):
    _, files = parsed_samples
    filters = CorpusConfig()
    stats = build_snapshot([a for a, _ in files], [d for _, d in files], tmp_path, filters)

    # The same rules, computed row by row in Python from the parsed files.
    latest: dict[int, dict] = {}
    for articles, _ in files:
        for row in pq.read_table(articles).to_pylist():
            current = latest.get(row["pmid"])
            if current is None or (row["file_seq"], row["version"]) > (current["file_seq"], current["version"]):
                latest[row["pmid"]] = row
    kept = [
        r for r in latest.values()
        if (r["abstract"] or "").strip()
        and len(r["abstract"]) >= filters.min_abstract_chars
        and "eng" in r["languages"]
        and "Retracted Publication" not in r["publication_types"]
    ]
    texts = {}
    for r in sorted(kept, key=lambda r: r["pmid"]):
        title = r["title"] if r["title"].strip() else r["vernacular_title"]
        texts.setdefault(title + "\n\n" + r["abstract"], r["pmid"])
    expected = set(texts.values())

    rows = snapshot_rows(tmp_path)
    assert set(rows) == expected
    assert stats["documents"] == len(expected)
    assert stats["pmids"] - stats["deleted"] - sum(d["rows"] for d in stats["dropped"]) == stats["documents"]
    by_filter = {d["filter"]: d["rows"] for d in stats["dropped"]}
    assert by_filter["no abstract"] == sum(1 for r in latest.values() if not (r["abstract"] or "").strip())
    some = rows[min(rows)]
    assert some["text"] == some["title"] + "\n\n" + latest[some["pmid"]]["abstract"]
    assert json.loads((tmp_path / "stats.json").read_text())["documents"] == len(expected)


def test_retraction_filters(parsed_samples, tmp_path):
    _, files = parsed_samples
    args = ([a for a, _ in files], [d for _, d in files])
    strict = replace(KEEP_ALL, drop_retracted=True, drop_retraction_notices=True)
    build_snapshot(*args, tmp_path / "a", KEEP_ALL)
    build_snapshot(*args, tmp_path / "b", strict)
    plain, dropped = snapshot_rows(tmp_path / "a"), snapshot_rows(tmp_path / "b")
    removed = set(plain) - set(dropped)
    assert removed and all(
        {"Retracted Publication", "Retraction of Publication"} & set(plain[p]["publication_types"]) for p in removed
    )
    assert not any({"Retracted Publication", "Retraction of Publication"} & set(r["publication_types"]) for r in dropped.values())


def test_exact_duplicate_text_keeps_the_lowest_pmid(parsed_samples, tmp_path):
    _, files = parsed_samples
    original = next(a for a in real_articles(BASELINE_SAMPLE) if a.find("MedlineCitation/Article/Abstract") is not None)
    twin = copy.deepcopy(original)
    twin.find("MedlineCitation/PMID").text = "99999999"
    dup = parse_into(tmp_path, write_update(tmp_path / "dup.xml", [twin]), 1400)
    all_files = files + [dup]
    filters = replace(KEEP_ALL, drop_duplicate_text=True)
    stats = build_snapshot([a for a, _ in all_files], [d for _, d in all_files], tmp_path / "out", filters)
    rows = snapshot_rows(tmp_path / "out")
    assert pmid_of(original) in rows and 99999999 not in rows
    assert {d["filter"]: d["rows"] for d in stats["dropped"]}["exact duplicate text"] >= 1


def test_no_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no parsed article files"):
        build_snapshot([], [], tmp_path)


def test_the_last_occurrence_in_a_file_wins_a_tie(parsed_samples, tmp_path):
    _, files = parsed_samples
    article = real_articles(BASELINE_SAMPLE)[5]
    first, last = copy.deepcopy(article), copy.deepcopy(article)
    first.find("MedlineCitation/Article/ArticleTitle").text = "The first record of the PMID in this file."
    last.find("MedlineCitation/Article/ArticleTitle").text = "The last record of the PMID in this file."
    twice = parse_into(tmp_path, write_update(tmp_path / "twice.xml", [first, last]), 1500)
    all_files = files + [twice]
    build_snapshot([a for a, _ in all_files], [d for _, d in all_files], tmp_path / "out", KEEP_ALL)
    assert snapshot_rows(tmp_path / "out")[pmid_of(article)]["title"] == "The last record of the PMID in this file."
