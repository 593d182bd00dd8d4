"""Stages as Prefect tasks, derived from their declarations (``storage.stage.Stage``).

    downloaded = submit(DOWNLOAD, {}, remote, label=remote.name)
    parsed = submit(PARSE, {"download": downloaded}, ParseConfig(), label=remote.name)

Each stage is one task named after it, materializing the asset ``medlm://<stage>``; its asset
dependencies come from its inputs (Prefect infers them from upstream futures; an input given as
an artifact adds its kind's asset, unless the input does not decide the content, such as the
previous snapshot an incremental build starts from). The artifact store is the only cache: a
stage whose artifact is already stored ends ``Cached`` (and, as nothing new was made, emits no
asset event); one that builds it attaches the artifact's ref, label, parents and counts to the
materialization event.
Where the store lives is the process's setting (``MEDLM_STORE``), never a run parameter.

CPU-bound builds (parsing: lxml holds the GIL) run in worker processes: stage tasks submitted
inside ``builds_in_processes(n, STAGE)`` keep their Prefect side in a thread of the flow's
process and hand the pure build function to one of ``n`` processes forked from a server that
has imported the stage's module once, so a worker starts in milliseconds and holds only what
the build uses (no Prefect, no other stage).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import multiprocessing
import os
import sys
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.assets import Asset, add_asset_metadata
from prefect.client.schemas.objects import TaskRunResult
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.states import Completed
from prefect.task_runners import TaskRunner
from prefect.tasks import MaterializingTask

from storage import Artifact, Stage, Store, write_text_atomic
from storage.lineage import lineage, markdown
from storage.processes import die_with_parent
from storage.progress import REPORTER

ASSET_SCHEME = "medlm://"
_BUILD_PROCESSES: ContextVar[Executor | None] = ContextVar("medlm_build_processes", default=None)


def asset_key(stage_name: str) -> str:
    """The Prefect asset of a stage's artifacts: medlm://corpus."""
    return ASSET_SCHEME + stage_name


@functools.cache
def stage_task(stage: Stage) -> MaterializingTask:
    """The Prefect task that runs ``stage`` through the store."""

    def run(inputs: dict, config) -> Artifact:
        store, run = Store(), _root_flow_run()
        if run:
            store.hold(run, [a.ref for value in inputs.values() for a in (value if isinstance(value, list) else [value]) if isinstance(a, Artifact)])
        with progress_on_the_run_page():  # the build's progress, on this task run's page
            artifact = stage.run(store, inputs, config, build_in=_build_processes())
        if run:
            store.hold(run, [artifact.ref])
        if stage.report is not None:
            create_table_artifact(
                key=stage.name, table=stage.report(artifact), description=" ".join(filter(None, [artifact.ref, artifact.label]))
            )
        if "loss.png" in artifact.manifest.get("files", {}):  # a training stage's loss curve, in the page itself
            png = base64.b64encode(artifact.file("loss.png").read_bytes()).decode()
            create_image_artifact(f"data:image/png;base64,{png}", key=f"loss-{stage.name}", description=f"loss curve of {artifact.ref}")
        if artifact.reused:
            return Completed(name="Cached", message=f"{artifact.ref} was already in the store", data=artifact)
        metadata = {"ref": artifact.ref, "label": artifact.label, "parents": artifact.parents, "params": artifact.params}
        add_asset_metadata(asset_key(stage.name), metadata | artifact.summary)
        return artifact

    run.__name__ = run.__qualname__ = stage.name
    retries = {"retries": 2, "retry_delay_seconds": [60, 600], "retry_condition_fn": retry_when(stage.retry_if)} if stage.retry_if else {}
    return MaterializingTask(run, assets=[Asset(key=asset_key(stage.name))], name=stage.name, **retries)


def _root_flow_run() -> str | None:
    """The flow run at the top of this task's (a pipeline, not its ingest subflow), whose lease
    keeps what its stages make or read from retention until it ends (``Store.hold``); None in a
    process that is not the flow's (a Dask worker lives on after the run)."""
    context = FlowRunContext.get()
    if context is None or context.detached:
        return None
    flow_run = context.flow_run
    if flow_run.parent_task_run_id is None:
        return str(flow_run.id)
    if str(flow_run.id) not in _ROOTS:
        from prefect.runtime.flow_run import get_root_flow_run_id

        _ROOTS[str(flow_run.id)] = str(get_root_flow_run_id())
    return _ROOTS[str(flow_run.id)]


_ROOTS: dict[str, str] = {}  # a subflow run's id -> its top flow run's


