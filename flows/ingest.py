"""ingest: list -> download (a task per file, concurrent) -> parse (a task per file) -> corpus snapshot.

Every stage goes through the artifact store, so a nightly run downloads and parses only the new
update files and rebuilds the snapshot, and a run killed half-way redoes only unfinished files.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.stage import asset_key, materializing
from storage import Store
from tasks.corpus import CorpusFilters, snapshot_task
from tasks.download import DEFAULT_BASE_URL, RemoteFile, download_task, list_remote_task
from tasks.parse import parse_task


class IngestIncomplete(RuntimeError):
    """Some files failed. No snapshot is built: one without, say, an update file would miss its
    revisions and deletions, and would still become the newest snapshot that training picks up.
    The other files are in the store, so the next run redoes only the failed ones."""


@flow(name="ingest", task_runner=ThreadPoolTaskRunner(max_workers=4))
def ingest(
    source: str = DEFAULT_BASE_URL,
    folders: tuple[str, ...] = ("baseline", "updatefiles"),
    baseline_limit: int | None = None,
    updates_after: int | None = None,
    names: list[str] | None = None,
    filters: CorpusFilters = CorpusFilters(),
    store_root: str | None = None,
) -> str:
    """Bring the corpus snapshot up to date with ``source`` (NCBI's URL or a local mirror); returns its ref."""
    log = get_run_logger()
    store = Store(store_root)
    remotes: list[RemoteFile] = list_remote_task(
        source, folders=folders, baseline_limit=baseline_limit, updates_after=updates_after, names=names
    )
    log.info("%d files selected from %s", len(remotes), source)
    if not remotes:
        raise ValueError(
            f"no PubMed files selected at {source} (folders={list(folders)}, baseline_limit={baseline_limit}, "
            f"updates_after={updates_after}, names={names}); a snapshot needs at least one"
        )

    parsed_futures = {}
    for remote in remotes:
        download = materializing(download_task, asset_key("pubmed", remote.name), task_run_name=f"download {remote.name}")
        parse = materializing(
            parse_task, asset_key("parsed", remote.name), [asset_key("pubmed", remote.name)], task_run_name=f"parse {remote.name}"
        )
        parsed_futures[remote.name] = parse.submit(store, download.submit(store, remote))

    parsed, failures = [], {}
    for name, future in parsed_futures.items():
        future.wait()
        if future.state.is_completed():
            parsed.append(future.result())
        else:
            failures[name] = future.state.message or future.state.name
    if failures:
        lines = "\n".join(f"| `{name}` | {reason} |" for name, reason in sorted(failures.items()))
        create_markdown_artifact(
            key="ingest-failures",
            markdown=f"# Files that failed\n\n| file | error |\n| --- | --- |\n{lines}\n\n"
            f"No snapshot was built; the other {len(parsed)} files are in the store for the next run.",
        )
        raise IngestIncomplete(
            f"{len(failures)} of {len(remotes)} files failed, so no snapshot was built "
            f"(the other {len(parsed)} are stored): " + "; ".join(f"{name}: {reason}" for name, reason in sorted(failures.items()))
        )

    snapshot = materializing(
        snapshot_task, asset_key("corpus"), [asset_key("parsed", a.params["source_file"]) for a in parsed], task_run_name="corpus-snapshot"
    )
    corpus = snapshot.submit(store, parsed, filters).result()
    log.info("corpus snapshot %s: %s documents from %d files", corpus.ref, f"{corpus.summary['documents']:,}", len(parsed))
    return corpus.ref
