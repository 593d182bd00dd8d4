"""Stages as Prefect tasks, derived from their declarations (``storage.stage.Stage``).

    downloaded = submit(DOWNLOAD, {}, remote, label=remote.name)
    parsed = submit(PARSE, {"download": downloaded}, ParseConfig(), label=remote.name)

Each stage is one task named after it, materializing the asset ``medlm://<stage>``; its asset
dependencies come from its inputs (Prefect infers them from upstream futures; an input given as
an artifact adds its kind's asset). The artifact store is the only cache: a stage whose artifact
is already stored ends ``Cached`` (and, as nothing new was made, emits no asset event); one that
builds it attaches the artifact's ref, label, parents and counts to the materialization event.
Where the store lives is the process's setting (``MEDLM_STORE``), never a run parameter.
"""

from __future__ import annotations

import functools
import json
from typing import Callable

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.assets import Asset, add_asset_metadata
from prefect.futures import PrefectFuture
from prefect.states import Completed
from prefect.tasks import MaterializingTask

from storage import Artifact, Stage, Store, write_text_atomic
from storage.lineage import lineage, markdown

ASSET_SCHEME = "medlm://"


def asset_key(stage_name: str) -> str:
    """The Prefect asset of a stage's artifacts: medlm://corpus."""
    return ASSET_SCHEME + stage_name


@functools.cache
def stage_task(stage: Stage) -> MaterializingTask:
    """The Prefect task that runs ``stage`` through the store."""

    def run(inputs: dict, config) -> Artifact:
        artifact = stage.run(Store(), inputs, config)
        if stage.report is not None:
            create_table_artifact(
                key=stage.name, table=stage.report(artifact), description=" ".join(filter(None, [artifact.ref, artifact.label]))
            )
        if artifact.reused:
            return Completed(name="Cached", message=f"{artifact.ref} was already in the store", data=artifact)
        metadata = {"ref": artifact.ref, "label": artifact.label, "parents": artifact.parents, "params": artifact.params}
        add_asset_metadata(asset_key(stage.name), metadata | artifact.summary)
        return artifact

    run.__name__ = run.__qualname__ = stage.name
    retries = {"retries": 2, "retry_delay_seconds": [60, 600], "retry_condition_fn": retry_when(stage.retry_if)} if stage.retry_if else {}
    return MaterializingTask(run, assets=[Asset(key=asset_key(stage.name))], name=stage.name, tags=[stage.name], **retries)


def retry_when(worth_retrying: Callable[[BaseException], bool]):
    """A Prefect retry condition from a predicate on the exception a task raised."""

    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except Exception as error:
            return worth_retrying(error)
        return False

    return condition


def submit(stage: Stage, inputs: dict, config, *, label: str | None = None) -> PrefectFuture:
    """Start ``stage`` on ``inputs`` (artifacts or futures of other stages); the future of its Artifact.

    Run it this way, not by calling the task: called directly, a task whose function returns a
    State (Cached) hands back the State itself.
    """
    given = [value for v in inputs.values() for value in (v if isinstance(v, list) else [v])]
    deps = sorted({asset_key(a.kind) for a in given if isinstance(a, Artifact)})
    task = stage_task(stage).with_options(task_run_name=f"{stage.name} {label}" if label else stage.name, asset_deps=deps or None)
    return task.submit(inputs, config)


def run_stage(stage: Stage, inputs: dict, config, *, label: str | None = None) -> Artifact:
    """``submit`` and wait: the stage's artifact (its exception, if the stage failed)."""
    return submit(stage, inputs, config, label=label).result()


def publish_lineage(ref: str) -> None:
    """The artifact's lineage as a markdown artifact of this run (the open-source UI has no asset
    graph: this is where a user sees it), down to the source files and their md5s; the whole
    lineage, every file listed, is written as JSON under STORE/.lineage and linked from it."""
    store = Store()
    root = lineage(store, ref)
    full = store.root / ".lineage" / f"{root.kind}-{ref.split('/')[1]}.json"
    full.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(full, json.dumps(root.as_dict(), indent=1) + "\n")
    create_markdown_artifact(
        key=f"lineage-{root.kind}", markdown=markdown(root, full.resolve().as_uri()), description=f"Lineage of {ref}"
    )