@contextmanager
def progress_on_the_run_page() -> Iterator[None]:
    """Progress reported in this block (storage/progress.py) becomes Prefect progress artifacts of
    the current run, one per kind of work, the latest progress line as the description. Progress
    is never worth failing the work for: an API error is logged and the work goes on."""
    ids: dict[str, object] = {}

    def report(what: str, fraction: float, line: str) -> None:
        try:
            if what in ids:
                update_progress_artifact(ids[what], 100 * fraction, description=line)
            else:
                ids[what] = create_progress_artifact(100 * fraction, key=_artifact_key(what), description=line)
        except Exception as error:  # noqa: BLE001 - the server's trouble, not the work's
            logging.getLogger("medlm.progress").debug("progress not reported (%s): %s", error, line)

    token = REPORTER.set(report)
    try:
        yield
    finally:
        REPORTER.reset(token)


def _artifact_key(what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for a kind of work: "fine-tuning"."""
    return "progress-" + "".join(c if c.isalnum() else "-" for c in what.lower())


def retry_when(worth_retrying: Callable[[BaseException], bool]):
    """A Prefect retry condition from a predicate on the exception a task raised."""

    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except Exception as error:
            return worth_retrying(error)
        return False

    return condition


@contextmanager
def builds_in_processes(workers: int, stage: Stage) -> Iterator[None]:
    """Stage tasks submitted in this block build in ``workers`` worker processes (Prefect's task
    runners copy the context into the threads that run tasks, and with it this pool). The
    processes fork from Python's forkserver, which imports ``stage``'s module when it starts (the
    first time in the process, so name the stage that will use it). A worker also runs the main
    module again (multiprocessing's rule): the ``medlm`` command's is a two-line script and a
    package's ``__main__`` is skipped, but a flow run from a Prefect worker is ``python -m
    prefect.engine``, so the server imports such a module too, once, rather than every worker.
    The server and the workers die with the flow's process, SIGKILL included (storage/dies_with_parent.py)."""
    main = getattr(getattr(sys.modules["__main__"], "__spec__", None), "name", None)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["storage.dies_with_parent", stage.build.__module__, *([main] if main and not main.endswith("__main__") else [])])
    os.environ["MEDLM_PARENT_PID"] = str(os.getpid())  # for the server, started from here (storage/dies_with_parent.py)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=die_with_parent) as pool:
        token = _BUILD_PROCESSES.set(pool)
        try:
            yield
        finally:
            _BUILD_PROCESSES.reset(token)


def _build_processes() -> Executor | None:
    """The worker processes of the enclosing ``builds_in_processes`` block, if any. (A function:
    a task shipped to a Dask worker is pickled with what it names, and a ContextVar does not pickle.)"""
    return _BUILD_PROCESSES.get()


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

    ``runner``: a started task runner other than the flow's own, e.g. the threads that wait on the
    parse worker processes, or the Dask cluster. Give such a runner artifacts, not futures (a
    Dask worker cannot wait on this process's futures), and the future an input came from as
    ``after``, which keeps the edge in the run graph.
    """
    given = [a for role, v in inputs.items() if stage.inputs[role].keyed for a in (v if isinstance(v, list) else [v])]
    deps = sorted({asset_key(a.kind) for a in given if isinstance(a, Artifact)})
    task = stage_task(stage).with_options(task_run_name=f"{stage.name} {label}" if label else stage.name, asset_deps=deps or None)
    if runner is None:
        return task.submit(inputs, config)
    upstream = {"inputs": {TaskRunResult(id=after.task_run_id)}} if after is not None else None
    return runner.submit(task, {"inputs": inputs, "config": config}, dependencies=upstream)


def failure(future: PrefectFuture) -> str:
    """What went wrong in a task, as its exception says it (never "upstream failed")."""
    error = future.state.result(raise_on_failure=False)
    return str(error) if isinstance(error, BaseException) else (future.state.message or future.state.name)


def run_stage(stage: Stage, inputs: dict, config, *, label: str | None = None) -> Artifact:
    """``submit`` and wait: the stage's artifact (its exception, if the stage failed). A training
    on several nodes then tells the other nodes' `medlm join` that there is nothing (more) to join,
    also when the artifact was in the store already and nothing was launched."""
    artifact = submit(stage, inputs, config, label=label).result()
    if getattr(where := getattr(config, "run", None), "nodes", 1) > 1:
        from model.distributed import announce_ended

        announce_ended(where.rdzv_id, artifact.ref)
    return artifact


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
        key=f"lineage-{root.kind}", markdown=markdown(root, str(full.resolve())), description=f"Lineage of {ref}"
    )


RESULT = "result"  # the key of the artifact in which a flow run leaves its result for whoever started it


def publish_result(ref: str) -> str:
    """A flow's result (a ref), as an artifact of its run: what a pipeline that ran this flow on
    another machine's pool reads back (flows/pipeline.py), and what a person sees it made. Returns ``ref``."""
    create_markdown_artifact(key=RESULT, markdown=f"`{ref}`", description=ref)
    return ref


def read_result(flow_run_id) -> str:
    """The result a finished flow run published (``publish_result``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[RESULT])))
    if not found:
        raise RuntimeError(f"flow run {flow_run_id} published no result")
    return max(found, key=lambda a: a.created).description
