"""Stages as Prefect tasks, derived from their declarations (``storage.stage.Stage``).

    downloaded = submit(DOWNLOAD, {}, remote, label=remote.name)
    parsed = submit(PARSE, {"download": downloaded}, ParseConfig(), label=remote.name)

Each stage is one task named after it, materializing the asset ``medlm://<stage>``; its asset
dependencies come from its inputs (Prefect infers them from upstream futures; an input given as
an artifact adds its kind's asset, unless the input does not decide the content, such as the
previous snapshot an incremental build starts from). The artifact store is the only cache: a stage whose artifact
is already stored ends ``Cached`` (and, as nothing new was made, emits no asset event); one that
builds it attaches the artifact's ref, label, parents and counts to the materialization event.
Where the store lives is the process's setting (``MEDLM_STORE``), never a run parameter.
"""

from __future__ import annotations

import functools

from prefect.artifacts import create_table_artifact
from prefect.assets import Asset, add_asset_metadata
from prefect.client.schemas.objects import TaskRunResult
from prefect.futures import PrefectFuture
from prefect.states import Completed
from prefect.task_runners import TaskRunner
from prefect.tasks import MaterializingTask

from storage import Artifact, Stage, Store

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
                key=stage.name, table=stage.report(artifact), description=f"{stage.name} {artifact.ref}: {artifact.label or ''}"
            )
        if artifact.reused:
            return Completed(name="Cached", message=f"{artifact.ref} was already in the store", data=artifact)
        metadata = {"ref": artifact.ref, "label": artifact.label, "parents": artifact.parents, "params": artifact.params}
        add_asset_metadata(asset_key(stage.name), metadata | artifact.summary)
        return artifact

    run.__name__ = run.__qualname__ = stage.name
    return MaterializingTask(run, assets=[Asset(key=asset_key(stage.name))], name=stage.name, retries=0)


def submit(
    stage: Stage,
    inputs: dict,
    config,
    *,
    label: str | None = None,
    runner: TaskRunner | None = None,
    after: PrefectFuture | None = None,
) -> PrefectFuture:
    """Start ``stage`` on ``inputs`` (artifacts or futures of other stages); the future of its Artifact.

    Run it this way, not by calling the task: called directly, a task whose function returns a
    State (Cached) hands back the State itself.

    ``runner``: a started task runner other than the flow's own, e.g. the worker processes or the
    Dask cluster that parse. Give such a runner artifacts, not futures (a Dask worker cannot wait
    on this process's futures), and the future an input came from as ``after``, which keeps the
    edge in the run graph.
    """
    given = [a for role, v in inputs.items() if stage.inputs[role].keyed for a in (v if isinstance(v, list) else [v])]
    deps = sorted({asset_key(a.kind) for a in given if isinstance(a, Artifact)})
    task = stage_task(stage).with_options(task_run_name=f"{stage.name} {label}" if label else stage.name, asset_deps=deps or None)
    if runner is None:
        return task.submit(inputs, config)
    upstream = {"inputs": {TaskRunResult(id=after.task_run_id)}} if after is not None else None
    return runner.submit(task, {"inputs": inputs, "config": config}, dependencies=upstream)


def run_stage(stage: Stage, inputs: dict, config, *, label: str | None = None) -> Artifact:
    """``submit`` and wait: the stage's artifact (its exception, if the stage failed)."""
    return submit(stage, inputs, config, label=label).result()
