"""qa: QA datasets (PubMedQA, MedMCQA, MedQA, instruction data) -> canonical records, one artifact each."""

from __future__ import annotations

from prefect import flow
from prefect.futures import PrefectFuture

from flows.stage import submit
from tasks.qa import QA, QASources


def convert(sources: QASources) -> dict[str, PrefectFuture]:
    """Start the qa stage on every source given: name -> the future of its artifact."""
    configs = sources.configs()
    if not configs:
        raise ValueError("no QA data given: set at least one of pubmedqa, medmcqa, medqa, instructions (a file or folder)")
    return {name: submit(QA, {}, config, label=name) for name, config in configs.items()}


@flow(name="qa")
def qa(sources: QASources = QASources()) -> list[str]:
    """Convert the QA datasets into canonical records; returns their refs."""
    return [future.result().ref for future in convert(sources).values()]
