"""The download stage against a real HTTP server on 127.0.0.1 serving real PubMed files, faults injected."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pytest

from dataclasses import replace

from tasks.download import DOWNLOAD, DownloadError, RemoteFile, SourceConfig, download_file, list_folder
from tasks.download import select_files as select
from storage import Store
from ncbi_server import HOSTILE_HREFS, WRONG_MD5, NcbiServer, Request, make_mirror

DATA = Path(__file__).parent / "data" / "pubmed" / "mirror"
BASELINE = DATA / "baseline" / "pubmed20n0014.xml.gz"
UPDATE = DATA / "updatefiles" / "pubmed21n1298.xml.gz"
BASELINE_PATH = "/baseline/pubmed20n0014.xml.gz"
FAST = {"backoff_s": 0.001, "timeout_s": 10}  # retries without waiting


def select_files(source, **selection) -> list[RemoteFile]:
    return select(SourceConfig(source=str(source), **selection))


def download(store: Store, remote: RemoteFile, **retries):
    return DOWNLOAD.run(store, {}, replace(remote, **(FAST | retries)))


def fetch(remote: RemoteFile, dest: Path, **retries) -> Path:
    return download_file(replace(remote, **(FAST | retries)), dest)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def mirror(tmp_path_factory) -> Path:
    return make_mirror(tmp_path_factory.mktemp("mirror"), {"baseline": [BASELINE], "updatefiles": [UPDATE]})


@pytest.fixture
def server(mirror):
    with NcbiServer(mirror) as server:
        yield server


def baseline_file(server: NcbiServer) -> RemoteFile:
    [remote] = select_files(server.url, folders=("baseline",))
    return remote


def file_gets(server: NcbiServer, path: str = BASELINE_PATH) -> list[Request]:
    return server.requests_for(path)


# -- listing and selection -----------------------------------------------------------------


def test_lists_mirror_over_http(server):
    assert list_folder(server.url, "baseline") == ["pubmed20n0014.xml.gz"]
    files = select_files(server.url + "/")  # a trailing slash on the base is fine
    assert files == [
        RemoteFile("pubmed20n0014.xml.gz", "baseline", f"{server.url}{BASELINE_PATH}", md5(BASELINE), 14),
        RemoteFile(
            "pubmed21n1298.xml.gz", "updatefiles", f"{server.url}/updatefiles/pubmed21n1298.xml.gz", md5(UPDATE), 1298
        ),
    ]


@pytest.mark.parametrize("as_base", [Path, str, Path.as_uri], ids=["path", "str", "file-url"])
def test_lists_local_mirror(mirror, as_base):
    files = select_files(as_base(mirror))
    assert [(f.name, f.folder, f.md5, f.seq) for f in files] == [
        ("pubmed20n0014.xml.gz", "baseline", md5(BASELINE), 14),
        ("pubmed21n1298.xml.gz", "updatefiles", md5(UPDATE), 1298),
    ]
    assert files[0].url == (mirror / "baseline" / "pubmed20n0014.xml.gz").as_uri()


def test_hostile_listing_entries_are_rejected_and_logged(server, caplog, tmp_path):
    server.faults.extra_listing["/baseline/"] = list(HOSTILE_HREFS)
    caplog.set_level(logging.WARNING, logger="medlm.download")
    assert list_folder(server.url, "baseline") == ["pubmed20n0014.xml.gz"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for href in HOSTILE_HREFS:
        shown = href.replace("&#10;", "\n")[:200]
        assert sum(repr(shown)[:-1] in message for message in warnings) == 1, href[:60]
    assert max(map(len, warnings)) < 400  # the 100 KB name is cut
    assert not any("README.txt" in m or ".md5" in m or "stats" in m for m in warnings)  # index chrome is quiet

    # The rest of the listing is still ingested.
    [remote] = select_files(server.url, folders=("baseline",))
    assert download(Store(tmp_path / "store"), remote).file(remote.name).read_bytes() == BASELINE.read_bytes()


def test_hostile_local_entries_are_rejected_and_logged(tmp_path, caplog):
    mirror = make_mirror(tmp_path / "mirror", {"baseline": [BASELINE]})
    (mirror / "baseline" / "pubmed25n0001.xml.gz.bak").write_bytes(b"x")
    (mirror / "baseline" / "sub").mkdir()
    caplog.set_level(logging.WARNING, logger="medlm.download")
    assert list_folder(mirror, "baseline") == ["pubmed20n0014.xml.gz"]
    assert "'pubmed25n0001.xml.gz.bak'" in caplog.text


@pytest.fixture
def numbered_server(tmp_path):
    """Six files named like one year's baseline and updates (real bytes under new names)."""
    sources = tmp_path / "sources"
    sources.mkdir()
    for name in ["pubmed25n0001", "pubmed25n0002", "pubmed25n0003", "pubmed25n1275", "pubmed25n1276", "pubmed25n1277"]:
        shutil.copyfile(BASELINE, sources / f"{name}.xml.gz")
    mirror = make_mirror(
        tmp_path / "mirror",
        {"baseline": sorted(sources.glob("*n000*")), "updatefiles": sorted(sources.glob("*n127*"))},
    )
    with NcbiServer(mirror) as server:
        yield server


