"""Register medlm's work pools and deployments on the Prefect server that PREFECT_API_URL points at.

    python -m deployments.deploy [--config RUN_CONFIG] [--cron "0 6 * * *"]

Deployments: `ingest/nightly-ingest` (cron), `tokenize/tokenize` and `retrain/retrain` (run from the
UI or `prefect deployment run`; their parameter forms come from the config dataclasses). A run
configuration (flows/configs/*.toml, or your copy) sets the deployments' default parameters, e.g.
a mirror as the nightly source. Work pools (process type, created if missing): `cpu` for
ingestion and tokenizing, `gpu` for training. Where the store lives is the workers' setting
(MEDLM_STORE), never a parameter: see deployments/serve.py, which `make up` runs.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from flows.settings import apply_prefect_defaults

REPO = Path(__file__).resolve().parents[1]
POOLS = {"cpu": "PubMed ingestion, tokenizing, evaluation", "gpu": "Pretraining and fine-tuning"}
NIGHTLY_CRON = "0 6 * * *"  # NCBI posts the day's update files overnight (US Eastern); 06:00 UTC follows them
NIGHTLY_TIMEZONE = "UTC"


@dataclass(frozen=True)
class Deployment:
    entrypoint: str  # flows/<module>.py:<flow>
    name: str
    pool: str
    description: str
    cron: str | None = None
    tags: tuple[str, ...] = field(default=())


DEPLOYMENTS = (
    Deployment("flows/ingest.py:ingest", "nightly-ingest", "cpu", "New PubMed files -> parsed -> corpus snapshot.", NIGHTLY_CRON, ("ingest",)),
    Deployment("flows/tokenize.py:tokenize", "tokenize", "cpu", "Corpus snapshot -> tokenizer -> token shards.", tags=("tokenize",)),
    Deployment("flows/retrain.py:retrain", "retrain", "gpu", "Pretrain on token shards.", tags=("pretrain",)),
)


async def ensure_pools() -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    async with get_client() as client:
        for name, description in POOLS.items():
            try:
                await client.create_work_pool(WorkPoolCreate(name=name, type="process", description=description))
            except ObjectAlreadyExists:
                pass


def register(run_config: str | None = None, cron: str = NIGHTLY_CRON) -> list[str]:
    """Create the pools and deployments; returns the deployment names ("flow/deployment")."""
    from prefect import Flow
    from prefect.schedules import Cron

    from flows.cli import flow_parameters
    from storage.config import read_run_config

    asyncio.run(ensure_pools())
    tables = read_run_config(run_config) if run_config else {}
    names = []
    for d in DEPLOYMENTS:
        flow = Flow.from_source(source=str(REPO), entrypoint=d.entrypoint)
        configs, _ = flow_parameters(flow)
        parameters = {name: tables[name] for name in configs if name in tables}
        schedule = [Cron(cron if d.name == "nightly-ingest" else d.cron, timezone=NIGHTLY_TIMEZONE)] if d.cron else None
        flow.deploy(
            name=d.name, work_pool_name=d.pool, parameters=parameters, schedules=schedule, tags=list(d.tags),
            description=d.description, print_next_steps=False,
        )
        names.append(f"{flow.name}/{d.name}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="Run configuration whose tables become the deployments' default parameters.")
    parser.add_argument("--cron", default=NIGHTLY_CRON, help=f"Schedule of nightly-ingest (default {NIGHTLY_CRON!r}, {NIGHTLY_TIMEZONE}).")
    args = parser.parse_args()
    apply_prefect_defaults()
    for name in register(args.config, args.cron):
        print(f"deployed {name}")


if __name__ == "__main__":
    main()
