"""Retention: which artifacts a store (or its remote) can do without, and removing them on request.

    plan = plan_removal(store, keep_last=3)   # what would go, and why the rest stays
    print("\\n".join(plan.lines()))
    removed = remove(store, plan)            # only ever on the user's request (`medlm store gc --yes`)

On this machine's store a removal deletes local copies (the remote keeps its own); with
``on_remote`` the plan is over the remote's artifacts and a removal unpublishes their manifests,
then deletes the blobs no manifest names. Pins count on both; builds running now are this
machine's only, so on the remote the minimum age is what protects another machine's fresh work.

Of each kind, the newest ``keep_last`` artifacts are kept, and so is every artifact that is
pinned (``medlm store pin``), an ancestor of a kept one (a kept checkpoint keeps its shards, its
corpus and the XML files it came from), read by a build running now (its lock names what it
reads), made or read by a flow run still running (its lease, ``Store.hold``: a pipeline's QA
data, converted first, stays while it pretrains), or younger than ``min_age_s``. Nothing else is removed: an artifact that is not complete (quarantined, half-built)
is not the store's to judge here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from storage.store import Artifact, Store


@dataclass
class RemovalPlan:
    remove: list[Artifact]
    kept: dict[str, str] = field(default_factory=dict)  # ref -> why it stays
    bytes_freed: int = 0  # files that no kept artifact links to
    bytes_shared: int = 0  # files hard-linked from elsewhere: they stay on disk
    on_remote: bool = False
    min_age_s: float = 24 * 3600  # on the remote, blobs younger than this stay too (uploads under way)

    def lines(self) -> list[str]:
        """What goes (ref, size, label), then what stays and why, then the totals."""
        lines = [f"{a.ref:<32} {_size(sum(_bytes(a, self.on_remote))):>9}  {a.label or ''}" for a in self.remove]
        lines += [f"kept {ref:<27} {why}" for ref, why in sorted(self.kept.items())]
        shared = f" ({_size(self.bytes_shared)} more stays, hard-linked from kept artifacts)" if self.bytes_shared else ""
        lines.append(f"{len(self.remove)} artifact(s), {_size(self.bytes_freed)} freed{shared}; {len(self.kept)} kept")
        return lines


def plan_removal(store: Store, keep_last: int, *, kinds: list[str] | None = None, min_age_s: float = 24 * 3600,
                 on_remote: bool = False) -> RemovalPlan:
    """What ``remove`` would delete from ``store`` (or its remote) (nothing is touched)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    if on_remote and store.remote is None:
        raise ValueError("this store has no remote: set MEDLM_REMOTE")
    everything = (sorted((Artifact(*ref.split("/"), store.root / ref, store.remote.manifest(ref)) for ref in store.remote.refs()),
                         key=lambda a: (a.kind, a.manifest.get("created", 0)))
                  if on_remote else store.ls(local=True))
    by_ref = {a.ref: a for a in everything}
    kept: dict[str, str] = {}
    for kind in sorted({a.kind for a in everything}):
        newest = [a for a in everything if a.kind == kind][-keep_last:]  # ls sorts by creation time
        kept.update({a.ref: f"one of the {keep_last} newest {kind}" for a in newest})
    if kinds:
        kept.update({a.ref: "a kind not asked for" for a in everything if a.kind not in kinds})
    kept.update({ref: "pinned" for ref in store.pinned() if ref in by_ref})
    if not on_remote:
        kept.update({ref: "read by a build running now" for ref in store.reading_now() if ref in by_ref})
        kept.update({ref: f"made or read by flow run {run}, still running" for ref, run in store.held().items() if ref in by_ref})
    now = time.time()
    kept.update({a.ref: "younger than the minimum age" for a in everything if now - a.manifest.get("created", now) < min_age_s})
    for ref in list(kept):  # the ancestors of what stays, stay
        stack = [ref]
        while stack:
            for parent in by_ref[stack.pop()].parents:
                if parent in by_ref and parent not in kept:
                    kept[parent] = f"an ancestor of {ref}"
                    stack.append(parent)
    depth: dict[str, int] = {}

    def generation(ref: str) -> int:  # 0 for an artifact with no parent in the store
        if ref not in depth:
            depth[ref] = 1 + max((generation(p) for p in by_ref[ref].parents if p in by_ref), default=-1)
        return depth[ref]

    # Children before parents: a removal cut short never leaves an artifact whose parent is gone.
    remove = sorted((a for a in everything if a.ref not in kept), key=lambda a: -generation(a.ref))
    sizes = [_bytes(a, on_remote) for a in remove]
    return RemovalPlan(remove, kept, sum(alone for alone, _ in sizes), sum(shared for _, shared in sizes), on_remote, min_age_s)


def remove(store: Store, plan: RemovalPlan) -> list[str]:
    """Delete the plan's artifacts, children before parents; their refs."""
    for artifact in plan.remove:
        store.remote.remove(artifact.ref) if plan.on_remote else store.remove(artifact.ref)
    if plan.on_remote:
        store.remote.collect_blobs(plan.min_age_s)
    return [a.ref for a in plan.remove]


def _bytes(artifact: Artifact, on_remote: bool) -> tuple[int, int]:
    """(bytes only this artifact holds, bytes of its files that are hard-linked elsewhere too); on
    the remote, its manifest's sizes (a blob another artifact names too stays: gc counts them as it deletes)."""
    if on_remote:
        return sum(entry["size"] for entry in artifact.manifest.get("files", {}).values()), 0
    alone = shared = 0
    for name in artifact.manifest.get("files", {}):
        stat = Path(artifact.path, name).stat()
        if stat.st_nlink > 1:
            shared += stat.st_size
        else:
            alone += stat.st_size
    return alone, shared


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError
