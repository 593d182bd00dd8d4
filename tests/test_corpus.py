"""Corpus snapshot: NLM's update rules and the filters, on parsed real PubMed files."""

from __future__ import annotations

import copy
import errno
import gzip
import json
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from lxml import etree

from conftest import BASELINE_SAMPLE, UPDATE_SAMPLE
import tasks.corpus as corpus_module
from storage import config_params
from storage.formats import corpus_parts, read_corpus
from tasks.corpus import CorpusConfig, Previous, build_snapshot
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
    return {row["pmid"]: row for row in read_corpus(out).to_pylist()}


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
        and (not filters.languages or set(filters.languages) & set(r["languages"]))
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


def _build_both_ways(files: list[tuple[Path, Path]], out: Path, previous: Previous | None, config: CorpusConfig) -> tuple[Path, Previous]:
    """Apply the newest file to the previous snapshot and build the same files from nothing;
    assert the two have the same documents in the same order, the same state and statistics,
    and, when the update was compacted into one part, the same bytes. Returns the incremental
    one, as the next previous."""
    articles, deletions = [a for a, _ in files], [d for _, d in files]
    build_snapshot(articles, deletions, out / "full", config)
    build_snapshot(articles, deletions, out / "incremental", config, previous=previous, max_parts=2)
    incremental, full = read_corpus(out / "incremental"), read_corpus(out / "full")
    assert incremental.equals(full), f"{out.name}: the documents differ"
    assert [p.path.name for p in corpus_parts(out / "full")] == ["part-0000.parquet"]
    same_bytes = ["pmids.parquet", "stats.json"] + (["part-0000.parquet"] if len(corpus_parts(out / "incremental")) == 1 else [])
    for name in same_bytes:
        assert (out / "incremental" / name).read_bytes() == (out / "full" / name).read_bytes(), f"{out.name}: {name} differs"
    return out / "incremental", Previous(out / "incremental", frozenset(articles))


@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "no-dedup"])
def test_an_incremental_snapshot_is_the_full_rebuild(parsed_samples, tmp_path, monkeypatch, dedup):
    """A series of update files made of real articles, each applied to the previous snapshot,
    against a full rebuild of the same files after every one. Small row groups, so the merge of
    the parts' rows crosses many of them; at most 2 parts, so the series both adds parts (linked,
    with rows removed) and compacts them into one."""
    monkeypatch.setattr(corpus_module, "ROW_GROUP_ROWS", 256)
    _, files = parsed_samples
    config = replace(CorpusConfig(), drop_duplicate_text=dedup)
    kept = sorted(snapshot_rows(_build_both_ways(files, tmp_path / "0", None, config)[0]))
    by_pmid = {pmid_of(a): a for a in real_articles(BASELINE_SAMPLE)}
    revised, original, deleted_same_file, deleted_earlier, retracted, excluded_later = (by_pmid[p] for p in kept[:6])
    config = replace(config, exclude_pmids=(pmid_of(excluded_later), 99999991))
    snapshot, previous = _build_both_ways(files, tmp_path / "1", None, config)

    def retitled(article, title: str, pmid: int | None = None):
        changed = copy.deepcopy(article)
        changed.find("MedlineCitation/Article/ArticleTitle").text = title
        if pmid is not None:
            changed.find("MedlineCitation/PMID").text = str(pmid)
        return changed

    twin = retitled(original, original.findtext("MedlineCitation/Article/ArticleTitle"), pmid=1)  # lower PMID, same text
    late_retraction = copy.deepcopy(retracted)
    types = late_retraction.find("MedlineCitation/Article/PublicationTypeList")
    etree.SubElement(types, "PublicationType", UI="D016441").text = "Retracted Publication"
    updates = [
        # A revision, a twin of a kept text under a lower PMID, a record deleted in its own file, an excluded PMID.
        (1400, [retitled(revised, "Revised once."), twin, deleted_same_file, retitled(excluded_later, "Revised too.")], [pmid_of(deleted_same_file)]),
        # Applied later but numbered before the baseline: its deletion precedes the record and does nothing.
        (10, [], [pmid_of(deleted_earlier)]),
        # The twin is deleted (the original keeps its text again), the retraction arrives, a deleted PMID comes back.
        (1401, [late_retraction, retitled(deleted_same_file, "Back again.")], [1]),
        # The revised record (from a file not in this delta) is deleted.
        (1402, [retitled(by_pmid[kept[7]], "Another revision.")], [pmid_of(revised)]),
    ]
    layouts = []
    for step, (seq, articles, deleted) in enumerate(updates, 2):
        xml = write_update(tmp_path / f"pubmed21n{seq:04d}.xml", articles, deleted)
        files = files + [parse_into(tmp_path, xml, seq)]
        before = {p.path.name: p.path.stat().st_ino for p in corpus_parts(previous.folder)}
        snapshot, previous = _build_both_ways(files, tmp_path / str(step), previous, config)
        parts = corpus_parts(snapshot)
        layouts.append([(p.path.name, len(p.removed)) for p in parts])
        if len(parts) > 1:  # the parts it kept are the previous snapshot's files, not copies
            assert all(p.path.stat().st_ino == before[p.path.name] for p in parts[:-1])
        if step == 2 and dedup:
            rows = snapshot_rows(snapshot)
            assert 1 in rows and pmid_of(original) not in rows  # the lower PMID took the text
    assert any(len(layout) > 1 and any(removed for _, removed in layout) for layout in layouts), layouts
    assert any(len(layout) == 1 for layout in layouts[1:]), layouts  # compacted after growing

    rows = snapshot_rows(snapshot)
    assert pmid_of(original) in rows and 1 not in rows
    assert pmid_of(revised) not in rows and pmid_of(retracted) not in rows and pmid_of(excluded_later) not in rows
    assert rows[pmid_of(deleted_same_file)]["title"] == "Back again." and pmid_of(deleted_earlier) in rows
    assert rows[kept[7]]["title"] == "Another revision."
    stats = json.loads((snapshot / "stats.json").read_text())
    assert {d["filter"]: d["rows"] for d in stats["dropped"]}["PMID on the exclusion list (2 PMIDs)"] == 1


def test_an_update_copies_the_parts_where_links_fail_and_compacts_once_most_rows_are_new(parsed_samples, tmp_path, monkeypatch):
    _, files = parsed_samples
    articles, deletions = [a for a, _ in files], [d for _, d in files]
    build_snapshot(articles, deletions, tmp_path / "full")
    build_snapshot(articles[:1], deletions[:1], tmp_path / "first")
    previous = Previous(tmp_path / "first", frozenset(articles[:1]))

    def no_links(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(target))

    with monkeypatch.context() as patch:
        patch.setattr(corpus_module.os, "link", no_links)
        build_snapshot(articles, deletions, tmp_path / "copied", previous=previous, compact_fraction=1.0)
    old, kept = tmp_path / "first/part-0000.parquet", tmp_path / "copied/part-0000.parquet"
    assert kept.read_bytes() == old.read_bytes() and kept.stat().st_ino != old.stat().st_ino
    assert len(corpus_parts(tmp_path / "copied")) == 2
    assert read_corpus(tmp_path / "copied").equals(read_corpus(tmp_path / "full"))

    # The update brings 1,281 of the 1,876 documents: past the default fraction, one part again.
    build_snapshot(articles, deletions, tmp_path / "compacted", previous=previous)
    assert [p.path.name for p in corpus_parts(tmp_path / "compacted")] == ["part-0000.parquet"]
    assert (tmp_path / "compacted/part-0000.parquet").read_bytes() == (tmp_path / "full/part-0000.parquet").read_bytes()


def test_excluded_pmids_are_dropped_counted_and_keyed_by_content(parsed_samples, tmp_path):
    _, files = parsed_samples
    articles, deletions = [a for a, _ in files], [d for _, d in files]
    build_snapshot(articles, deletions, tmp_path / "all", KEEP_ALL)
    everything = snapshot_rows(tmp_path / "all")
    clean_from = sorted(everything)[:3]
    listed = tmp_path / "pubmedqa-test-pmids.txt"
    listed.write_text("# PubMedQA test PMIDs\n" + "\n".join(map(str, clean_from[1:])) + "\n\n")
    config = replace(KEEP_ALL, exclude_pmids=(clean_from[0],), exclude_pmids_file=str(listed))
    stats = build_snapshot(articles, deletions, tmp_path / "clean", config)
    assert set(everything) - set(snapshot_rows(tmp_path / "clean")) == set(clean_from)
    assert stats["dropped"][0] == {"filter": "PMID on the exclusion list (3 PMIDs)", "rows": 3}

    # The file's PMIDs decide the key, not its path or layout; another list is another snapshot.
    elsewhere = tmp_path / "copy.txt"
    elsewhere.write_text("\n".join(map(str, reversed(clean_from[1:]))))
    assert config_params(config) == config_params(replace(config, exclude_pmids_file=str(elsewhere)))
    elsewhere.write_text(str(clean_from[1]))
    assert config_params(config) != config_params(replace(config, exclude_pmids_file=str(elsewhere)))

    elsewhere.write_text("31688362\nPMID:123\n")
    elsewhere.write_bytes(b"31688362\nPMID:123 secret\n\xff\n")
    with pytest.raises(ValueError) as e:
        config_params(replace(config, exclude_pmids_file=str(elsewhere)))
    assert str(e.value) == f"exclude_pmids_file {elsewhere}, line 2: not a PMID; expected one PMID (ASCII digits) per line, blank lines and # comments"
    with pytest.raises(ValueError, match=r"no-such.txt does not exist"):  # refused where the value enters
        replace(config, exclude_pmids_file=str(tmp_path / "no-such.txt"))


def test_memory_limit_must_be_a_size():
    assert CorpusConfig(memory_limit="512MiB").memory_limit == "512MiB"
    with pytest.raises(ValueError, match="memory_limit '4 gigs' is not a size: expected a number and a unit, such as '4GB'"):
        CorpusConfig(memory_limit="4 gigs")