def names(files: list[RemoteFile]) -> list[str]:
    return [f.name for f in files]


def test_selection(numbered_server):
    url = numbered_server.url
    everything = select_files(url)
    assert [f.seq for f in everything] == [1, 2, 3, 1275, 1276, 1277]
    assert {f.folder for f in everything[:3]} == {"baseline"} and {f.folder for f in everything[3:]} == {"updatefiles"}
    assert names(select_files(url, folders=("baseline",), baseline_limit=2)) == ["pubmed25n0001.xml.gz", "pubmed25n0002.xml.gz"]
    nightly = select_files(url, folders=("updatefiles",), updates_after=1275)
    assert names(nightly) == ["pubmed25n1276.xml.gz", "pubmed25n1277.xml.gz"]
    seen = len(numbered_server.requests)
    explicit = select_files(url, names=["pubmed25n1275.xml.gz", "pubmed25n0003.xml.gz"])
    assert [(f.name, f.folder) for f in explicit] == [("pubmed25n0003.xml.gz", "baseline"), ("pubmed25n1275.xml.gz", "updatefiles")]
    md5_gets = [r.path for r in numbered_server.requests[seen:] if r.path.endswith(".md5")]
    assert sorted(md5_gets) == ["/baseline/pubmed25n0003.xml.gz.md5", "/updatefiles/pubmed25n1275.xml.gz.md5"]


@pytest.mark.parametrize("bad", ["../pubmed25n0001.xml.gz", "pubmed25n0001.xml", "baseline/pubmed25n0001.xml.gz"])
def test_invalid_explicit_name_is_an_error(numbered_server, bad):
    with pytest.raises(ValueError, match=r"is not a PubMed file name: expected pubmedYYnNNNN\.xml\.gz") as error:
        select_files(numbered_server.url, names=[bad])
    assert repr(bad) in str(error.value)


def test_explicit_name_not_listed_is_an_error(numbered_server):
    with pytest.raises(DownloadError, match=r"pubmed25n0009\.xml\.gz.*not found in \['baseline', 'updatefiles'\]"):
        select_files(numbered_server.url, names=["pubmed25n0001.xml.gz", "pubmed25n0009.xml.gz"])


@pytest.mark.parametrize(
    "md5_text", [f"MD5(pubmed20n0015.xml.gz)= {'a' * 32}\n", "MD5(pubmed20n0014.xml.gz)= not-hex\n", ""]
)
def test_bad_md5_file_is_an_error_naming_its_url(tmp_path, md5_text):
    mirror = make_mirror(tmp_path / "mirror", {"baseline": [BASELINE]})
    (mirror / "baseline" / "pubmed20n0014.xml.gz.md5").write_text(md5_text)
    with NcbiServer(mirror) as server:
        with pytest.raises(DownloadError, match="expected one line 'MD5") as error:
            select_files(server.url, folders=("baseline",))
        assert f"{server.url}{BASELINE_PATH}.md5" in str(error.value)


# -- downloading ----------------------------------------------------------------------------


