"""Parse stage: one MEDLINE/PubMed XML file (``PubmedArticleSet``) -> Parquet.

``parse_xml_file`` is the pure function: it streams the XML (gzip or plain, told apart by the
magic bytes) through ``lxml.etree.iterparse``, clearing every record once it is read so memory
stays flat in the file's size, and writes two files into ``out_dir``:

- ``articles.parquet``: one row per ``PubmedArticle`` (schema ``ARTICLE_SCHEMA``), in file order;
  the same PMID can occur more than once in an update file with different ``version``.
- ``deletions.parquet``: one row per PMID of the file's ``DeleteCitation`` (``DELETION_SCHEMA``);
  always written, empty when the file has none (baseline files never do).

``PubmedBookArticle`` records (NCBI Bookshelf) are counted and skipped.

Security and reproducibility: the parser never loads a DTD, never resolves entities and never
touches the network (``load_dtd=False, resolve_entities=False, no_network=True``,
``huge_tree`` off). An entity reference that is left unresolved stays in the text literally
(``&name;``); NCBI's files use only the predefined and numeric character references, which are
always decoded.

Text rules (titles and abstract sections): the text of inline markup (``<i>``, ``<b>``, ``<u>``,
``<sup>``, ``<sub>``, MathML) is kept, in document order, exactly as written between the tags, and
then each run of XML whitespace (space, tab, CR, LF) becomes one space and the ends are trimmed.
No separator is inserted at tag boundaries: ``T<sub>2</sub>`` reads ``T2`` and, in MathML,
NLM's files already put a space between the tokens that are separate words (``<mml:mi>T</mml:mi>
<mml:mn>1</mml:mn>`` -> ``T 1``, ``35.07 ± 3.84``); the only tokens they write without a space
are parts of one symbol (``Ca<mml:msup><mml:mi/><mml:mrow><mml:mn>2</mml:mn><mml:mo>+</mml:mo>``
-> ``Ca2+``, ``[IP3]``), where adding spaces would split a word. Pretty-printed MathML (newlines
and indentation between tokens) collapses to single spaces. Other whitespace characters (no-break
and thin spaces) are content and are kept.
"""

from __future__ import annotations

import datetime as _dt
import re
import zlib
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
from lxml import etree
from pydantic import Field

from storage import Input, Stage
from storage.formats import ARTICLES_FILE, DELETIONS_FILE
from storage.config import config_dataclass

try:  # ISA-L's inflate: 2.7x zlib's speed, 5-13% of a full file's parse CPU time (benchmarks/results/parse.json)
    from isal.igzip import IGzipFile as _GzipFile
    from isal.isal_zlib import error as _InflateError
except ImportError:  # plain zlib where isal is not installed
    from gzip import GzipFile as _GzipFile
    from zlib import error as _InflateError

SECTION_TYPE = pa.struct(
    [pa.field("label", pa.string()), pa.field("nlm_category", pa.string()), pa.field("text", pa.string())]
)

