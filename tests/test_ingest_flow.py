"""The ingest flow against a real Prefect server and a real HTTP server in NCBI's layout."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from conftest import BASELINE_SAMPLE, UPDATE_SAMPLE
from flows.ingest import IngestIncomplete
from flows.ingest import ingest as ingest_flow
from ncbi_server import HOSTILE_HREFS, NcbiServer, make_mirror
from storage.formats import read_corpus
from storage.lineage import lineage, tree_lines
from tasks.corpus import CorpusConfig, build_snapshot
from tasks.download import SourceConfig
from tasks.parse import ParseConfig
from test_corpus import real_articles, write_update

pytestmark = pytest.mark.usefixtures("prefect_server")
BASELINE_PATH = "/baseline/pubmed20n0014.xml.gz"
UPDATE_PATH = "/updatefiles/pubmed21n1298.xml.gz"


@pytest.fixture
def mirror(tmp_path):
    return make_mirror(tmp_path / "mirror", {"baseline": [BASELINE_SAMPLE], "updatefiles": [UPDATE_SAMPLE]})


def task_run_states(flow_run_id) -> dict[str, str]:
    import asyncio

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return {run.name: run.state.name for run in runs}

    return asyncio.run(read())


def run_artifacts(flow_run_id) -> list:
    import asyncio

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return asyncio.run(read())


def run_logs(flow_run_id) -> dict[str, list[str]]:
    """The messages that reached the server for this flow run, by logger name."""
    import asyncio

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)

    async def read():
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            found: dict[str, list[str]] = {}
            for log in logs:
                found.setdefault(log.name, []).append(log.message)
            return found

    return asyncio.run(read())


def asset_events(api_url: str, resource: str, flow_run_id, expect: int = 1, wait_s: float = 60) -> list[dict]:
    """Materialization events of one asset in one flow run; events reach the server asynchronously, so poll."""
    run = f"prefect.flow-run.{flow_run_id}"
    body = json.dumps({"filter": {"event": {"prefix": ["prefect.asset.materialization."]}, "order": "DESC"}, "limit": 50})
    deadline = time.time() + wait_s
    while True:
        request = urllib.request.Request(f"{api_url}/events/filter", data=body.encode(), headers={"Content-Type": "application/json"})
        events = json.loads(urllib.request.urlopen(request).read())["events"]
        found = [
            e for e in events
            if e["resource"]["prefect.resource.id"] == resource and any(r["prefect.resource.id"] == run for r in e["related"])
        ]
        if len(found) >= expect or time.time() > deadline:
            return found
        time.sleep(0.5)


def ingest(source, **kwargs):
    return ingest_flow(source=SourceConfig(source=str(source), **kwargs.pop("selection", {})), **kwargs)


def test_ingest_builds_the_snapshot_then_a_rerun_fetches_nothing(mirror, store, prefect_server):
    with NcbiServer(mirror) as server:
        server.faults.extra_listing["/updatefiles/"] = list(HOSTILE_HREFS)  # rejected and logged, never fatal
        state = ingest(server.url, return_state=True)
        assert state.is_completed(), state.message
        corpus_ref = state.result()
        first_run = state.state_details.flow_run_id

        tree = "\n".join(tree_lines(lineage(store, corpus_ref)))
        md5s = {}
        for name in ("pubmed20n0014.xml.gz", "pubmed21n1298.xml.gz"):
            md5s[name] = (mirror / ("baseline" if "20n" in name else "updatefiles") / f"{name}.md5").read_text().split("= ")[1].strip()
            assert f"{name} md5={md5s[name]}" in tree
        states = task_run_states(first_run)
        assert {"medlm.download", "medlm.corpus"} <= set(run_logs(first_run))  # stage progress reaches the UI
        assert states["download pubmed20n0014.xml.gz"] == "Completed"
        assert states["parse pubmed21n1298.xml.gz"] == "Completed"
        corpus_events = asset_events(prefect_server, "medlm://corpus", first_run)
        assert corpus_events and corpus_events[0]["payload"]["ref"] == corpus_ref
        parsed_refs = {a.ref for a in store.ls("parse")}
        assert set(corpus_events[0]["payload"]["parents"]) == parsed_refs  # the edges, with exact refs
        upstream = {r["prefect.resource.id"] for r in corpus_events[0]["related"] if r.get("prefect.resource.role") == "asset"}
        assert upstream == {"medlm://parse"}
        download_events = asset_events(prefect_server, "medlm://download", first_run, expect=2)
        assert {e["payload"]["params"]["name"]: e["payload"]["params"]["md5"] for e in download_events} == md5s
        [lineage_md] = [a.data for a in run_artifacts(first_run) if a.key == "lineage-corpus"]
        assert f"# Lineage of `{corpus_ref}`" in lineage_md
        for name, md5 in md5s.items():  # down to the source files, readable in the UI
            assert f"{name} md5={md5}" in lineage_md

        gets_before = len(server.requests_for(BASELINE_PATH)) + len(server.requests_for(UPDATE_PATH))
        again = ingest(server.url, return_state=True)
        assert again.result() == corpus_ref
        assert len(server.requests_for(BASELINE_PATH)) + len(server.requests_for(UPDATE_PATH)) == gets_before
        states = task_run_states(again.state_details.flow_run_id)
        assert states["download pubmed20n0014.xml.gz"] == "Cached"
        assert states["parse pubmed21n1298.xml.gz"] == "Cached"
        assert states["corpus"] == "Cached"


def test_a_new_update_file_costs_only_itself_and_its_deletions_apply(mirror, tmp_path, store):
    with NcbiServer(mirror) as server:
        first = ingest(server.url, parse=ParseConfig(workers=2))  # two worker processes, wherever the test runs
        corpus = store.require(first)
        doomed = min(int(p) for p in _corpus_pmids(corpus))
        # Tonight NCBI publishes pubmed21n1299: one real article, and a deletion of a baseline PMID.
        new_file = tmp_path / "pubmed21n1299.xml"
        write_update(new_file, real_articles(UPDATE_SAMPLE)[:1], [doomed])
        new_gz = tmp_path / "pubmed21n1299.xml.gz"
        new_gz.write_bytes(gzip.compress(new_file.read_bytes()))
        make_mirror(mirror, {"updatefiles": [new_gz]})

        second = ingest(server.url)
        assert second != first
        assert len(server.requests_for(BASELINE_PATH)) == 1 and len(server.requests_for(UPDATE_PATH)) == 1
        assert len(server.requests_for("/updatefiles/pubmed21n1299.xml.gz")) == 1
    snapshot = store.require(second)
    assert str(doomed) not in _corpus_pmids(snapshot)
    assert snapshot.summary["deleted"] == corpus.summary["deleted"] + 1
    assert len(store.ls("download")) == 3 and len(store.ls("parse")) == 3
    # Tonight's snapshot is last night's with one file applied: last night's part, linked (so its
    # digest is reused, not recomputed), and a new part; the documents a full build has.
    assert snapshot.summary["previous"] == first and snapshot.summary["files_applied"] == 1
    assert snapshot.parents == sorted(a.ref for a in store.ls("parse"))  # the previous one is no parent
    assert snapshot.file("part-0000.parquet").stat().st_ino == corpus.file("part-0000.parquet").stat().st_ino
    assert snapshot.manifest["files"]["part-0000.parquet"] == corpus.manifest["files"]["part-0000.parquet"]
    assert not store.problems(snapshot.ref)
    parsed = store.ls("parse")
    build_snapshot([a.file("articles.parquet") for a in parsed], [a.file("deletions.parquet") for a in parsed], tmp_path / "full", CorpusConfig())
    assert read_corpus(snapshot.path).equals(read_corpus(tmp_path / "full"))
    for name in ("pmids.parquet", "stats.json"):
        assert snapshot.file(name).read_bytes() == (tmp_path / "full" / name).read_bytes()


def test_a_nightly_run_lists_only_new_update_files_once_the_baseline_is_in(mirror, tmp_path, store):
    nightly = {"new_files_only": True}
    with NcbiServer(mirror) as server:
        first = ingest(server.url, selection=nightly)  # no snapshot yet: the whole listing
        assert len(server.requests_for("/baseline/")) == 1
        new_gz = tmp_path / "pubmed21n1299.xml.gz"
        new_gz.write_bytes(gzip.compress(write_update(tmp_path / "pubmed21n1299.xml", real_articles(UPDATE_SAMPLE)[:1], []).read_bytes()))
        make_mirror(mirror, {"updatefiles": [new_gz]})
        seen = len(server.requests)
        second = ingest(server.url, selection=nightly)
        tonight = [r.path for r in server.requests[seen:]]
    assert not [path for path in tonight if path.startswith("/baseline/")]  # the baseline is not even listed
    assert "/updatefiles/pubmed21n1299.xml.gz" in tonight and UPDATE_PATH + ".md5" not in tonight
    assert second != first and set(store.require(second).parents) == {a.ref for a in store.ls("parse")}
    assert ingest(mirror) == second  # what the whole listing builds


def test_failed_files_fail_alone_and_the_error_names_each_file_and_cause(mirror, tmp_path, store):
    broken = tmp_path / "pubmed21n1300.xml.gz"
    broken.write_bytes(UPDATE_SAMPLE.read_bytes()[: UPDATE_SAMPLE.stat().st_size // 2])  # truncated, honest md5
    lying = tmp_path / "pubmed21n1301.xml.gz"
    lying.write_bytes(BASELINE_SAMPLE.read_bytes())
    make_mirror(mirror, {"updatefiles": [broken, lying]})
    (mirror / "updatefiles" / "pubmed21n1301.xml.gz.md5").write_text(f"MD5(pubmed21n1301.xml.gz)= {'0' * 32}\n")
    with NcbiServer(mirror) as server:
        state = ingest(server.url, selection={"attempts": 3, "backoff_s": 0.01}, return_state=True)
    assert state.is_failed()
    with pytest.raises(IngestIncomplete) as failure:
        state.result()
    message = str(failure.value)
    assert "2 of 4 files failed, so no snapshot was built" in message
    assert "pubmed21n1300.xml.gz: " in message and "line " in message and "gzip stream is truncated" in message
    assert "pubmed21n1301.xml.gz: md5 mismatch: expected " + "0" * 32 in message and "3 attempts" in message
    assert "Upstream task run" not in message
    assert store.ls("corpus") == []  # a snapshot missing an update file would miss its deletions
    assert sorted(p.label for p in store.ls("parse")) == ["pubmed20n0014.xml.gz", "pubmed21n1298.xml.gz"]

    # The fixed file is published again (and the lying one withdrawn); the next run parses only it.
    broken.write_bytes(gzip.compress(gzip.decompress(UPDATE_SAMPLE.read_bytes())))
    make_mirror(mirror, {"updatefiles": [broken]})
    for leftover in (mirror / "updatefiles").glob("pubmed21n1301*"):
        leftover.unlink()
    corpus = store.require(ingest(mirror))
    assert len(corpus.parents) == 3 and len(store.ls("download")) == 4  # the bad bytes stay a separate artifact


def _corpus_pmids(corpus) -> set[str]:
    return {str(p) for p in read_corpus(corpus.path, ["pmid"]).column("pmid").to_pylist()}


def test_an_ingest_killed_half_way_redoes_only_unfinished_files(mirror, store):
    with NcbiServer(mirror) as server:
        # The update file answers 503 for a while, so the run is caught between its two files.
        server.faults.status[UPDATE_PATH] = [503] * 4  # retried after 2, 4, 8, 16 s
        run = subprocess.Popen(
            [str(Path(sys.executable).with_name("medlm")), "ingest", "--source", server.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.time() + 120
        while not store.ls("parse") and time.time() < deadline and run.poll() is None:
            time.sleep(0.2)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        assert [a.label for a in store.ls("parse")] == ["pubmed20n0014.xml.gz"]
        assert store.ls("corpus") == []

        server.faults.status.clear()
        corpus_ref = ingest(server.url)
        assert len(server.requests_for(BASELINE_PATH)) == 1  # the finished file was not fetched again
        assert len([r for r in server.requests_for(UPDATE_PATH)]) >= 2
    assert sorted(p.label for p in store.ls("parse")) == ["pubmed20n0014.xml.gz", "pubmed21n1298.xml.gz"]
    assert set(store.require(corpus_ref).parents) == {p.ref for p in store.ls("parse")}


def test_an_empty_selection_is_explained(mirror, store):
    state = ingest(mirror, selection={"folders": ("updatefiles",), "updates_after": 9999}, return_state=True)
    assert state.is_failed() and "no PubMed files selected" in state.message and "updates_after=9999" in state.message


def test_a_corrupted_parsed_file_is_caught_before_the_snapshot_reads_it_then_rebuilt(mirror, store):
    first = store.require(ingest(mirror))
    [update] = [a for a in store.ls("parse") if a.label == "pubmed21n1298.xml.gz"]
    articles = update.file("articles.parquet")
    articles.chmod(0o644)
    with open(articles, "r+b") as f:  # two bytes flipped in the middle: same size, so only the hash tells
        f.seek(articles.stat().st_size // 2)
        f.write(b"\x00\xff")

    stricter = CorpusConfig(min_abstract_chars=300)  # a snapshot that must read the parsed files again
    state = ingest_flow(source=SourceConfig(source=str(mirror)), corpus=stricter, return_state=True)
    assert state.is_failed() and f"{articles}: sha256 differs from the manifest" in state.message
    assert [item["ref"] for item in store.quarantined()] == [update.ref]
    assert len(store.ls("corpus")) == 1  # nothing was built from the bad bytes

    rebuilt = store.require(ingest_flow(source=SourceConfig(source=str(mirror)), corpus=stricter))  # parses the file again
    assert rebuilt.ref != first.ref and store.problems(update.ref) == []
    assert rebuilt.summary["documents"] < first.summary["documents"]


def test_ingest_parses_on_a_dask_cluster_of_two_workers(mirror, store, monkeypatch):
    """prefect-dask's DaskTaskRunner on a LocalCluster of two worker processes: the parse tasks run
    there (they import the parse stage; this process's import does not count), into the same
    store, and the snapshot is the one parsing anywhere else gives. The cluster is this process's
    setting (MEDLM_DASK_ADDRESS), never a run parameter: Dask exchanges pickles."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        monkeypatch.setenv("MEDLM_DASK_ADDRESS", cluster.scheduler_address)
        state = ingest(mirror, return_state=True)
        monkeypatch.delenv("MEDLM_DASK_ADDRESS")
        parsed_on_workers = client.run(lambda: "tasks.parse" in sys.modules)
    assert state.is_completed(), state.message
    assert any(parsed_on_workers.values()), parsed_on_workers
    logs = run_logs(state.state_details.flow_run_id)
    assert f"parsing on the Dask cluster at {cluster.scheduler_address} (MEDLM_DASK_ADDRESS)" in logs["prefect.flow_runs"]
    states = task_run_states(state.state_details.flow_run_id)
    assert states["parse pubmed20n0014.xml.gz"] == states["parse pubmed21n1298.xml.gz"] == "Completed"
    assert sorted(a.label for a in store.ls("parse")) == ["pubmed20n0014.xml.gz", "pubmed21n1298.xml.gz"]

    in_process = ingest(mirror, parse=ParseConfig(workers=1))
    assert in_process == state.result()  # found in the store: the same artifact


def test_a_bad_exclusion_list_fails_before_anything_is_downloaded_and_is_never_quoted(mirror, store, tmp_path):
    listed = tmp_path / "exclude.txt"
    listed.write_text("31688362\nTOPSECRET-4711 is not a PMID\n")
    with NcbiServer(mirror) as server:
        state = ingest(server.url, corpus=CorpusConfig(exclude_pmids_file=str(listed)), return_state=True)
        assert server.requests == []  # not even the listing
    expected = f"exclude_pmids_file {listed}, line 2: not a PMID; expected one PMID (ASCII digits) per line, blank lines and # comments"
    assert state.is_failed() and state.message.endswith(expected), state.message
    logs = run_logs(state.state_details.flow_run_id)
    assert "TOPSECRET" not in state.message + "".join(line for lines in logs.values() for line in lines)
    assert store.ls() == []


def test_the_pipeline_reads_its_qa_files_before_anything_is_downloaded(mirror, store, tmp_path):
    from flows.pipeline import pipeline
    from tasks.qa import QASources

    bad = tmp_path / "medqa_test.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')  # instruction-shaped: not MedQA
    with NcbiServer(mirror) as server:
        state = pipeline(source=SourceConfig(source=server.url), qa=QASources(medqa=str(bad)), return_state=True)
        assert server.requests == []
    assert state.is_failed() and f"{bad}, line 1: no field 'options' or 'option_A' (fields: answer, question)" in state.message
    assert store.ls("download") == []