def test_download_verifies_and_stores_an_artifact(server, store):
    remote = baseline_file(server)
    artifact = download(store, remote)
    assert artifact.file(remote.name).read_bytes() == BASELINE.read_bytes()
    assert artifact.params == {"name": remote.name, "md5": md5(BASELINE), "folder": "baseline", "seq": 14}
    assert artifact.label == f"{remote.name} md5={md5(BASELINE)}"
    assert artifact.summary == {"bytes": BASELINE.stat().st_size}
    assert list(artifact.manifest["files"]) == [remote.name]  # no .part left behind
    assert store.problems(artifact.ref) == []


def test_rerun_downloads_nothing_and_the_source_is_not_in_the_key(server, store, mirror):
    remote = baseline_file(server)
    first = download(store, remote)
    again = download(store, remote)
    [local] = select_files(mirror, folders=("baseline",))
    from_mirror = download(store, local)
    assert first.ref == again.ref == from_mirror.ref
    assert len(file_gets(server)) == 1


def test_dropped_connection_resumes_with_range(server, store):
    server.faults.drop_after_bytes[BASELINE_PATH] = [300_000, 200_000]
    artifact = download(store, baseline_file(server))
    assert [r.range for r in file_gets(server)] == [None, "bytes=300000-", "bytes=500000-"]
    assert artifact.file("pubmed20n0014.xml.gz").read_bytes() == BASELINE.read_bytes()


def test_connection_that_keeps_dropping_fails_and_keeps_the_part(server, tmp_path):
    server.faults.drop_after_bytes[BASELINE_PATH] = [1000] * 10
    with pytest.raises(DownloadError, match=r"pubmed20n0014\.xml\.gz: transfer failed: connection closed after 1000 of"):
        fetch(baseline_file(server), tmp_path, attempts=3)
    assert len(file_gets(server)) == 3
    assert not (tmp_path / "pubmed20n0014.xml.gz").exists()
    assert (tmp_path / "pubmed20n0014.xml.gz.part").stat().st_size == 3000  # kept for the next run to resume


def test_503_then_200(server, store):
    server.faults.status[BASELINE_PATH] = [503, 503]
    artifact = download(store, baseline_file(server))
    assert len(file_gets(server)) == 3
    assert artifact.file("pubmed20n0014.xml.gz").read_bytes() == BASELINE.read_bytes()


def test_404_fails_at_once(server, tmp_path):
    remote = baseline_file(server)
    missing = RemoteFile("pubmed20n0099.xml.gz", "baseline", f"{server.url}/baseline/pubmed20n0099.xml.gz", remote.md5, 99)
    with pytest.raises(DownloadError, match=r"pubmed20n0099\.xml\.gz: HTTP 404 .*check the base URL"):
        fetch(missing, tmp_path)
    assert len(server.requests_for("/baseline/pubmed20n0099.xml.gz")) == 1


def test_wrong_md5_that_never_heals(server, store):
    server.faults.wrong_md5.add(BASELINE_PATH)
    remote = baseline_file(server)
    assert remote.md5 == WRONG_MD5
    with pytest.raises(DownloadError) as error:
        download(store, remote, attempts=3)
    message = str(error.value)
    assert "pubmed20n0014.xml.gz" in message and WRONG_MD5 in message and md5(BASELINE) in message
    assert [r.range for r in file_gets(server)] == [None, None, None]  # each retry from zero
    assert store.get(DOWNLOAD.spec({}, remote).ref) is None
    assert not [p for p in store.root.rglob("pubmed20n0014.xml.gz*")]  # nothing that looks complete, no bad .part


def test_killed_runs_part_is_resumed(server, store):
    remote = baseline_file(server)
    half = BASELINE.stat().st_size // 2
    work = store.work_dir(DOWNLOAD.spec({}, remote))
    work.mkdir(parents=True)
    (work / f"{remote.name}.part").write_bytes(BASELINE.read_bytes()[:half])
    artifact = download(store, remote)
    assert file_gets(server) == [Request(BASELINE_PATH, f"bytes={half}-")]
    assert artifact.file(remote.name).read_bytes() == BASELINE.read_bytes()


def test_verified_file_left_by_a_run_killed_before_its_manifest_is_kept(server, store):
    remote = baseline_file(server)
    work = store.work_dir(DOWNLOAD.spec({}, remote))
    work.mkdir(parents=True)
    shutil.copyfile(BASELINE, work / remote.name)
    artifact = download(store, remote)
    assert file_gets(server) == []
    assert artifact.file(remote.name).read_bytes() == BASELINE.read_bytes()


