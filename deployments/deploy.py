"""Register medlm's deployments on the Prefect server that PREFECT_API_URL points at.

    python -m deployments.deploy [--source URL_OR_MIRROR] [--cron "0 6 * * *"]

Deployments: `ingest/nightly-ingest` (cron), `corpus/tokenize` and `retrain/retrain` (run from the
UI or `prefect deployment run`, parameters editable there).
Work pools (process type, created if missing): `cpu` for ingestion, `gpu` for training. A worker
per pool runs the flow runs (`make up` starts both); on a cluster, start the `gpu` worker on the
GPU machines, or make `gpu` a Kubernetes pool (see README).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists

REPO = Path(__file__).resolve().parents[1]
POOLS = {"cpu": "PubMed ingestion and corpus building", "gpu": "Pretraining and fine-tuning"}
NIGHTLY_CRON = "0 6 * * *"  # NCBI posts the day's update files overnight (US Eastern); 06:00 UTC follows them


async def ensure_pools() -> None:
    async with get_client() as client:
        for name, description in POOLS.items():
            try:
                await client.create_work_pool(WorkPoolCreate(name=name, type="process", description=description))
            except ObjectAlreadyExists:
                pass


def register(source: str | None = None, cron: str = NIGHTLY_CRON, store_root: str | None = None) -> list[str]:
    """Create the pools and deployments; returns the deployment names ("flow/deployment")."""
    asyncio.run(ensure_pools())
    ingest_params = {k: v for k, v in {"source": source, "store_root": store_root}.items() if v is not None}
    store_params = {"store_root": store_root} if store_root else {}
    deployments = [
        ("flows/ingest.py:ingest", "nightly-ingest", "cpu", {"cron": cron, "parameters": ingest_params}),
        ("flows/corpus.py:corpus", "tokenize", "cpu", {"parameters": store_params}),
        ("flows/retrain.py:retrain", "retrain", "gpu", {"parameters": store_params}),
    ]
    names = []
    for entrypoint, name, pool, options in deployments:
        flow = Flow.from_source(source=str(REPO), entrypoint=entrypoint)
        flow.deploy(name=name, work_pool_name=pool, print_next_steps=False, **options)
        names.append(f"{flow.name}/{name}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="NCBI's PubMed URL (default) or a local mirror folder.")
    parser.add_argument("--cron", default=NIGHTLY_CRON, help=f"Schedule of nightly-ingest (default {NIGHTLY_CRON!r}, UTC).")
    parser.add_argument("--store", help="Artifact store root for the deployed runs.")
    args = parser.parse_args()
    for name in register(args.source, args.cron, args.store):
        print(f"deployed {name}")


if __name__ == "__main__":
    main()
