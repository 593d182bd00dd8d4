"""Stage tasks as Prefect materializations, with the artifact store as the only cache."""

from __future__ import annotations

import functools
from typing import Sequence

from prefect.assets import Asset, add_asset_metadata
from prefect.states import Completed
from prefect.tasks import MaterializingTask, Task

from storage import Artifact


def asset_key(*parts: str) -> str:
    """The Prefect asset for an artifact role, e.g. asset_key("corpus") -> "medlm://corpus"."""
    return "medlm://" + "/".join(parts)


def materializing(task: Task, asset: str, deps: Sequence[str] = (), **options) -> MaterializingTask:
    """``task`` as a materialization of ``asset`` that depends on ``deps``.

    The store decides whether work is needed: when the stage found its artifact already built,
    the run ends Cached (Prefect then emits no asset event, as nothing new was made); when it
    built it, the artifact's ref and summary become the materialization's metadata. Run it with
    ``.submit()``: called directly, a task that returns a State hands back the State itself.
    """

    @functools.wraps(task.fn)
    def run(*args, **kwargs):
        artifact: Artifact = task.fn(*args, **kwargs)
        if artifact.reused:
            return Completed(name="Cached", message=f"{artifact.ref} was already in the store", data=artifact)
        add_asset_metadata(asset, {"ref": artifact.ref, "path": str(artifact.path), **artifact.summary})
        return artifact

    return MaterializingTask(
        run,
        assets=[Asset(key=asset)],
        asset_deps=list(deps),
        name=task.name,
        retries=task.retries,
        retry_delay_seconds=task.retry_delay_seconds,
        **options,
    )
