"""store-gc: remove the artifacts nothing kept needs (storage/retention.py), as `medlm store gc` does.

Deployed as `store-gc/nightly-gc` with its schedule off: switch it on in the UI, with dry_run
off, to have each night's old snapshots removed after the nightly ingest. A dry run (the
default) only publishes what it would remove.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from storage import Store
from storage.retention import plan_removal, remove


@flow(name="store-gc")
def store_gc(
    *,
    keep_last: Annotated[int, Field(ge=1, description="Keep the newest N artifacts of each kind, and everything they came from.")] = 3,
    min_age_hours: Annotated[float, Field(ge=0, description="Never remove an artifact younger than this.")] = 24,
    dry_run: Annotated[bool, Field(description="Only say what would be removed.")] = True,
) -> list[str]:
    """Remove old artifacts that nothing kept needs; returns the refs removed (or, in a dry run, that would be)."""
    store = Store()
    plan = plan_removal(store, keep_last, min_age_s=min_age_hours * 3600)
    lines = plan.lines()
    get_run_logger().info("%s%s", "dry run: " if dry_run else "", lines[-1])
    create_markdown_artifact(
        key="store-gc", description=("would remove: " if dry_run else "removed: ") + lines[-1],
        markdown="```\n" + "\n".join(lines) + "\n```\n" + ("\n(a dry run: nothing was removed)\n" if dry_run else ""),
    )
    return [a.ref for a in plan.remove] if dry_run else remove(store, plan)
