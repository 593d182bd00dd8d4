"""Register medlm's work pools, deployments and (optional) automations on the Prefect server that
PREFECT_API_URL points at.

    python -m deployments.deploy [--config RUN_CONFIG] [--cron "0 6 * * *"] [--gpu-slots 1]
                                 [--pretrain-after-ingest] [--reset]

Deployments (their parameter forms come from the config dataclasses): `ingest/nightly-ingest`
(cron), `tokenize/tokenize`, `pretrain/pretrain`, `finetune/finetune`, `evaluate/evaluate`,
`release/release`, `pipeline/pipeline`, `join/join` (a multi-node run's other machines) and `store-gc/nightly-gc`
(its schedule registered off), to run from the UI or `prefect deployment run`.
A run configuration (flows/configs/*.toml, or your copy) sets their default parameters, e.g. a
mirror as the nightly source: that file is the place for changes you want to keep.

A deployment changed in the UI since it was last registered here (its parameters, schedule, pool
or tags) is kept as it is, and the run says so; `--reset` registers it afresh from the code and
the run configuration. Work pools (process type, created if missing): `cpu` for ingestion and
tokenizing, `gpu` for training, with at most `--gpu-slots` runs at once (one per GPU), whose job
template leaves the caller of a run no say in what the worker runs, with what environment or where
(`base_job_template`). Where the store lives is the workers' setting (MEDLM_STORE), never a
parameter: see deployments/serve.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import sys
from pathlib import Path

from deployments import code
from flows.registry import DEPLOYMENTS, NIGHTLY_CRON, current_name
from flows.prefect_env import apply_prefect_defaults
from storage.config import ArgumentParser

REPO = Path(__file__).resolve().parents[1]
POOLS = {"cpu": "PubMed ingestion, tokenizing, evaluation", "gpu": "Pretraining and fine-tuning"}
NIGHTLY_TIMEZONE = "UTC"


# pretrain follows the nightly data when --pretrain-after-ingest: a new snapshot starts tokenize, new shards start pretrain.
FOLLOW_UPS = (("medlm://corpus", "tokenize/tokenize"), ("medlm://shards", "pretrain/pretrain"))


def fingerprint(deployment) -> str:
    """What a user can change in the UI, hashed: kept as the deployment's version when we register it,
    so a later registration can tell whether someone changed it since."""
    schedules = sorted((s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules)
    state = [deployment.parameters, schedules, deployment.work_pool_name, sorted(deployment.tags), deployment.paused]
    return "medlm-" + hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:12]


# Prefect takes a flow run's job variables from whoever creates it, and a process pool's default
# template makes `command`, `env` and `working_dir` variables: any caller of the API could run a
# command on a worker, or undo its settings (MEDLM_SOURCES, MEDLM_DATA_ROOTS, MEDLM_STORE, AWS_*).
LOCKED_JOB_VARIABLES = ("command", "env", "working_dir")
ENGINE = "python -m deployments.engine"  # the worker's own interpreter comes first on its PATH (deployments/serve.py)


def base_job_template() -> dict:
    """The process pools' template: what a worker runs (our engine, deployments/engine.py), in what
    environment (the worker's) and where (the repository) are fixed; a caller may name the
    process and label it, nothing else (any other job variable is refused by the API)."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    for name in LOCKED_JOB_VARIABLES:
        template["job_configuration"].pop(name)
        template["variables"]["properties"].pop(name)
    template["job_configuration"]["command"] = ENGINE
    template["variables"]["additionalProperties"] = False
    return template


async def _ensure_pools(gpu_slots: int) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    async with get_client() as client:
        for name, description in POOLS.items():
            limit, template = gpu_slots if name == "gpu" else None, base_job_template()
            try:
                await client.create_work_pool(WorkPoolCreate(name=name, type="process", description=description, concurrency_limit=limit,
                                                             base_job_template=template))
            except ObjectAlreadyExists:  # a pool made before, perhaps with Prefect's default template: ours again
                await client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limit, base_job_template=template))


async def _read(name: str):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            return await client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


async def _stamp(deployment_id) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    async with get_client() as client:
        deployment = await client.read_deployment(deployment_id)
        await client.update_deployment(deployment_id, DeploymentUpdate(version=fingerprint(deployment)))


async def _follow_ups(enabled: bool) -> None:
    """Automations (off unless asked for): a materialized asset starts the next deployment."""
    from prefect.client.orchestration import get_client
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    async with get_client() as client:
        for asset, deployment_name in FOLLOW_UPS:
            deployment = await client.read_deployment_by_name(deployment_name)
            name = f"{asset} -> {deployment_name}"
            for old in await client.read_automations_by_name(name):
                await client.delete_automation(old.id)
            trigger = EventTrigger(
                expect={"prefect.asset.materialization.succeeded"}, match={"prefect.resource.id": asset},
                posture=Posture.Reactive, threshold=1,
            )
            automation = AutomationCore(
                name=name, description=f"When {asset} is materialized, run {deployment_name}.", enabled=enabled,
                trigger=trigger, actions=[RunDeployment(source="selected", deployment_id=deployment.id)],
            )
            await client.create_automation(automation)


def register(run_config: str | None = None, cron: str = NIGHTLY_CRON, gpu_slots: int = 1,
             pretrain_after_ingest: bool = False, reset: bool = False) -> list[str]:
    """Create the pools, deployments and automations; returns what was done, a line per deployment."""
    from prefect import Flow
    from prefect.schedules import Cron
    from prefect.variables import Variable

    from flows.cli import flow_parameters
    from storage.config import read_run_config

    asyncio.run(_ensure_pools(gpu_slots))
    Variable.set(code.VARIABLE, code.record(), overwrite=True)  # what the workers' engine checks its own code against
    tables = read_run_config(run_config) if run_config else {}
    report = []
    for d in DEPLOYMENTS:
        flow = Flow.from_source(source=str(REPO), entrypoint=d.entrypoint)
        full_name = f"{flow.name}/{d.deployment}"
        existing = asyncio.run(_read(full_name))
        if existing is not None and not reset and existing.version != fingerprint(existing):
            report.append(f"kept {full_name} as changed in the UI (--reset to register it again from the code and the run configuration)")
            continue
        configs, _ = flow_parameters(flow)
        parameters = {name: tables[name] for name in configs if name in tables}
        changed = changed_defaults(flow, configs, parameters)
        if d.cron == NIGHTLY_CRON:  # once the baseline is in, a night lists and fetches only the new update files
            parameters["source"] = {"new_files_only": True, **parameters.get("source", {})}
        schedule = cron if d.cron == NIGHTLY_CRON else d.cron
        with contextlib.redirect_stdout(io.StringIO()):  # Prefect's own table of it: ours (main) says it in one line
            deployment_id = flow.deploy(
                name=d.deployment, work_pool_name=d.pool, parameters=parameters,
                schedules=[Cron(schedule, timezone=NIGHTLY_TIMEZONE, active=d.schedule_on)] if schedule else None, tags=list(d.tags),
                description=d.description, print_next_steps=False,
            )
        asyncio.run(_stamp(deployment_id))
        report.append(f"deployed {full_name}" + (f" with defaults changed: {', '.join(changed)}" if changed else ""))
    asyncio.run(_follow_ups(pretrain_after_ingest))
    return report


def changed_defaults(flow, configs: dict[str, type], parameters: dict[str, dict]) -> list[str]:
    """The parameters whose run-configuration tables differ from the flow's own defaults."""
    import inspect

    from storage.config import make_config

    defaults = inspect.signature(flow.fn).parameters
    return [name for name, values in parameters.items() if make_config(configs[name], values, where=name) != defaults[name].default]


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="Run configuration whose tables become the deployments' default parameters.")
    parser.add_argument("--cron", default=NIGHTLY_CRON, help=f"Schedule of nightly-ingest (default {NIGHTLY_CRON!r}, {NIGHTLY_TIMEZONE}).")
    parser.add_argument("--gpu-slots", type=int, default=1, help="Runs the gpu pool takes at once (one per GPU).")
    parser.add_argument("--pretrain-after-ingest", action="store_true", help="Enable the automations: new snapshot -> tokenize, new shards -> pretrain.")
    parser.add_argument("--reset", action="store_true", help="Register every deployment again, even one changed in the UI.")
    args = parser.parse_args([current_name("option", arg) for arg in sys.argv[1:]])
    apply_prefect_defaults()
    report = register(args.config, args.cron, args.gpu_slots, args.pretrain_after_ingest, args.reset)
    print("\n".join(summary(report, args.config, args.cron)))


def summary(report: list[str], run_config: str | None, cron: str) -> list[str]:
    """What `make up` registered, one line per deployment: where it runs, when, where its defaults
    come from (the run configuration where it changed any), and whether it was registered now, with
    which defaults changed, or kept as changed in the UI."""
    lines = [f"{'deployment':<24} {'pool':<4}  {'schedule':<22} {'defaults from':<16} status"]
    for d, line in zip(DEPLOYMENTS, report):
        name, kept, changed = line.split()[1], line.startswith("kept"), line.partition(" with defaults changed: ")[2]
        when = "-" if not d.cron else f"{cron if d.cron == NIGHTLY_CRON else d.cron} UTC ({'on' if d.schedule_on else 'off'})"
        if kept:
            defaults, status = "the UI", "kept as changed in the UI (--reset registers it again)"
        elif changed:
            defaults, status = Path(run_config).name, f"registered, {changed} changed"
        else:
            defaults, status = "the code", "registered"
        lines.append(f"{name:<24} {d.pool:<4}  {when:<22} {defaults:<16} {status}")
    if not run_config:
        lines.append("No CONFIG: the forms' defaults are the code's (NCBI's PubMed, which needs the internet; a 32k vocabulary). "
                     "`make up CONFIG=demo` gives the bundled sample's.")
    return lines


if __name__ == "__main__":
    main()
