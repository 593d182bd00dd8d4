"""Parse stage: real NLM XML samples in, Parquet out.

Every expected value comes from the XML itself, read independently of ``tasks.parse``: from
INDEX.tsv (computed from the samples when they were made) and from a plain ElementPath reading
of each record here (``_reference``), which is slow and obvious where the parser is fast.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import hashlib
import html
import http.server
import pickle
import re
import threading
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from lxml import etree

import tasks.parse as parse_mod
from storage import Artifact, Store
from storage.lineage import lineage, tree_lines
from tasks.download import DOWNLOAD, RemoteFile, file_seq
from tasks.parse import ARTICLE_SCHEMA, DELETION_SCHEMA, PARSE, ParseConfig, ParseError, parse_xml_file

DATA = Path(__file__).parent / "data" / "pubmed"
BASELINE = DATA / "mirror" / "baseline" / "pubmed20n0014.xml.gz"
UPDATE = DATA / "mirror" / "updatefiles" / "pubmed21n1298.xml.gz"
FEATURES_2020 = DATA / "pubmed20n0014_features.xml"
FEATURES_2021 = DATA / "pubmed21n1298_features.xml"
LEGACY = DATA / "legacy" / "medline16n0902_sample.xml.gz"
EFETCH = DATA / "efetch"

# INDEX.tsv names the samples by their sample names; mirror/ holds the same bytes renamed.
SAMPLES = {
    "pubmed20n0014_sample.xml.gz": BASELINE,
    "pubmed21n1298_sample.xml.gz": UPDATE,
    "pubmed20n0014_features.xml": FEATURES_2020,
    "pubmed21n1298_features.xml": FEATURES_2021,
}
INLINE = {"i", "b", "u", "sup", "sub"}
MATHML = "{http://www.w3.org/1998/Math/MathML}"

# The 20 PMIDs of the update file's DeleteCitation, in file order.
DELETED = [
    31688362, 31764432, 31895213, 31895214, 31917726, 33268618, 33268619, 33325556, 33370518, 33378316,
    33417394, 33538040, 33667199, 33759239, 33814563, 33913214, 33982926, 34059851, 34081395, 34096142,
]


# -- helpers ------------------------------------------------------------------------------------


def _parse(path: Path, out: Path, **kw) -> tuple[dict, list[dict], list[dict]]:
    kw.setdefault("source_file", path.name)
    kw.setdefault("file_seq", 7)
    summary = parse_xml_file(path, out, **kw)
    articles = pq.read_table(out / "articles.parquet")
    deletions = pq.read_table(out / "deletions.parquet")
    assert articles.schema.equals(ARTICLE_SCHEMA)
    assert deletions.schema.equals(DELETION_SCHEMA)
    return summary, articles.to_pylist(), deletions.to_pylist()


def _records(path: Path) -> list[etree._Element]:
    """The PubmedArticle elements of a sample, read with a plain lxml parse (no DTD, no network)."""
    parser = etree.XMLParser(load_dtd=False, resolve_entities=False, no_network=True)
    with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as f:
        return etree.parse(f, parser).getroot().findall("PubmedArticle")


def _tag_stripped(el: etree._Element | None) -> str | None:
    """Text of an element by deleting every tag from its serialisation: an implementation that
    shares nothing with itertext. Tags glue what they separate, exactly as in the source."""
    if el is None:
        return None
    xml = etree.tostring(el, encoding="unicode", with_tail=False)
    text = html.unescape(re.sub(r"<[^>]+>", "", xml))
    return re.sub(r"[ \t\r\n]+", " ", text).strip(" ")


def _reference(rec: etree._Element) -> dict:
    """What one article row must hold, from find/findall on the documented paths."""
    mc = rec.find("MedlineCitation")
    art = mc.find("Article")
    pmid = mc.find("PMID")
    sections = [
        {"label": at.get("Label"), "nlm_category": at.get("NlmCategory"), "text": _tag_stripped(at)}
        for at in art.findall("Abstract/AbstractText")
    ]
    parts = [s["label"] + ": " + s["text"] if s["label"] and s["text"] else s["label"] or s["text"] for s in sections]
    year = mc.findtext("Article/Journal/JournalIssue/PubDate/Year")
    if year is None:
        medline_date = mc.findtext("Article/Journal/JournalIssue/PubDate/MedlineDate")
        year = re.search(r"\d{4}", medline_date).group() if medline_date else None
    revised = mc.find("DateRevised")
    return {
        "pmid": int(pmid.text),
        "version": int(pmid.get("Version", "1")),
        "title": _tag_stripped(art.find("ArticleTitle")) or "",
        "vernacular_title": _tag_stripped(art.find("VernacularTitle")),
        "abstract": "\n".join(parts) if parts else None,
        "abstract_sections": sections,
        "languages": [e.text for e in art.findall("Language")],
        "journal": art.findtext("Journal/Title"),
        "pub_year": int(year) if year else None,
        "mesh_terms": [e.text for e in mc.findall("MeshHeadingList/MeshHeading/DescriptorName")],
        "publication_types": [e.text for e in art.findall("PublicationTypeList/PublicationType")],
        "status": mc.get("Status"),
        "date_revised": dt.date(*(int(revised.findtext(k)) for k in ("Year", "Month", "Day"))) if revised is not None else None,
    }


def _inline_markup(rec: etree._Element) -> set[str]:
    """INDEX.tsv's inline_markup: the markup tags inside ArticleTitle and AbstractText (mml: for
    MathML); the same tags elsewhere (CoiStatement, references) are not counted there."""
    found = set()
    for el in [*rec.iterfind("MedlineCitation/Article/ArticleTitle//*"), *rec.iterfind("MedlineCitation/Article/Abstract/AbstractText//*")]:
        if el.tag in INLINE:
            found.add(el.tag)
        elif el.tag.startswith(MATHML):
            found.add("mml:" + el.tag[len(MATHML):])
    return found


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> dict[str, tuple[dict, list[dict], list[dict]]]:
    """Each of the four samples parsed once, keyed by its INDEX.tsv name."""
    return {name: _parse(path, tmp_path_factory.mktemp(name.split(".")[0]), source_file=name) for name, path in SAMPLES.items()}


def _by_pmid(rows: list[dict], pmid: int) -> dict:
    [row] = [r for r in rows if r["pmid"] == pmid]
    return row


# -- file names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, seq",
    [("pubmed25n1275.xml.gz", 1275), ("pubmed20n0014.xml.gz", 14), ("pubmed26n0001.xml.gz", 1)],
)
def test_file_seq_from_name(name, seq):
    assert file_seq(name) == seq


@pytest.mark.parametrize(
    "name",
    ["pubmed20n0014_sample.xml.gz", "pubmed20n014.xml.gz", "medline16n0902.xml.gz", "pubmed25n1275.xml.gz.md5", "x.xml", ""],
)
def test_file_seq_rejects_other_names(name):
    with pytest.raises(ValueError, match="pubmedYYnNNNN"):
        file_seq(name)


# -- the samples against INDEX.tsv and the reference reading ----------------------------------------


def test_every_index_row(parsed):
    with open(DATA / "INDEX.tsv", newline="") as f:
        index = list(csv.DictReader(f, delimiter="\t"))
    for name, path in SAMPLES.items():
        expected = [r for r in index if r["file"] == name]
        summary, rows, _ = parsed[name]
        assert summary["articles"] == len(rows) == len(expected), name
        records = _records(path)
        assert len(records) == len(rows)
        for row, exp, rec in zip(rows, expected, records):
            where = f"{name} pmid {exp['pmid']}"
            assert row["pmid"] == int(exp["pmid"]), where
            assert row["version"] == int(exp["pmid_version"]), where
            assert row["status"] == exp["status"], where
            assert ",".join(row["languages"]) == exp["languages"], where
            assert (row["abstract"] is not None) == (exp["has_abstract"] == "1"), where
            assert any(s["label"] for s in row["abstract_sections"]) == (exp["structured_abstract"] == "1"), where
            assert ("Retracted Publication" in row["publication_types"]) == (exp["retracted_publication"] == "1"), where
            assert ("Retraction of Publication" in row["publication_types"]) == (exp["retraction_of_publication"] == "1"), where
            assert (row["vernacular_title"] is not None) == (exp["vernacular_title"] == "1"), where
            assert bool(row["mesh_terms"]) == (exp["has_mesh"] == "1"), where
            assert row["source_file"] == name and row["file_seq"] == 7, where
            # inline_markup: the record is the one INDEX describes, and the text of each inline
            # element of its title and abstract is in the row
            markup = set(filter(None, exp["inline_markup"].split(",")))
            assert _inline_markup(rec) == markup, where
            text = row["title"] + "\n" + (row["abstract"] or "")
            for el in rec.iterfind("MedlineCitation/Article/ArticleTitle//*"):
                assert _tag_stripped(el) in text, where
            for el in rec.iterfind("MedlineCitation/Article/Abstract/AbstractText//*"):
                assert _tag_stripped(el) in text, where


def test_every_field_matches_a_plain_reading(parsed):
    for name, path in SAMPLES.items():
        _, rows, _ = parsed[name]
        for row, rec in zip(rows, _records(path)):
            expected = _reference(rec)
            got = {k: row[k] for k in expected}
            assert got == expected, f"{name} pmid {expected['pmid']}"


def test_batches_do_not_change_the_rows(tmp_path, parsed):
    summary, rows, deletions = _parse(UPDATE, tmp_path, source_file="pubmed21n1298_sample.xml.gz", batch_rows=64)
    assert pq.ParquetFile(tmp_path / "articles.parquet").metadata.num_row_groups == -(-1500 // 64)
    assert (summary, rows, deletions) == parsed["pubmed21n1298_sample.xml.gz"]
    meta = pq.ParquetFile(tmp_path / "articles.parquet").metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


# -- specific records ---------------------------------------------------------------------------


def test_structured_abstract_keeps_labels_as_written(parsed):
    _, rows, _ = parsed["pubmed21n1298_sample.xml.gz"]
    row = _by_pmid(rows, 10704411)
    assert row["abstract"].startswith("BACKGROUND: Drugs of abuse have a common property in mammals")
    assert "\nRESULTS: We present evidence that dopamine" in row["abstract"]
    assert "\nCONCLUSIONS: We show that in Drosophila" in row["abstract"]
    assert row["abstract"].count("\n") == 2
    first = row["abstract_sections"][0]
    assert first["label"] == first["nlm_category"] == "BACKGROUND"
    assert first["text"].startswith("Drugs of abuse") and not first["text"].startswith("BACKGROUND")

    _, rows, _ = parsed["pubmed21n1298_features.xml"]
    row = _by_pmid(rows, 34094858)  # Label="Results" NlmCategory="UNASSIGNED": kept as written
    assert "\nResults: Excellent intra-rater and intra-operator (ICC (3,1)≥0.973)" in row["abstract"]
    assert {"label": "Results", "nlm_category": "UNASSIGNED"}.items() <= row["abstract_sections"][2].items()


def test_inline_markup_text_is_kept_without_gluing_words(parsed):
    _, rows, _ = parsed["pubmed21n1298_features.xml"]
    # <i>in vitro</i> activities against <i>Plasmodium falciparum</i>
    assert "with proven in vitro activities against Plasmodium falciparum. In order" in _by_pmid(rows, 34095565)["abstract"]
    # MathML in a title: <mml:msub><mml:mi>T</mml:mi> <mml:mn>1</mml:mn></mml:msub> ...
    assert _by_pmid(rows, 33780037)["title"] == "Free-breathing simultaneous T 1 , T 2 , and T 2 ∗ quantification in the myocardium."
    # MathML with no space between tokens is one symbol: Ca<msup><mi/><mrow><mn>2</mn><mo>+</mo>...
    abstract = _by_pmid(rows, 34092205)["abstract"]
    assert "two-compartment Ca2+ signalling in gonadotrophs" in abstract
    assert "with regard to [IP3] is analysed" in abstract
    # <sub>/<sup>: CeO<sub>2</sub> (111)-( <mml:math><mml:msqrt><mml:mn>3</mml:mn>...
    row = _by_pmid(rows, 33826220)
    assert row["title"] == "Ce=O Terminated CeO2."
    assert "a CeO2 (111)-( 3 × 3 )R30° reconstruction" in row["abstract"]
    # no tag text or markup left anywhere in title or abstract
    for row in rows:
        for text in (row["title"], row["abstract"] or ""):
            assert "mml:" not in text and "<sup>" not in text and "  " not in text and "\t" not in text


def test_whitespace_is_normalised_but_unicode_spaces_kept(tmp_path):
    xml = tmp_path / "pretty.xml"
    xml.write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<PubmedArticleSet>\n<PubmedArticle><MedlineCitation Status="MEDLINE">'
        '<PMID Version="2">1</PMID><Article><ArticleTitle>\n   A\ttitle  <i>in</i>  <b>bold</b>\n</ArticleTitle>'
        "<Abstract><AbstractText>Map of\n"
        '  <mml:math xmlns:mml="http://www.w3.org/1998/Math/MathML">\n'
        "    <mml:msubsup>\n      <mml:mi>T</mml:mi>\n      <mml:mn>2</mml:mn>\n      <mml:mo>∗</mml:mo>\n    </mml:msubsup>\n"
        "  </mml:math>\n  at 6\u00a0weeks, r\u2009=\u20090.7.</AbstractText>"
        '<AbstractText Label="EMPTY" NlmCategory="UNASSIGNED"/>'
        "<CopyrightInformation>© Nobody</CopyrightInformation></Abstract>"
        "</Article></MedlineCitation></PubmedArticle>\n</PubmedArticleSet>\n",
        encoding="utf-8",
    )
    _, [row], _ = _parse(xml, tmp_path / "out")
    assert row["title"] == "A title in bold"
    assert row["version"] == 2
    assert row["abstract"] == "Map of T 2 ∗ at 6\u00a0weeks, r\u2009=\u20090.7.\nEMPTY"  # an empty section: its label
    assert row["abstract_sections"][1] == {"label": "EMPTY", "nlm_category": "UNASSIGNED", "text": ""}
    assert row["languages"] == row["mesh_terms"] == row["publication_types"] == []
    assert row["journal"] is None and row["pub_year"] is None and row["date_revised"] is None


def test_copyright_and_other_abstract_are_not_abstract_text(parsed):
    for name in ("pubmed20n0014_features.xml", "pubmed21n1298_features.xml"):
        _, rows, _ = parsed[name]
        by_pmid = {r["pmid"]: r for r in rows}
        copyrights = others = 0
        for rec in _records(SAMPLES[name]):
            row = by_pmid[int(rec.findtext("MedlineCitation/PMID"))]
            for cp in rec.iterfind("MedlineCitation/Article/Abstract/CopyrightInformation"):
                copyrights += 1
                assert _tag_stripped(cp) not in (row["abstract"] or ""), row["pmid"]
            for other in rec.iterfind("MedlineCitation/OtherAbstract"):
                others += 1
                first = _tag_stripped(other.find("AbstractText"))
                assert first[:60] not in (row["abstract"] or ""), row["pmid"]
        assert others >= 1
    assert copyrights >= 50
    row = _by_pmid(parsed["pubmed21n1298_features.xml"][1], 31993508)
    assert "The Author(s) 2020" not in row["abstract"]


def test_pub_year_from_medline_date(parsed):
    _, rows, _ = parsed["pubmed20n0014_features.xml"]
    assert _by_pmid(rows, 402750)["pub_year"] == 1977  # <MedlineDate>1977 Jan-Feb</MedlineDate>
    _, rows, _ = parsed["pubmed21n1298_features.xml"]
    assert _by_pmid(rows, 33957058)["pub_year"] == 2020  # <MedlineDate>2020 Sep-Oct</MedlineDate>


def test_other_fields_of_one_record(parsed):
    _, rows, _ = parsed["pubmed21n1298_sample.xml.gz"]
    row = _by_pmid(rows, 10704411)
    assert row["journal"] == "Current biology : CB"
    assert row["status"] == "MEDLINE"
    assert row["languages"] == ["eng"]
    assert row["date_revised"] == dt.date(2021, 6, 7)
    assert row["publication_types"][0] == "Journal Article"
    assert "Dopamine" in row["mesh_terms"] and "Drosophila" in row["mesh_terms"]


def test_empty_article_title_keeps_vernacular(parsed):
    _, rows, _ = parsed["pubmed21n1298_features.xml"]
    row = _by_pmid(rows, 34086213)
    assert row["title"] == ""
    assert row["vernacular_title"] == "Von A bis B: Virale Hepatitiden."


def test_versioned_pmid_has_four_rows(parsed):
    for name in ("pubmed21n1298_sample.xml.gz", "pubmed21n1298_features.xml"):
        _, rows, _ = parsed[name]
        assert [r["version"] for r in rows if r["pmid"] == 30271887] == [1, 2, 3, 4]


def test_delete_citation(parsed):
    for name in ("pubmed21n1298_sample.xml.gz", "pubmed21n1298_features.xml"):
        summary, _, deletions = parsed[name]
        assert summary["deletions"] == 20
        assert [d["pmid"] for d in deletions] == DELETED
        assert {(d["version"], d["source_file"], d["file_seq"]) for d in deletions} == {(1, name, 7)}
    summary, _, deletions = parsed["pubmed20n0014_sample.xml.gz"]  # a baseline file: none, file still written
    assert summary == {
        "articles": 1500,
        "deletions": 0,
        "book_articles_skipped": 0,
        "source_file": "pubmed20n0014_sample.xml.gz",
        "file_seq": 7,
    }
    assert deletions == []


@pytest.mark.parametrize(
    "name, count",
    [
        ("pubmed-29768149.xml", 1),
        ("test_current_medline.xml.gz", 4),
        ("pmid_32461654.xml", 1),
        ("pmid_33073003.xml", 1),
        ("biopython_pubmed1.xml", 2),
        ("biopython_pubmed2.xml", 2),
    ],
)
def test_efetch_files(tmp_path, name, count):
    """One-article-per-line layout, DTDs 2019-2025, `<?xml version="1.0" ?>`, numeric entities."""
    path = EFETCH / name
    summary, rows, deletions = _parse(path, tmp_path)
    assert summary["articles"] == len(rows) == count and deletions == []
    for row, rec in zip(rows, _records(path)):
        assert {k: row[k] for k in _reference(rec)} == _reference(rec)
        for text in (row["title"], row["abstract"] or ""):
            assert not re.search(r"&#x?[0-9a-fA-F]+;", text)
    if name == "test_current_medline.xml.gz":
        assert [r["pmid"] for r in rows] == [36400559, 2930949, 11446611, 28786991]
        assert "for greater than 6\u00a0weeks" in rows[0]["abstract"]  # &#xa0; decoded


def test_book_articles_are_counted_and_skipped(tmp_path):
    xml = tmp_path / "books.xml"
    xml.write_text(
        "<PubmedArticleSet><PubmedBookArticle><BookDocument><PMID Version=\"1\">20301295</PMID>"
        "<ArticleTitle>A chapter</ArticleTitle><Abstract><AbstractText>Book text.</AbstractText></Abstract>"
        "</BookDocument></PubmedBookArticle>"
        '<PubmedArticle><MedlineCitation Status="MEDLINE"><PMID Version="1">5</PMID><Article>'
        "<ArticleTitle>Real</ArticleTitle><Language>eng</Language></Article></MedlineCitation></PubmedArticle>"
        "</PubmedArticleSet>"
    )
    summary, rows, _ = _parse(xml, tmp_path / "out")
    assert summary["book_articles_skipped"] == 1 and summary["articles"] == 1
    assert [(r["pmid"], r["title"], r["abstract"], r["languages"]) for r in rows] == [(5, "Real", None, ["eng"])]


# -- rejected input -----------------------------------------------------------------------------


def _no_outputs(out: Path) -> bool:
    return not (out / "articles.parquet").exists() and not (out / "deletions.parquet").exists()


def test_legacy_format_is_rejected(tmp_path):
    with pytest.raises(ParseError) as info:
        parse_xml_file(LEGACY, tmp_path, source_file=LEGACY.name, file_seq=902)
    message = str(info.value)
    assert str(LEGACY) in message and "line 4" in message  # the <MedlineCitationSet> line
    assert "legacy" in message and "MedlineCitationSet" in message
    assert "medlm reads current PubmedArticleSet files" in message
    assert info.value.line == 4
    assert _no_outputs(tmp_path)


def test_unexpected_root_is_rejected(tmp_path):
    xml = tmp_path / "other.xml"
    xml.write_text('<?xml version="1.0"?>\n<eSearchResult><Count>0</Count></eSearchResult>\n')
    with pytest.raises(ParseError, match=r"line 2: unexpected root element <eSearchResult>; expected a <PubmedArticleSet> root"):
        parse_xml_file(xml, tmp_path / "out", source_file=xml.name, file_seq=1)
    assert _no_outputs(tmp_path / "out")


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "malformed XML"),
        (gzip.compress(b"", mtime=0), "malformed XML"),
        (b"<html><body>503 Service Unavailable</body></html>\n", "unexpected root element <html>"),
        (b"\x1f\x8b\x08garbage", "the gzip stream is truncated or corrupt"),
        (b"PMID\ttitle\n1\tnot xml\n", "malformed XML"),
    ],
)
def test_not_pubmed_xml_at_all(tmp_path, content, problem):
    path = tmp_path / "pubmed25n0001.xml.gz"
    path.write_bytes(content)
    with pytest.raises(ParseError, match=rf"^{re.escape(str(path))}, line \d+: {re.escape(problem)}"):
        parse_xml_file(path, tmp_path / "out", source_file=path.name, file_seq=1)
    assert _no_outputs(tmp_path / "out")


def test_truncated_gzip_names_file_and_line(tmp_path):
    data = UPDATE.read_bytes()
    cut = tmp_path / "pubmed21n1298.xml.gz"
    cut.write_bytes(data[: len(data) // 2])
    # Where the readable XML breaks off, by an independent reading of the cut stream.
    readable = zlib.decompressobj(wbits=31).decompress(data[: len(data) // 2])
    line = readable.count(b"\n") + 1
    assert line > 1000
    out = tmp_path / "out"
    with pytest.raises(ParseError) as info:
        parse_xml_file(cut, out, source_file=cut.name, file_seq=1298, batch_rows=100)
    assert info.value.line == line
    message = str(info.value)
    assert message.startswith(f"{cut}, line {line}: ")
    assert "truncated or corrupt" in message and "expected a complete gzip file" in message
    assert _no_outputs(out)  # row groups had been written: they are removed


def test_corrupt_gzip_is_a_parse_error(tmp_path):
    data = bytearray(UPDATE.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = bytes(64)  # zero a run in the deflate stream
    bad = tmp_path / "pubmed21n1298.xml.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ParseError, match=rf"^{re.escape(str(bad))}, line \d+: "):
        parse_xml_file(bad, tmp_path / "out", source_file=bad.name, file_seq=1298)


def test_broken_xml_names_file_and_line(tmp_path):
    lines = FEATURES_2021.read_text(encoding="utf-8").splitlines(keepends=True)
    target = next(i for i, line in enumerate(lines) if i > 3000 and line.rstrip().endswith("</AbstractText>"))
    lines[target] = lines[target].replace("</AbstractText>", "</AbstractTxt>")
    broken = tmp_path / "broken.xml"
    broken.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(ParseError) as info:
        parse_xml_file(broken, tmp_path / "out", source_file=broken.name, file_seq=1, batch_rows=10)
    assert info.value.line == target + 1
    message = str(info.value)
    assert message.startswith(f"{broken}, line {target + 1}: malformed XML")
    assert "AbstractTxt" in message and "expected a well-formed PubmedArticleSet document" in message
    assert _no_outputs(tmp_path / "out")


def test_truncated_plain_xml(tmp_path):
    text = FEATURES_2020.read_text(encoding="utf-8")
    cut = tmp_path / "cut.xml"
    cut.write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(ParseError, match=rf"^{re.escape(str(cut))}, line \d+: malformed XML"):
        parse_xml_file(cut, tmp_path / "out", source_file=cut.name, file_seq=1)


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        body = b'<!ENTITY leak "FETCHED">' if self.path.endswith(".dtd") else b"FETCHED"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_no_network_no_dtd_no_entity_expansion(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        secret = tmp_path / "secret.txt"
        secret.write_text("LOCAL-SECRET")
        xml = tmp_path / "pubmed99n0001.xml"
        xml.write_text(
            '<?xml version="1.0" encoding="utf-8"?>\n'
            f'<!DOCTYPE PubmedArticleSet SYSTEM "{base}/pubmed.dtd" [\n'
            f'  <!ENTITY xxe SYSTEM "{base}/secret">\n'
            f'  <!ENTITY local SYSTEM "file://{secret}">\n'
            f'  <!ENTITY % remote SYSTEM "{base}/remote.dtd">\n'
            "  %remote;\n"
            '  <!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">\n'
            '  <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">\n'
            "]>\n"
            '<PubmedArticleSet><PubmedArticle><MedlineCitation Status="MEDLINE"><PMID Version="1">1</PMID><Article>'
            "<ArticleTitle>Title &xxe; end</ArticleTitle><Abstract><AbstractText>before &local; &b; after &leak;"
            "</AbstractText></Abstract></Article></MedlineCitation></PubmedArticle></PubmedArticleSet>\n"
        )
        _, [row], _ = _parse(xml, tmp_path / "out")
    finally:
        server.shutdown()
        server.server_close()
    assert _Recorder.requests == []
    text = row["title"] + row["abstract"]
    assert "FETCHED" not in text and "LOCAL-SECRET" not in text and "aaaa" not in text
    assert row["title"].startswith("Title ") and row["title"].endswith(" end")
    assert row["abstract"].startswith("before ") and row["abstract"].endswith(" after &leak;")


# -- the stage through a real store -----------------------------------------------------------------


def _download(store: Store, src: Path, name: str) -> Artifact:
    """``src`` as the download artifact of the NCBI file ``name`` (fetched from a file:// URL)."""
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    return DOWNLOAD.run(store, {}, RemoteFile(name, "updatefiles", src.resolve().as_uri(), md5, file_seq(name)))


def test_parse_through_the_store_is_cached(tmp_path, monkeypatch):
    store = Store(tmp_path / "store")
    download = _download(store, UPDATE, "pubmed21n1298.xml.gz")
    artifact = PARSE.run(store, {"download": download}, ParseConfig())
    assert artifact.parents == [download.ref] and artifact.label == "pubmed21n1298.xml.gz"
    assert artifact.params == {}  # batch_rows decides how, not what: the download decides the content
    assert artifact.summary == {
        "articles": 1500,
        "deletions": 20,
        "book_articles_skipped": 0,
        "source_file": "pubmed21n1298.xml.gz",
        "file_seq": 1298,
    }
    assert set(artifact.manifest["files"]) == {"articles.parquet", "deletions.parquet"}
    assert store.problems(artifact.ref) == []
    table = pq.read_table(artifact.file("articles.parquet"), columns=["source_file", "file_seq"])
    assert set(table.column("source_file").to_pylist()) == {"pubmed21n1298.xml.gz"}
    assert set(table.column("file_seq").to_pylist()) == {1298}

    def must_not_run(*args, **kwargs):
        raise AssertionError("parsed again")

    monkeypatch.setattr(parse_mod, "parse_xml_file", must_not_run)
    # Where and how it is parsed is no part of the key either.
    again = PARSE.run(store, {"download": download}, ParseConfig(batch_rows=64, workers=3))
    assert again.ref == artifact.ref and again.manifest["created"] == artifact.manifest["created"]
    assert any("pubmed21n1298.xml.gz md5=" in line for line in tree_lines(lineage(store, artifact.ref)))


def test_failing_parse_leaves_no_artifact(tmp_path):
    data = UPDATE.read_bytes()
    cut = tmp_path / "cut.xml.gz"
    cut.write_bytes(data[: len(data) // 2])
    store = Store(tmp_path / "store")
    download = _download(store, cut, "pubmed21n1298.xml.gz")
    with pytest.raises(ParseError, match="pubmed21n1298.xml.gz, line"):
        PARSE.run(store, {"download": download}, ParseConfig())
    spec = PARSE.spec({"download": download}, ParseConfig())
    assert store.get(spec.ref) is None
    assert not store.path(spec.kind, spec.key).exists()
    assert store.ls("parse") == []
    assert list((store.root / "parse").rglob("*.parquet")) == []


def test_isal_and_plain_gzip_read_the_same_rows(tmp_path, monkeypatch):
    """ISA-L inflates the files (it is a dependency); without it the standard library's gzip
    reads them, row for row the same. A truncated stream is the same ParseError either way (a
    corrupt one too, though ISA-L may hand lxml garbage before its checksum fails)."""
    assert parse_mod._GzipFile.__module__.startswith("isal")
    fast = _parse(UPDATE, tmp_path / "isal")
    data = UPDATE.read_bytes()
    cut = tmp_path / "cut.xml.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ParseError, match="the gzip stream is truncated or corrupt") as fast_error:
        parse_xml_file(cut, tmp_path / "cut-isal", source_file=cut.name, file_seq=1)

    monkeypatch.setattr(parse_mod, "_GzipFile", gzip.GzipFile)
    monkeypatch.setattr(parse_mod, "_InflateError", zlib.error)
    assert _parse(UPDATE, tmp_path / "gzip") == fast
    with pytest.raises(ParseError, match="the gzip stream is truncated or corrupt") as plain_error:
        parse_xml_file(cut, tmp_path / "cut-gzip", source_file=cut.name, file_seq=1)
    assert str(plain_error.value) == str(fast_error.value)


def test_a_parse_error_survives_the_trip_back_from_a_worker_process():
    error = ParseError("/data/pubmed21n1298.xml.gz", 7, "malformed XML: boom", "a well-formed PubmedArticleSet document")
    back = pickle.loads(pickle.dumps(error))
    assert str(back) == str(error) and (back.path, back.line, back.expected) == (error.path, 7, error.expected)
