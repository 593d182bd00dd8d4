"""ingest: list -> download (a task per file, concurrent) -> parse (a task per file) -> corpus snapshot.

Every stage goes through the artifact store, so a nightly run downloads and parses only the new
update files and rebuilds the snapshot, and a run killed half-way redoes only unfinished files.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from flows.stage import publish_lineage, retry_when, run_stage, submit
from tasks.corpus import CORPUS, CorpusConfig
from tasks.download import DOWNLOAD, SourceConfig, is_transient, select_files
from tasks.parse import PARSE, ParseConfig


class IngestIncomplete(RuntimeError):
    """Some files failed. No snapshot is built: one without, say, an update file would miss its
    revisions and deletions, and would still become the newest snapshot that training picks up.
    The other files are in the store, so the next run redoes only the failed ones."""


list_remote = task(select_files, name="list-remote", retries=2, retry_delay_seconds=30, retry_condition_fn=retry_when(is_transient))


@flow(name="ingest", task_runner=ThreadPoolTaskRunner(max_workers=4))
def ingest(source: SourceConfig = SourceConfig(), corpus: CorpusConfig = CorpusConfig()) -> str:
    """Bring the corpus snapshot up to date with the source (NCBI or a mirror); returns its ref."""
    log = get_run_logger()
    remotes = list_remote(source)
    log.info("%d files selected from %s", len(remotes), source.source)
    if not remotes:
        raise ValueError(f"no PubMed files selected at {source.source} with {source}; a snapshot needs at least one")

    chains = {}
    for remote in remotes:
        downloaded = submit(DOWNLOAD, {}, remote, label=remote.name)
        chains[remote.name] = (downloaded, submit(PARSE, {"download": downloaded}, ParseConfig(), label=remote.name))

    parsed, failures = [], {}
    for name, (downloaded, parsing) in chains.items():
        parsing.wait()
        if parsing.state.is_completed():
            parsed.append(parsing.result())
        else:
            failures[name] = _first_failure(downloaded, parsing)
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

    snapshot = run_stage(CORPUS, {"parsed": parsed}, corpus)
    log.info("corpus snapshot %s: %s documents from %d files", snapshot.ref, f"{snapshot.summary['documents']:,}", len(parsed))
    publish_lineage(snapshot.ref)
    return snapshot.ref


def _first_failure(*chain: PrefectFuture) -> str:
    """What went wrong first in a file's chain of tasks, as the exception says it (not "upstream failed")."""
    for future in chain:
        future.wait()
        if not future.state.is_completed():
            error = future.state.result(raise_on_failure=False)
            return str(error) if isinstance(error, BaseException) else (future.state.message or future.state.name)
    return "unknown failure"
