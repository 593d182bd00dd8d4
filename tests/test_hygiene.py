"""The hygiene stage on real PubMed records: evaluation items planted in a mirror file are removed
and the evaluation's contamination check then finds none; near-duplicates keep the newest; an
article in another language with an English abstract stays; every rule off is the corpus as it
was; a cleaning built from the previous one is the full rebuild, byte for byte."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lxml import etree

from conftest import BASELINE_SAMPLE, DATA, UPDATE_SAMPLE, build_corpus
from storage.formats import CorpusPart, corpus_parts, corpus_tables, read_corpus, read_records, write_corpus_parts
from tasks.corpus import STATE_FILE as CORPUS_STATE_FILE
from tasks.corpus import STATS_FILE, CorpusConfig, build_snapshot
from tasks.evaluate.contamination import contamination
from tasks.hygiene import (
    HYGIENE,
    NEAR_DUPLICATE,
    REPORT_JSON,
    STATE_FILE,
    HygieneConfig,
    Screen,
    band_keys,
    clean_snapshot,
    jaccard,
    previous_cleaning,
    shingles,
    stripped,
)
from tasks.parse import parse_xml_file
from tasks.qa import QA, QAConfig

ALL_OFF = HygieneConfig(
    evaluation_pmids=False, evaluation_ngrams=False, strip_notices=False, strip_copyright=False,
    drop_placeholders=False, abstract_languages=(), near_duplicates=False,
)
NOTICE = "[This corrects the article DOI: 10.1002/jcp.29000.]"
COPYRIGHT = "© 2021 Elsevier Ltd. All rights reserved."
SPANISH = (
    "Se estudiaron ciento veinte pacientes con insuficiencia cardiaca cronica en un hospital universitario durante dos años. "
    "La mortalidad fue mayor en los pacientes con diabetes y con enfermedad renal cronica. Los resultados sugieren que el "
    "control de la glucosa y de la presion arterial mejora el pronostico de estos pacientes de forma significativa."
)


def real_articles(xml_gz: Path) -> list:
    with gzip.open(xml_gz) as f:
        root = etree.parse(f, etree.XMLParser(resolve_entities=False, load_dtd=False, no_network=True)).getroot()
    return root.findall("PubmedArticle")


def article(template, pmid: int, *, title: str | None = None, abstract: str | None = None, language: str | None = None):
    """A copy of a real article element with another PMID (and title, abstract, language)."""
    element = copy.deepcopy(template)
    element.find("MedlineCitation/PMID").text = str(pmid)
    for id_ in element.findall("PubmedData/ArticleIdList/ArticleId"):
        if id_.get("IdType") == "pubmed":
            id_.text = str(pmid)
    art = element.find("MedlineCitation/Article")
    if title is not None:
        art.find("ArticleTitle").text = title
    if abstract is not None:
        box = art.find("Abstract")
        for old in box.findall("AbstractText"):
            box.remove(old)
        etree.SubElement(box, "AbstractText").text = abstract
        box.insert(0, box[-1])
    if language is not None:
        for old in art.findall("Language"):
            old.text = language
    return element


def write_file(path: Path, articles: list, deleted: list[int] = ()) -> Path:
    """An NCBI file (gzipped, with its .md5 sibling) of these article elements and deletions."""
    root = etree.Element("PubmedArticleSet")
    root.extend(articles)
    if deleted:
        deletion = etree.SubElement(root, "DeleteCitation")
        for pmid in deleted:
            etree.SubElement(deletion, "PMID", Version="1").text = str(pmid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(etree.tostring(root, xml_declaration=True, encoding="utf-8"), mtime=0))
    path.with_name(path.name + ".md5").write_text(f"MD5({path.name})= {hashlib.md5(path.read_bytes()).hexdigest()}\n")
    return path


def abstract_of(element) -> str:
    return " ".join("".join(t.itertext()) for t in element.findall("MedlineCitation/Article/Abstract/AbstractText"))


@pytest.fixture(scope="module")
def templates():
    """Real articles of the update sample with an abstract of 150 words or more, in English, not retracted."""
    found = [
        a for a in real_articles(UPDATE_SAMPLE)
        if len(abstract_of(a).split()) >= 150 and a.findtext("MedlineCitation/Article/Language") == "eng"
        and not any("Retract" in (t.text or "") for t in a.iter("PublicationType"))
    ]
    assert len(found) >= 20
    return found


@pytest.fixture(scope="module")
def pubmedqa_item():
    raw = json.loads((DATA / "pubmedqa" / "ori_pqal.json").read_text())
    pmid = next(iter(raw))
    return int(pmid), raw[pmid]


@pytest.fixture(scope="module")
def medqa_question():
    return json.loads((DATA / "medqa" / "US_test.jsonl").read_text().splitlines()[0])["question"]


@pytest.fixture
def planted(tmp_path, templates, pubmedqa_item, medqa_question):
    """A mirror: the real baseline sample, and an update file of real articles with planted
    evaluation items, a near-duplicate pair, boilerplate and a Spanish abstract."""
    pmid, item = pubmedqa_item
    older, newer = 90_000_001, 90_000_002
    original = abstract_of(templates[2]).split()
    edited = " ".join(w.upper() if i % 40 == 7 else w for i, w in enumerate(original))  # ~2.5% of the words changed
    plants = {
        "pubmedqa": article(templates[0], pmid, title=item["QUESTION"], abstract=" ".join(item["CONTEXTS"])),
        "medqa": article(templates[1], 90_000_000, abstract=abstract_of(templates[1]) + " " + medqa_question),
        "older": article(templates[2], older, abstract=" ".join(original)),
        "newer": article(templates[2], newer, abstract=edited),
        "boilerplate": article(templates[3], 90_000_003, abstract=abstract_of(templates[3]) + " " + NOTICE + " " + COPYRIGHT),
        "spanish": article(templates[4], 90_000_004, abstract=SPANISH, language="spa"),
    }
    mirror = tmp_path / "mirror"
    (mirror / "baseline").mkdir(parents=True)
    for name in (BASELINE_SAMPLE.name, BASELINE_SAMPLE.name + ".md5"):
        shutil.copy(BASELINE_SAMPLE.parent / name, mirror / "baseline" / name)
    write_file(mirror / "updatefiles" / "pubmed21n1300.xml.gz", list(plants.values()))
    return mirror, {name: int(a.findtext("MedlineCitation/PMID")) for name, a in plants.items()}


def qa_artifacts(store):
    return [QA.run(store, {}, QAConfig(source=str(DATA / "pubmedqa"))), QA.run(store, {}, QAConfig(source=str(DATA / "medqa")))]


def test_planted_evaluation_items_are_removed_and_the_evaluation_then_finds_no_overlap(store, planted):
    mirror, pmids = planted
    corpus = build_corpus(store, CorpusConfig(), mirror)
    qa = qa_artifacts(store)
    records = [r for a in qa for r in read_records(a.path)]
    before = contamination(records, corpus.path)
    assert before[f"pubmedqa:{pmids['pubmedqa']}"] == "PMID in the corpus"
    assert any(why.startswith("13-gram") for why in before.values())

    cleaned = HYGIENE.run(store, {"corpus": corpus, "qa": qa}, HygieneConfig())
    assert set(cleaned.parents) == {corpus.ref, *(a.ref for a in qa)}  # the QA data are lineage parents
    kept = set(read_corpus(cleaned.path, ["pmid"]).column("pmid").to_pylist())
    assert pmids["pubmedqa"] not in kept and pmids["medqa"] not in kept
    assert contamination(records, cleaned.path) == {}  # the evaluation's column reads 0
    report = json.loads(cleaned.file(REPORT_JSON).read_text())
    by_rule = {r["rule"]: r for r in report["rules"]}
    assert by_rule["evaluation PMID"]["documents"] == 1 and by_rule["evaluation 13-gram"]["documents"] == 1
    assert report["examples"]["evaluation PMID"][0]["pmid"] == pmids["pubmedqa"]

    # Decontamination off: the items stay, and the evaluation counts them (and scores without them).
    kept_in = HYGIENE.run(store, {"corpus": corpus, "qa": qa}, HygieneConfig(evaluation_pmids=False, evaluation_ngrams=False))
    assert contamination(records, kept_in.path) == before


def test_near_duplicates_keep_the_newest_boilerplate_is_stripped_and_an_english_abstract_of_a_spanish_article_stays(store, planted):
    mirror, pmids = planted
    corpus = build_corpus(store, CorpusConfig(), mirror)
    cleaned = HYGIENE.run(store, {"corpus": corpus}, HygieneConfig())
    rows = {r["pmid"]: r for r in read_corpus(cleaned.path).to_pylist()}
    assert pmids["older"] not in rows and pmids["newer"] in rows
    assert pmids["spanish"] not in rows  # an abstract in Spanish goes
    # Real articles MEDLINE lists in another language, whose abstracts are English, stay.
    others = [r for r in read_corpus(corpus.path).to_pylist() if "eng" not in r["languages"]]
    assert len(others) > 100 and all(r["pmid"] in rows for r in others if r["pmid"] != pmids["spanish"])
    text = rows[pmids["boilerplate"]]["text"]
    assert NOTICE not in text and "Elsevier" not in text and text.endswith(".")
    report = json.loads(cleaned.file(REPORT_JSON).read_text())
    assert [(e["pmid"], e["duplicate_of"]) for e in report["examples"]["near-duplicate"]] == [(pmids["older"], pmids["newer"])]
    strips = {r["rule"]: r for r in report["strips"]}
    assert strips["correction notice"]["documents"] >= 1 and strips["copyright line"]["documents"] >= 1
    assert {"pmid": pmids["boilerplate"], "text": COPYRIGHT} in report["examples"]["copyright line"]
    assert report["kept_articles_not_english_in_medline"] == len(others) - 1
    assert report["after"]["documents"] == len(rows) == report["before"]["documents"] - sum(r["documents"] for r in report["rules"])


def test_every_rule_off_gives_the_corpus_as_it_was(store, planted):
    mirror, _ = planted
    corpus = build_corpus(store, CorpusConfig(), mirror)
    cleaned = HYGIENE.run(store, {"corpus": corpus, "qa": qa_artifacts(store)}, ALL_OFF)
    assert read_corpus(cleaned.path).equals(read_corpus(corpus.path))
    assert (cleaned.path / "part-0000.parquet").read_bytes() == (corpus.path / "part-0000.parquet").read_bytes()


def test_strips_take_only_boilerplate():
    config = HygieneConfig()
    text = "A title\n\nBackground. Results were clear (c) in part. Copyright holders were asked. " + NOTICE + " " + COPYRIGHT
    cleaned, taken, words = stripped(text, config)
    assert cleaned == "A title\n\nBackground. Results were clear (c) in part. Copyright holders were asked."
    assert taken[0].strip() == NOTICE and taken[1].strip() == COPYRIGHT
    assert words == [len(NOTICE.split()), len(COPYRIGHT.split())]


def test_near_duplicates_agree_with_exact_jaccard(templates):
    """Planted near-duplicates of real abstracts (words edited at several rates, sentences
    reordered, the title changed) beside unrelated real abstracts: the pairs the stage's rule
    finds (shared band, then exact Jaccard) against every pair's exact Jaccard."""
    config, rng = HygieneConfig(), random.Random(0)
    documents = []
    for template in templates[:20]:
        title, text = template.findtext("MedlineCitation/Article/ArticleTitle"), abstract_of(template)
        documents.append(title + "\n\n" + text)
        for rate in (0.01, 0.03, 0.06, 0.1, 0.2):
            words = text.split()
            edited = [w if rng.random() > rate else rng.choice(["patients", "the", "significantly", "cells"]) for w in words]
            documents.append(title + "\n\n" + " ".join(edited))
        sentences = text.split(". ")
        documents.append(title + "\n\n" + ". ".join(sentences[1:] + sentences[:1]))
        documents.append("A different title for the same study\n\n" + text)
    grams = [shingles(d, config.shingle_words) for d in documents]
    keys = [set(band_keys(g, config.minhash_bands, config.minhash_rows)) for g in grams]
    truth, found = set(), set()
    for i in range(len(documents)):
        for j in range(i + 1, len(documents)):
            similar = jaccard(grams[i], grams[j]) >= config.near_duplicate_threshold
            if similar:
                truth.add((i, j))
            if keys[i] & keys[j] and similar:
                found.add((i, j))
    assert len(truth) >= 100
    precision, recall = len(found & truth) / len(found), len(found & truth) / len(truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)