def test_complete_part_answered_416_is_verified(server, tmp_path):
    remote = baseline_file(server)
    (tmp_path / f"{remote.name}.part").write_bytes(BASELINE.read_bytes())
    assert fetch(remote, tmp_path).read_bytes() == BASELINE.read_bytes()
    assert file_gets(server) == [Request(BASELINE_PATH, f"bytes={BASELINE.stat().st_size}-")]


def test_bad_part_answered_416_is_fetched_again(server, tmp_path):
    remote = baseline_file(server)
    (tmp_path / f"{remote.name}.part").write_bytes(BASELINE.read_bytes() + b"trailing junk")
    assert fetch(remote, tmp_path).read_bytes() == BASELINE.read_bytes()
    assert [r.range for r in file_gets(server)] == [f"bytes={BASELINE.stat().st_size + 13}-", None]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.faults.ignore_range.add(BASELINE_PATH)
    remote = baseline_file(server)
    (tmp_path / f"{remote.name}.part").write_bytes(b"stale bytes that must not be kept")
    assert fetch(remote, tmp_path).read_bytes() == BASELINE.read_bytes()
    assert file_gets(server) == [Request(BASELINE_PATH, "bytes=33-")]  # answered 200: one request, no md5 retry


def test_local_mirror_resumes_a_part(mirror, tmp_path):
    [remote] = select_files(mirror, folders=("baseline",))
    (tmp_path / f"{remote.name}.part").write_bytes(BASELINE.read_bytes()[:1000])
    assert fetch(remote, tmp_path).read_bytes() == BASELINE.read_bytes()
    assert not (tmp_path / f"{remote.name}.part").exists()


@pytest.mark.usefixtures("prefect_server")
def test_listing_is_retried_after_a_5xx_but_not_for_a_name_that_is_not_listed(server):
    from prefect import flow

    from flows.ingest import list_remote

    listing = list_remote.with_options(retry_delay_seconds=0)

    @flow
    def list_updates(names: tuple[str, ...] = ()):
        return listing(SourceConfig(source=server.url, folders=("updatefiles",), names=names))

    server.faults.status["/updatefiles/"] = [503]
    assert [f.name for f in list_updates()] == ["pubmed21n1298.xml.gz"]
    assert len(server.requests_for("/updatefiles/")) == 2

    state = list_updates(names=("pubmed21n9999.xml.gz",), return_state=True)
    assert state.is_failed() and "pubmed21n9999.xml.gz" in state.message
    assert len(server.requests_for("/updatefiles/")) == 3  # one try: a missing name does not heal


# -- where a run may download from: the process's setting (storage/access.py) ---------------------


@pytest.mark.parametrize(
    "url, allowed",
    [
        ("https://ftp.ncbi.nlm.nih.gov/pubmed", True),
        ("https://ftp.ncbi.nlm.nih.gov/pubmed/baseline/", True),
        ("https://FTP.NCBI.NLM.NIH.GOV:443/pubmed/updatefiles/pubmed25n1275.xml.gz", True),
        ("https://ftp.ncbi.nlm.nih.gov/pubmedx/baseline/", False),
        ("https://ftp.ncbi.nlm.nih.gov/", False),
        ("https://ftp.ncbi.nlm.nih.gov.evil.example/pubmed", False),
        ("https://ftp.ncbi.nlm.nih.gov@evil.example/pubmed", False),
        ("https://user:pw@ftp.ncbi.nlm.nih.gov/pubmed", False),
        ("http://ftp.ncbi.nlm.nih.gov/pubmed", False),
        ("https://ftp.ncbi.nlm.nih.gov:8443/pubmed", False),
        ("https://ftp.ncbi.nlm.nih.gov:port/pubmed", False),
        ("https://ftp.ncbi.nlm.nih.gov/pubmed/../private/", False),
        ("https://ftp.ncbi.nlm.nih.gov/pubmed/%2e%2e/private/", False),
        ("ftp://ftp.ncbi.nlm.nih.gov/pubmed", False),
    ],
)
def test_only_the_allowed_sources_and_what_lies_below_them(url, allowed, monkeypatch):
    from storage.access import check_source

    monkeypatch.setenv("MEDLM_SOURCES", "https://ftp.ncbi.nlm.nih.gov/pubmed")
    if allowed:
        assert check_source(url) == url
    else:
        with pytest.raises((PermissionError, ValueError)):
            check_source(url)