ARTICLE_SCHEMA = pa.schema(
    [
        pa.field("pmid", pa.int64(), nullable=False),
        pa.field("version", pa.int32(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("vernacular_title", pa.string()),
        pa.field("abstract", pa.string()),
        pa.field("abstract_sections", pa.list_(SECTION_TYPE), nullable=False),
        pa.field("languages", pa.list_(pa.string()), nullable=False),
        pa.field("journal", pa.string()),
        pa.field("pub_year", pa.int32()),
        pa.field("mesh_terms", pa.list_(pa.string()), nullable=False),
        pa.field("publication_types", pa.list_(pa.string()), nullable=False),
        pa.field("status", pa.string()),
        pa.field("date_revised", pa.date32()),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("file_seq", pa.int32(), nullable=False),
    ]
)

DELETION_SCHEMA = pa.schema(
    [
        pa.field("pmid", pa.int64(), nullable=False),
        pa.field("version", pa.int32(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("file_seq", pa.int32(), nullable=False),
    ]
)

_ROOT = "PubmedArticleSet"
_LEGACY_ROOT = "MedlineCitationSet"
_ARTICLE = "PubmedArticle"
_BOOK = "PubmedBookArticle"
_DELETE = "DeleteCitation"
_TAGS = (_ROOT, _LEGACY_ROOT, _ARTICLE, _BOOK, _DELETE)
# The children we read, so lxml skips the rest (AuthorList, References, ...) in C.
_MC_TAGS = ("PMID", "DateRevised", "Article", "MeshHeadingList")
_ARTICLE_TAGS = ("Journal", "ArticleTitle", "Abstract", "Language", "PublicationTypeList", "VernacularTitle")
_JOURNAL_TAGS = ("Title", "Year", "MedlineDate")

_YEAR_RE = re.compile(r"\d{4}")
_WS_RE = re.compile(r"[ \t\r\n]+")
_GZIP_MAGIC = b"\x1f\x8b"
_EPOCH_ORDINAL = _dt.date(1970, 1, 1).toordinal()


class ParseError(ValueError):
    """The XML cannot be parsed as a current MEDLINE/PubMed file.

    The message names the file, the line (1-based, in the decompressed XML) and what was expected;
    the same facts are on ``path``, ``line`` and ``expected``.
    """

    def __init__(self, path: Path | str, line: int | None, problem: str, expected: str):
        self.path = str(path)
        self.line = line
        self.problem = problem
        self.expected = expected
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}; expected {expected}")

    def __reduce__(self):  # raised in a worker process, it travels back to the flow pickled
        return type(self), (self.path, self.line, self.problem, self.expected)


# -- input -------------------------------------------------------------------------------------


class _InputError(Exception):
    """Reading the (decompressed) input failed; ``__cause__`` says why."""


# Subtrees no column is read from, cut out of the byte stream before lxml builds them: in update
# files PubmedData (reference lists, history, ids) is about 60% of the bytes. Each cut keeps its
# newlines, so the line numbers lxml reports still point into the original file.
_UNREAD_SUBTREES = ((b"<PubmedData>", b"</PubmedData>"), (b"<AuthorList", b"</AuthorList>"))
_ARTICLE_ENDS = (b"</PubmedArticle>", b"</PubmedBookArticle>")
_READ_CHUNK = 1 << 20


def _cut_unread_subtrees(data: bytes) -> bytes:
    for start_tag, end_tag in _UNREAD_SUBTREES:
        kept, pos = [], 0
        while (start := data.find(start_tag, pos)) >= 0 and (end := data.find(end_tag, start)) >= 0:
            end += len(end_tag)
            kept += (data[pos:start], b"\n" * data.count(b"\n", start, end))
            pos = end
        if kept:
            data = b"".join(kept) + data[pos:]
    return data


class _Reader:
    """The file-like object handed to lxml: the raw file, or a gzip stream over it, with the
    unread subtrees cut out of whole articles.

    It marks decompression failures (truncated or corrupt gzip) as input errors, so they are
    told apart from, say, a full disk while writing the Parquet.
    """

    __slots__ = ("_raw", "_stream", "_out", "_pos", "_pending", "_eof")

    def __init__(self, path: Path):
        self._raw = open(path, "rb")
        is_gzip = self._raw.read(2) == _GZIP_MAGIC
        self._raw.seek(0)
        self._stream = _GzipFile(fileobj=self._raw, mode="rb") if is_gzip else self._raw
        self._out, self._pos, self._pending, self._eof = b"", 0, b"", False

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self._out) - self._pos < size) and not self._eof:
            self._refill()
        end = len(self._out) if size < 0 else self._pos + size
        data = self._out[self._pos:end]
        self._pos += len(data)
        return data

    def _refill(self) -> None:
        """Decompress the next chunk and pass it on, unread subtrees cut."""
        try:
            chunk = self._stream.read(_READ_CHUNK)
        except (EOFError, OSError, zlib.error, _InflateError) as e:
            raise _InputError(e) from e
        if chunk:
            data = self._pending + chunk
            # Hold back the unfinished last article, so no subtree is split between two cuts.
            # Without an article end (a legacy file, an article over 1 MiB) pass it all: uncut is
            # only slower, and memory stays bounded.
            split = max(data.rfind(end) for end in _ARTICLE_ENDS)
            ready, self._pending = (data[:split], data[split:]) if split > 0 else (data, b"")
        else:  # the end: a truncated subtree has no end tag, stays in, and lxml reports it
            ready, self._pending, self._eof = self._pending, b"", True
        self._out = self._out[self._pos:] + _cut_unread_subtrees(ready)
        self._pos = 0

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._raw.close()


def _readable_lines(path: Path) -> int:
    """The line of the XML in which ``path``'s readable data breaks off (the error path only).

    Decompresses with zlib directly, so the data before the break counts too (``gzip`` raises
    instead of returning what it inflated in the failing read)."""
    lines = 0
    with open(path, "rb") as f:
        if f.read(2) != _GZIP_MAGIC:
            f.seek(0)
            while data := f.read(1 << 20):
                lines += data.count(b"\n")
            return lines + 1
        f.seek(0)
        inflater = zlib.decompressobj(wbits=31)
        while chunk := f.read(1 << 20):
            while chunk:
                try:
                    out = inflater.decompress(chunk, 1 << 24)
                except zlib.error:
                    return lines + 1
                lines += out.count(b"\n")
                if inflater.eof:  # another gzip member may follow
                    chunk = inflater.unused_data.lstrip(b"\0")
                    inflater = zlib.decompressobj(wbits=31)
                else:
                    chunk = inflater.unconsumed_tail
    return lines + 1


# -- field extraction ----------------------------------------------------------------------------


def _clean(s: str) -> str:
    if "\n" in s or "  " in s or "\t" in s or "\r" in s:
        s = _WS_RE.sub(" ", s)
    return s.strip(" ")


def _text(el) -> str:
    """Text of an element and all its descendants (inline markup kept), whitespace normalised."""
    if len(el):
        return _clean("".join(el.itertext()))
    t = el.text
    return _clean(t) if t else ""


def _int(s: str | None) -> int | None:
    if not s:
        return None
    try:
        return int(s)
    except ValueError:
        return None


class _Columns:
    """Column buffers for one row group; list columns are kept flat (values + offsets)."""

    def __init__(self) -> None:
        self.pmid: list[int] = []
        self.version: list[int] = []
        self.title: list[str] = []
        self.vernacular_title: list[str | None] = []
        self.abstract: list[str | None] = []
        self.sec_offsets: list[int] = [0]
        self.sec_label: list[str | None] = []
        self.sec_category: list[str | None] = []
        self.sec_text: list[str] = []
        self.lang_offsets: list[int] = [0]
        self.lang: list[str] = []
        self.journal: list[str | None] = []
        self.pub_year: list[int | None] = []
        self.mesh_offsets: list[int] = [0]
        self.mesh: list[str] = []
        self.pt_offsets: list[int] = [0]
        self.pt: list[str] = []
        self.status: list[str | None] = []
        self.date_revised: list[int | None] = []

    def __len__(self) -> int:
        return len(self.pmid)

    def table(self, source_file: str, file_seq: int) -> pa.Table:
        n = len(self.pmid)
        strs = pa.string()
        sections = pa.ListArray.from_arrays(
            pa.array(self.sec_offsets, pa.int32()),
            pa.StructArray.from_arrays(
                [pa.array(self.sec_label, strs), pa.array(self.sec_category, strs), pa.array(self.sec_text, strs)],
                fields=list(SECTION_TYPE),
            ),
        )

        def str_list(offsets: list[int], values: list[str]) -> pa.Array:
            return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, strs))

        columns = [
            pa.array(self.pmid, pa.int64()),
            pa.array(self.version, pa.int32()),
            pa.array(self.title, strs),
            pa.array(self.vernacular_title, strs),
            pa.array(self.abstract, strs),
            sections,
            str_list(self.lang_offsets, self.lang),
            pa.array(self.journal, strs),
            pa.array(self.pub_year, pa.int32()),
            str_list(self.mesh_offsets, self.mesh),
            str_list(self.pt_offsets, self.pt),
            pa.array(self.status, strs),
            pa.array(self.date_revised, pa.int32()).cast(pa.date32()),
            pa.array([source_file] * n, strs),
            pa.array([file_seq] * n, pa.int32()),
        ]
        return pa.Table.from_arrays(columns, schema=ARTICLE_SCHEMA)