def nights(tmp_path, templates) -> list[list[tuple[Path, Path]]]:
    """Parsed files of three nights: the baseline sample; then the update sample and a file with
    a near-duplicate of a baseline article, a revised article and a deletion; then a file
    deleting the near-duplicate again (its older twin comes back)."""
    base = real_articles(BASELINE_SAMPLE)
    twin = next(a for a in base if len(abstract_of(a).split()) >= 120)
    revised = next(a for a in base if len(abstract_of(a).split()) >= 120 and a is not twin)
    gone = [a for a in base if abstract_of(a)][5]

    def parse(xml: Path, seq: int) -> tuple[Path, Path]:
        out = tmp_path / f"parsed-{seq}"
        parse_xml_file(xml, out, source_file=xml.name, file_seq=seq)
        return out / "articles.parquet", out / "deletions.parquet"

    first = [parse(BASELINE_SAMPLE, 14)]
    duplicate = article(twin, 95_000_000, title="[A reprint] " + twin.findtext("MedlineCitation/Article/ArticleTitle"))
    changed = article(revised, int(revised.findtext("MedlineCitation/PMID")), abstract=abstract_of(revised) + " " + COPYRIGHT)
    second = first + [parse(UPDATE_SAMPLE, 1298), parse(write_file(tmp_path / "pubmed21n1300.xml.gz", [duplicate, changed], [int(gone.findtext("MedlineCitation/PMID"))]), 1300)]
    third = second + [parse(write_file(tmp_path / "pubmed21n1301.xml.gz", [], [95_000_000]), 1301)]
    return [first, second, third]


