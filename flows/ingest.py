"""ingest: list -> download (a task per file) -> parse (a task per file) -> corpus snapshot.

Downloads are network-bound and run a few at a time in the flow's threads. Parsing is CPU-bound
and lxml holds the GIL, so each file is parsed, as soon as it is downloaded, in a worker process
on this machine (one per core) or on a Dask cluster (prefect-dask's DaskTaskRunner);
``MEDLM_DASK_ADDRESS`` (the worker's setting) says which. Every stage goes through the artifact store, so a
nightly run downloads and parses only the new update files, and the snapshot starts from the
previous one and applies only them; a run killed half-way redoes only unfinished files.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Iterator

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.stage import builds_in_processes, failure, progress_on_the_run_page, publish_lineage, publish_result, retry_when, run_stage, submit
from storage import Artifact, Store
from storage.access import DASK_SETTING, dask_address
from storage.processes import usable_cores
from storage.progress import Progress
from tasks.corpus import CORPUS, CorpusConfig
from tasks.download import DOWNLOAD, SourceConfig, is_transient, select_files
from tasks.parse import PARSE, ParseConfig

DOWNLOADS_AT_ONCE = 4  # NCBI's server is shared by everyone: a few transfers at a time


class IngestIncomplete(RuntimeError):
    """Some files failed. No snapshot is built: one without, say, an update file would miss its
    revisions and deletions, and would still become the newest snapshot that training picks up.
    The other files are in the store, so the next run redoes only the failed ones."""


list_remote = task(select_files, name="list-remote", retries=2, retry_delay_seconds=30, retry_condition_fn=retry_when(is_transient))


@flow(name="ingest", task_runner=ThreadPoolTaskRunner(max_workers=DOWNLOADS_AT_ONCE))
def ingest(*, source: SourceConfig = SourceConfig(), corpus: CorpusConfig = CorpusConfig(), parse: ParseConfig = ParseConfig()) -> str:
    """Bring the corpus snapshot up to date with the source (NCBI or a mirror); returns its ref."""
    log = get_run_logger()
    if excluded := corpus.excluded():  # the exclusion list is read now: a bad one fails before any download
        log.info("%d PMIDs excluded by name", len(excluded))
    carried: list[Artifact] = []
    if source.new_files_only and (base := _snapshot_with_baseline(Store())) is not None:
        carried = [Store().require(ref) for ref in base.parents]
        newest = max(a.summary["file_seq"] for a in carried)
        log.info("building on %s (%d files, the newest update %d): listing only newer update files", base.ref, len(carried), newest)
        source = replace(source, folders=("updatefiles",), updates_after=max(newest, source.updates_after or 0))
    remotes = list_remote(source)
    log.info("%d files selected from %s", len(remotes), source.source)
    if not remotes and not carried:
        raise ValueError(f"no PubMed files selected at {source.source} with {source}; a snapshot needs at least one")

    downloads = [(remote.name, submit(DOWNLOAD, {}, remote, label=remote.name)) for remote in remotes]
    with progress_on_the_run_page():
        parsed, failures = parse_as_downloaded(downloads, parse)
    if failures:
        rows = "\n".join(f"| `{name}` | {reason} |" for name, reason in sorted(failures.items()))
        create_markdown_artifact(
            key="ingest-failures",
            markdown=f"# Files that failed\n\n| file | error |\n| --- | --- |\n{rows}\n\n"
            f"No snapshot was built; the other {len(parsed)} files are in the store for the next run.",
        )
        raise IngestIncomplete(
            f"{len(failures)} of {len(remotes)} files failed, so no snapshot was built "
            f"(the other {len(parsed)} are stored; a rerun redoes only the failed ones): "
            + "; ".join(f"{name}: {reason}" for name, reason in sorted(failures.items()))
        )

    parsed = carried + parsed
    inputs = {"parsed": parsed, "previous": CORPUS.previous(Store(), {"parsed": parsed}, corpus)}
    snapshot = run_stage(CORPUS, inputs, corpus)
    log.info("corpus snapshot %s: %s documents from %d files", snapshot.ref, f"{snapshot.summary['documents']:,}", len(parsed))
    publish_lineage(snapshot.ref)
    return publish_result(snapshot.ref)


def _snapshot_with_baseline(store: Store) -> Artifact | None:
    """The newest corpus snapshot built from baseline files (their downloads say which folder)."""
    from storage.lineage import lineage

    for snapshot in reversed(store.ls("corpus")):
        downloads = [p for parsed in lineage(store, snapshot.ref).parents for p in parsed.parents]
        if any(d.params.get("folder") == "baseline" for d in downloads):
            return snapshot
    return None


def parse_as_downloaded(downloads: list[tuple[str, PrefectFuture]], config: ParseConfig) -> tuple[list[Artifact], dict[str, str]]:
    """Parse each file on the parse runner as soon as its download is done.

    Returns the parse artifacts (in file order) and, by file name, what failed first in the
    chains that did not finish (the download's or the parse's error, never "upstream failed").
    """
    name_of = {id(future): name for name, future in downloads}
    parsing, failures = [], {}
    progress = Progress("ingest", len(downloads), "files downloaded and parsed", logging.getLogger("medlm.ingest"))
    with parse_runner(config) as runner:
        for downloaded in as_completed([future for _, future in downloads]):
            name = name_of[id(downloaded)]
            downloaded.wait()  # done: this only takes its final state in
            if downloaded.state.is_completed():
                parsing.append((name, submit(PARSE, {"download": downloaded.result()}, config, label=name, runner=runner, after=downloaded)))
            else:
                failures[name] = failure(downloaded)
        parsed = {}
        for done, (name, future) in enumerate(parsing, 1):
            future.wait()
            if future.state.is_completed():
                parsed[name] = future.result()
            else:
                failures[name] = failure(future)
            progress.update(done + len(downloads) - len(parsing), f"{name} {'failed' if name in failures else 'done'}")
    return [parsed[name] for name, _ in downloads if name in parsed], failures


@contextmanager
def parse_runner(config: ParseConfig) -> Iterator[TaskRunner]:
    """The task runner for the parse tasks, started. On a Dask cluster when this worker has one
    (``MEDLM_DASK_ADDRESS``: a setting of the process, never a run parameter, since Dask exchanges
    pickles); the whole task then runs on a Dask worker. Else ``workers`` processes on this machine
    (one per core by default), each task waiting in a thread here for its file's build in a
    process; one worker is the flow's own process."""
    log = get_run_logger()
    if address := dask_address():
        from prefect_dask import DaskTaskRunner  # imports distributed (~1 s): only when asked for

        log.info("parsing on the Dask cluster at %s (%s)", address, DASK_SETTING)
        with _api_for_workers(), DaskTaskRunner(address=address) as runner:
            yield runner
        return
    workers = config.workers or usable_cores()
    log.info("parsing in %s", f"{workers} worker processes" if workers > 1 else "the flow's own process")
    with ThreadPoolTaskRunner(max_workers=workers) as runner, builds_in_processes(workers, PARSE) if workers > 1 else nullcontext():
        yield runner


@contextmanager
def _api_for_workers() -> Iterator[None]:
    """Dask workers report their task runs to the flow's Prefect API. A flow on a temporary
    server (PREFECT_API_URL unset) would have each of them start a server of its own on the same
    database; name the flow's server for them instead (a LocalCluster reaches it; for remote
    workers, run a server they can reach and set PREFECT_API_URL)."""
    context = FlowRunContext.get()
    if PREFECT_API_URL.value() or context is None:
        yield
        return
    with temporary_settings({PREFECT_API_URL: str(context.client.api_url).rstrip("/")}):
        yield