def _add_article(cols: _Columns, art_el, path: Path) -> None:
    """Append one ``PubmedArticle`` to the column buffers.

    One pass over the wanted children of ``MedlineCitation`` and of ``Article`` (lxml filters the
    tags in C), dispatching on the tag. Measured on pubmed20n0014: ``find``/``findtext`` cost about
    4 us a call (ElementPath), and a dozen of them per article cost more than the rest of the
    extraction together; this walk takes ~25 us an article in all.
    """
    mc = art_el[0] if len(art_el) else None
    if mc is None or mc.tag != "MedlineCitation":
        mc = art_el.find("MedlineCitation")
        if mc is None:
            raise ParseError(path, art_el.sourceline, "a PubmedArticle has no MedlineCitation", "<PubmedArticle><MedlineCitation>")
    pmid = version = title = vernacular = journal = year = abstract = revised = None
    for child in mc.iterchildren(_MC_TAGS):
        tag = child.tag
        if tag == "Article":
            for el in child.iterchildren(_ARTICLE_TAGS):
                tag = el.tag
                if tag == "ArticleTitle":
                    title = _text(el)
                elif tag == "Abstract":
                    abstract = _abstract(cols, el)
                elif tag == "Journal":
                    medline_date = None
                    for j in el.iter(_JOURNAL_TAGS):  # Journal/Title, Journal/JournalIssue/PubDate/*
                        tag = j.tag
                        if tag == "Title":
                            journal = j.text
                        elif tag == "Year":
                            year = _int(j.text)
                        else:
                            medline_date = j.text
                    if year is None and medline_date and (m := _YEAR_RE.search(medline_date)):
                        year = int(m.group())
                elif tag == "Language":
                    cols.lang.append(el.text or "")
                elif tag == "PublicationTypeList":
                    cols.pt.extend([pt.text or "" for pt in el.iterchildren("PublicationType")])
                else:  # VernacularTitle
                    vernacular = _text(el)
        elif tag == "PMID":
            if pmid is None:
                pmid = _int(child.text)
                version = _int(child.get("Version"))
        elif tag == "MeshHeadingList":
            cols.mesh.extend([d.text or "" for d in child.iter("DescriptorName")])
        else:  # DateRevised
            revised = _date_days(child)
    if pmid is None:
        raise ParseError(path, mc.sourceline, "a MedlineCitation has no numeric PMID", "<PMID>digits</PMID>")
    cols.pmid.append(pmid)
    cols.version.append(version or 1)
    cols.status.append(mc.get("Status"))
    cols.title.append(title or "")
    cols.vernacular_title.append(vernacular)
    cols.abstract.append(abstract)
    cols.journal.append(journal)
    cols.pub_year.append(year)
    cols.date_revised.append(revised)
    cols.sec_offsets.append(len(cols.sec_text))
    cols.lang_offsets.append(len(cols.lang))
    cols.pt_offsets.append(len(cols.pt))
    cols.mesh_offsets.append(len(cols.mesh))