def test_a_source_that_is_not_allowed_is_refused_before_any_request(tmp_path):
    from ncbi_server import Listener

    from storage.access import AccessError

    with Listener() as elsewhere:
        with pytest.raises(ValueError, match=rf"{elsewhere.url}/pubmed is not among the sources this process may download from \(MEDLM_SOURCES="):
            SourceConfig(source=f"{elsewhere.url}/pubmed")
        with pytest.raises(AccessError, match="MEDLM_SOURCES"):
            list_folder(f"{elsewhere.url}/pubmed", "baseline")
        remote = RemoteFile(name="pubmed20n0014.xml.gz", folder="baseline", url=f"{elsewhere.url}/pubmed20n0014.xml.gz", md5="0" * 32, seq=14)
        with pytest.raises(AccessError, match="MEDLM_SOURCES"):
            download_file(remote, tmp_path)
    assert elsewhere.connections == 0


def test_a_redirect_out_of_the_allowed_sources_is_not_followed(server, tmp_path):
    from ncbi_server import Listener

    with Listener() as elsewhere:
        server.faults.redirect["/baseline/"] = f"{elsewhere.url}/baseline/"
        server.faults.redirect[BASELINE_PATH] = f"{elsewhere.url}{BASELINE_PATH}"
        with pytest.raises(PermissionError, match=rf"a redirect from {server.url}/baseline/ to {elsewhere.url}/baseline/ is not among the sources"):
            list_folder(server.url, "baseline")
        [remote] = select_files(server.url, folders=("updatefiles",))
        moved = replace(remote, url=f"{server.url}{BASELINE_PATH}")
        with pytest.raises(PermissionError, match="MEDLM_SOURCES"):
            download_file(moved, tmp_path)
    assert elsewhere.connections == 0 and not list(tmp_path.iterdir())


def test_a_local_mirror_is_read_only_inside_the_data_roots(tmp_path, monkeypatch):
    """The roots are checked with links resolved: a mirror folder outside them is refused where the
    value enters, and a file inside an allowed mirror that links out of the roots when it is read."""
    allowed = make_mirror(tmp_path / "roots" / "mirror", {"baseline": [BASELINE]})
    outside = make_mirror(tmp_path / "outside", {"baseline": [BASELINE]})
    monkeypatch.setenv("MEDLM_DATA_ROOTS", str(tmp_path / "roots"))
    with pytest.raises(ValueError, match=rf"Value error, {outside} is outside the folders this process may read \(MEDLM_DATA_ROOTS={tmp_path / 'roots'}\)"):
        SourceConfig(source=str(outside))
    with pytest.raises(ValueError, match="is outside the folders"):
        SourceConfig(source=outside.as_uri())
    (tmp_path / "roots" / "link").symlink_to(outside)
    with pytest.raises(ValueError, match=r"link \(a link leading out of them\) is outside the folders") as refused:
        SourceConfig(source=str(tmp_path / "roots" / "link"))
    assert str(outside) not in str(refused.value)  # refused, without saying where the link leads

    [remote] = select_files(allowed, folders=("baseline",))
    linked = allowed / "baseline" / BASELINE.name
    linked.unlink()
    linked.symlink_to(outside / "baseline" / BASELINE.name)
    with pytest.raises(PermissionError, match=rf"{BASELINE.name} {linked} \(a link leading out of them\) is outside the folders") as refused:
        download_file(remote, tmp_path / "out")
    assert str(outside) not in str(refused.value)
    assert not list((tmp_path / "out").iterdir())

    # A mirror whose folder is a link out of the roots is not listed (its file names are not logged).
    shutil.rmtree(allowed / "baseline")
    (allowed / "baseline").symlink_to(outside / "baseline")
    with pytest.raises(PermissionError, match=r"source folder .*baseline \(a link leading out of them\) is outside the folders"):
        select_files(allowed, folders=("baseline",))
