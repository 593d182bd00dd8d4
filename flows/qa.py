"""qa: QA datasets (PubMedQA, MedMCQA, MedQA, instruction data) -> canonical records, one artifact each."""

from __future__ import annotations

from prefect import flow
from prefect.futures import wait

from flows.stage import failure, submit
from storage import Artifact
from tasks.qa import QA, QASources


def convert(sources: QASources) -> dict[str, Artifact]:
    """Convert every source given, each a qa task, all at once: name -> its artifact.

    All of them finish before a failure is raised: one still running would be cancelled with a
    traceback, and one that finished is in the store for the next run. One failure is raised as
    it is; several are named together.
    """
    configs = sources.configs()
    if not configs:
        raise ValueError("no QA data given: set at least one of pubmedqa, medmcqa, medqa, instructions (a file or folder)")
    futures = {name: submit(QA, {}, config, label=name) for name, config in configs.items()}
    wait(list(futures.values()))
    failed = [name for name, future in futures.items() if not future.state.is_completed()]
    if len(failed) == 1:
        futures[failed[0]].result()  # raises its exception
    if failed:
        raise ValueError(f"{len(failed)} QA sources failed: " + "; ".join(f"{name}: {failure(futures[name])}" for name in failed))
    return {name: future.result() for name, future in futures.items()}


@flow(name="qa")
def qa(*, qa: QASources = QASources()) -> list[str]:  # named as the pipeline's table, so `medlm qa --config` reads [qa]
    """Convert the QA datasets into canonical records; returns their refs."""
    return [artifact.ref for artifact in convert(qa).values()]