def _abstract(cols: _Columns, abstract_el) -> str | None:
    """Sections of ``Abstract`` into the section columns; the joined abstract (None if no text).

    Only ``AbstractText`` children: ``CopyrightInformation`` (a sibling inside ``Abstract``) is
    not abstract text, and ``OtherAbstract`` is a different element altogether.
    """
    parts = []
    for at in abstract_el.iterchildren("AbstractText"):
        label = at.get("Label")
        text = _text(at)
        cols.sec_label.append(label)
        cols.sec_category.append(at.get("NlmCategory"))
        cols.sec_text.append(text)
        parts.append(f"{label}: {text}" if label and text else label or text)
    return "\n".join(parts) if parts else None


def _date_days(date_el) -> int | None:
    """A Year/Month/Day element as days since 1970-01-01 (date32), None if incomplete or invalid."""
    y = m = d = None
    for el in date_el:
        tag = el.tag
        if tag == "Year":
            y = el.text
        elif tag == "Month":
            m = el.text
        elif tag == "Day":
            d = el.text
    try:
        return _dt.date(int(y), int(m), int(d)).toordinal() - _EPOCH_ORDINAL
    except (TypeError, ValueError):
        return None


# -- the pure function ---------------------------------------------------------------------------


def parse_xml_file(
    xml_path: Path,
    out_dir: Path,
    *,
    source_file: str,
    file_seq: int,
    batch_rows: int = 5000,
) -> dict:
    """Parse one PubMed XML file into ``out_dir/articles.parquet`` and ``out_dir/deletions.parquet``.

    Returns ``{"articles", "deletions", "book_articles_skipped", "source_file", "file_seq"}``.
    Raises ``ParseError`` (naming the file and line) for a legacy ``MedlineCitationSet`` file, an
    unexpected root element, malformed XML or a truncated/corrupt gzip stream; the two output
    files are then removed, so nothing that looks complete is left behind.
    """
    xml_path = Path(xml_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    articles_path = out_dir / ARTICLES_FILE
    deletions_path = out_dir / DELETIONS_FILE
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")

    n_articles = n_books = 0
    del_pmid: list[int] = []
    del_version: list[int] = []
    reader = _Reader(xml_path)
    try:
        writer = pq.ParquetWriter(articles_path, ARTICLE_SCHEMA, compression="zstd")
    except BaseException:
        reader.close()
        raise
    ok = False
    try:
        cols = _Columns()
        context = iterparse_safely(reader)
        root_checked = False
        try:
            for event, elem in context:
                if event == "start":
                    if not root_checked:
                        _check_root(elem, xml_path)
                        root_checked = True
                    continue
                tag = elem.tag
                if tag == _ARTICLE:
                    _add_article(cols, elem, xml_path)
                    n_articles += 1
                    if len(cols) >= batch_rows:
                        writer.write_table(cols.table(source_file, file_seq))
                        cols = _Columns()
                elif tag == _DELETE:
                    for p in elem.iterchildren("PMID"):
                        pmid = _int(p.text)
                        if pmid is None:
                            raise ParseError(xml_path, p.sourceline, f"DeleteCitation PMID {p.text!r} is not a number", "<PMID>digits</PMID>")
                        del_pmid.append(pmid)
                        del_version.append(_int(p.get("Version")) or 1)
                elif tag == _BOOK:
                    n_books += 1
                else:  # the root's end event
                    continue
                elem.clear(keep_tail=True)
                while elem.getprevious() is not None:
                    del elem.getparent()[0]
        except etree.XMLSyntaxError as e:
            line = e.lineno or _readable_lines(xml_path)  # no position: the error is at the end
            raise ParseError(xml_path, line, f"malformed XML: {e.msg}", "a well-formed PubmedArticleSet document") from e
        except _InputError as e:
            cause = e.__cause__
            line = _readable_lines(xml_path)
            raise ParseError(
                xml_path,
                line,
                f"the gzip stream is truncated or corrupt: it breaks off in line {line} of the XML "
                f"({type(cause).__name__}: {cause})",
                "a complete gzip file (download it again)",
            ) from cause
        if not root_checked:
            root = context.root
            _check_root(root, xml_path)  # raises: a root we listen for always gives a start event
        if len(cols):
            writer.write_table(cols.table(source_file, file_seq))
        writer.close()
        deletions = pa.Table.from_arrays(
            [
                pa.array(del_pmid, pa.int64()),
                pa.array(del_version, pa.int32()),
                pa.array([source_file] * len(del_pmid), pa.string()),
                pa.array([file_seq] * len(del_pmid), pa.int32()),
            ],
            schema=DELETION_SCHEMA,
        )
        pq.write_table(deletions, deletions_path, compression="zstd")
        ok = True
    finally:
        reader.close()
        if not ok:
            writer.close()
            articles_path.unlink(missing_ok=True)
            deletions_path.unlink(missing_ok=True)
    return {
        "articles": n_articles,
        "deletions": len(del_pmid),
        "book_articles_skipped": n_books,
        "source_file": source_file,
        "file_seq": file_seq,
    }


def iterparse_safely(source) -> etree.iterparse:
    """Start and end events of the root, articles and deletions; no DTD, entities or network."""
    return etree.iterparse(
        source,
        events=("start", "end"),
        tag=_TAGS,
        load_dtd=False,
        dtd_validation=False,
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def _check_root(elem, path: Path) -> None:
    root = elem.getroottree().getroot() if elem is not None else None
    tag = root.tag if root is not None else None
    line = root.sourceline if root is not None else None
    if tag == _ROOT:
        return
    if tag == _LEGACY_ROOT:
        raise ParseError(
            path,
            line,
            "this is a legacy MEDLINE file (<MedlineCitationSet> root, the pre-2017 format); "
            "medlm reads current PubmedArticleSet files",
            "a <PubmedArticleSet> root (NCBI's current pubmedYYnNNNN.xml.gz baseline/update files)",
        )
    raise ParseError(path, line, f"unexpected root element <{tag}>", "a <PubmedArticleSet> root")


# -- the stage -----------------------------------------------------------------------------------


@config_dataclass
class ParseConfig:
    """Where and how the files are parsed: none of it changes what a file parses into."""

    workers: int | None = Field(
        None, ge=1, description="Files parsed at once, each in a worker process (unset: one per core this process may use, MEDLM_CORES included; 1: in the flow's own process)."
    )
    batch_rows: int = Field(5000, ge=1, description="Articles per Parquet row group.")

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("workers", "batch_rows")


def build_parse(inputs: dict, out_dir: Path, config: ParseConfig) -> dict:
    """Parse a download artifact (one ``.xml.gz``) into articles and deletions Parquet."""
    download = inputs["download"]
    name, seq = download.params["name"], download.params["seq"]
    return parse_xml_file(download.file(name), out_dir, source_file=name, file_seq=seq, batch_rows=config.batch_rows)


PARSE = Stage(
    name="parse",
    version="1",
    config=ParseConfig,
    inputs={"download": Input("download")},
    build=build_parse,
    label=lambda inputs, config: inputs["download"].params["name"],
)
