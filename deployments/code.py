"""Which code a host runs: its commit, and the versions of the stages it would build with.

Every host of a cluster runs its own copy of the repository (the head that registers the
deployments, each worker). The same commit everywhere is checked, not assumed: the registration
records the head's stage versions on the server (a Prefect variable), a worker says which commit
it runs when it starts, and a flow run whose worker builds with other stage versions than the
server's deployments were registered with is refused, naming the stages that differ. Stage
versions, not commits, decide: they are what decides an artifact's bytes (its key); a commit that
changed a README changes nothing a run makes.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIABLE = "medlm_stage_versions"  # on the server: {"commit": ..., "stages": {name: version}}


def commit() -> str:
    """This copy's git commit (with "+changes" when its files differ from it), or "unknown"."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+changes" if changed else "")


def stage_versions() -> dict[str, str]:
    """Every stage's name and version, as this copy declares them (every module of ``tasks``)."""
    import tasks
    from storage.stage import Stage

    found = {}
    for module in pkgutil.walk_packages(tasks.__path__, "tasks."):
        for value in vars(importlib.import_module(module.name)).values():
            if isinstance(value, Stage):
                found[value.name] = value.version
    return dict(sorted(found.items()))


def record() -> dict:
    return {"commit": commit(), "stages": stage_versions()}


def differences(registered: dict, here: dict) -> str | None:
    """Why a worker with ``here`` must not run what was registered as ``registered``; None if it may."""
    theirs, ours = registered.get("stages", {}), here["stages"]
    differ = sorted(name for name in set(theirs) | set(ours) if theirs.get(name) != ours.get(name))
    if not differ:
        return None
    listed = ", ".join(f"{name} {ours.get(name, 'absent')} here, {theirs.get(name, 'absent')} there" for name in differ)
    return (f"this worker (commit {here['commit']}) builds with other stage versions than the deployments were registered with "
            f"(commit {registered.get('commit')}): {listed}. Run the same commit on this host, or register the deployments "
            f"again from this one (make up)")