def test_a_cleaning_built_from_the_previous_one_is_the_full_rebuild(tmp_path, templates, pubmedqa_item):
    config = HygieneConfig()
    screen = Screen.of([{"id": f"pubmedqa:{pubmedqa_item[0]}", "source": "pubmedqa", "question": pubmedqa_item[1]["QUESTION"],
                         "context": pubmedqa_item[1]["CONTEXTS"], "options": ["yes", "no", "maybe"]}], config)
    previous, last = None, set()
    for night, files in enumerate(nights(tmp_path, templates)):
        corpus = tmp_path / f"corpus-{night}"
        build_snapshot([a for a, _ in files], [d for _, d in files], corpus, CorpusConfig())
        full, incremental = tmp_path / f"full-{night}", tmp_path / f"incremental-{night}"
        clean_snapshot(corpus, full, config, screen)
        summary = clean_snapshot(corpus, incremental, config, screen, previous=previous)
        assert sorted(p.name for p in full.iterdir()) == sorted(p.name for p in incremental.iterdir())
        for path in full.iterdir():
            assert path.read_bytes() == (incremental / path.name).read_bytes(), (night, path.name)
        documents = set(map(tuple, read_corpus(corpus, ["pmid", "text"]).to_pandas().itertuples(index=False)))
        if previous is not None:
            assert summary["judged"] == len(documents - last)  # only what is new or changed was judged
        last = documents
        removed = {r["pmid"]: r["removed_by"] for r in read_state(full) if r["removed_by"]}
        twin_kept = 95_000_000 in {r["pmid"] for r in read_corpus(full, ["pmid"]).to_pylist()}
        if night == 1:
            assert twin_kept and NEAR_DUPLICATE in removed.values()  # the newer copy keeps, the older goes
        if night == 2:
            assert not twin_kept and NEAR_DUPLICATE not in removed.values()  # deleted: its older twin is back
        previous = incremental


def read_state(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(folder / STATE_FILE).to_pylist()


def test_a_new_snapshot_finds_the_previous_cleaning_to_start_from(store, planted):
    mirror, _ = planted
    qa = qa_artifacts(store)
    first = build_corpus(store, CorpusConfig(min_abstract_chars=300), mirror)
    cleaned = HYGIENE.run(store, {"corpus": first, "qa": qa}, HygieneConfig())
    second = build_corpus(store, CorpusConfig(), mirror)
    assert previous_cleaning(store, {"corpus": second, "qa": qa}, HygieneConfig()).ref == cleaned.ref
    assert previous_cleaning(store, {"corpus": second, "qa": qa[:1]}, HygieneConfig()) is None  # other QA items
    assert previous_cleaning(store, {"corpus": second, "qa": qa}, replace(HygieneConfig(), min_abstract_words=5)) is None
    again = HYGIENE.run(store, {"corpus": second, "qa": qa, "previous": cleaned}, HygieneConfig())
    assert again.summary["previous"] == cleaned.ref and cleaned.ref not in again.parents


def snapshot_in_row_groups(tmp_path: Path, documents: int, rows_per_group: int) -> Path:
    """The first ``documents`` of the snapshot of both samples, as one part in row groups of ``rows_per_group``."""
    files = []
    for xml, seq in ((BASELINE_SAMPLE, 14), (UPDATE_SAMPLE, 1298)):
        parse_xml_file(xml, tmp_path / f"parsed-{seq}", source_file=xml.name, file_seq=seq)
        files.append(tmp_path / f"parsed-{seq}")
    whole, folder = tmp_path / "whole", tmp_path / f"snapshot-{documents}"
    if not whole.exists():
        build_snapshot([f / "articles.parquet" for f in files], [f / "deletions.parquet" for f in files], whole, CorpusConfig())
    folder.mkdir()
    for name in (CORPUS_STATE_FILE, STATS_FILE):  # the PMIDs' state and the statistics, of the whole
        shutil.copy(whole / name, folder / name)
    part = folder / corpus_parts(whole)[0].path.name
    pq.write_table(read_corpus(whole).slice(0, documents), part, row_group_size=rows_per_group, compression="zstd")
    write_corpus_parts(folder, [CorpusPart(part, documents, np.zeros(0, dtype=np.int64))])
    return folder


def test_reading_a_snapshot_holds_a_few_batches_however_many_row_groups_it_has(tmp_path):
    """Arrow's bytes held while a snapshot is read (each table let go before the next) are a few
    batches' worth, as many with 20 row groups read as with 2 (a reader pre-buffering row groups
    keeps all it has read: 10.8 batches' worth after 20 of them, 4.8 after 2)."""

    def held_in_batches(documents: int) -> float:
        folder = snapshot_in_row_groups(tmp_path, documents, rows_per_group=100)
        before, held, largest = pa.total_allocated_bytes(), 0, 0
        for table in corpus_tables(folder, batch_rows=100):
            held, largest = max(held, pa.total_allocated_bytes() - before), max(largest, table.nbytes)
        return held / largest

    two, twenty = held_in_batches(200), held_in_batches(2_000)
    assert twenty <= two + 1, (two, twenty)


def test_a_memory_too_small_for_the_documents_is_refused_naming_the_setting(tmp_path):
    corpus = snapshot_in_row_groups(tmp_path, 1_000, rows_per_group=1_000)
    config = replace(ALL_OFF, join_memory="100MB")  # 50 MB beside DuckDB's; a 50,000-document row group of these takes ~85 MB
    with pytest.raises(ValueError, match=r"join_memory '100MB' leaves 50 MB .* give join_memory at least"):
        clean_snapshot(corpus, tmp_path / "out", config, Screen.of([], config))
    clean_snapshot(corpus, tmp_path / "out", replace(config, join_memory="1GB"), Screen.of([], config))
    assert read_corpus(tmp_path / "out").equals(read_corpus(corpus))


def test_a_bad_language_code_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="ISO 639-1"):
        HygieneConfig(abstract_languages=("eng",))


@pytest.mark.slow  # starts a Dask cluster
def test_the_rules_give_the_same_bytes_in_worker_processes_and_on_a_dask_cluster(tmp_path, store, planted, monkeypatch):
    from distributed import Client, LocalCluster

    mirror, _ = planted
    corpus = build_corpus(store, CorpusConfig(), mirror)
    config = HygieneConfig(batch_documents=100)  # several batches, so they go to the workers
    screen = Screen.of(read_records(qa_artifacts(store)[0].path), config)
    clean_snapshot(corpus.path, tmp_path / "here", replace(config, processes=1), screen)
    clean_snapshot(corpus.path, tmp_path / "processes", replace(config, processes=2), screen)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        monkeypatch.setenv("MEDLM_DASK_ADDRESS", cluster.scheduler_address)
        clean_snapshot(corpus.path, tmp_path / "dask", config, screen)
        judged_on_workers = client.run(lambda: "tasks.hygiene" in __import__("sys").modules)
    assert all(judged_on_workers.values()), judged_on_workers
    for other in ("processes", "dask"):
        for path in (tmp_path / "here").iterdir():
            assert path.read_bytes() == (tmp_path / other / path.name).read_bytes(), (other, path.name)
