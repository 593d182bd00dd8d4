"""nightly-ingest: registered on a real Prefect server, triggered through the API, run by a real worker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from conftest import BASELINE_SAMPLE, UPDATE_SAMPLE
from deployments.deploy import NIGHTLY_CRON, register
from ncbi_server import NcbiServer, make_mirror
from storage import Store


@pytest.fixture
def workers(prefect_server, tmp_path):
    """A process worker for each pool (`cpu`, `gpu`), stopped by PID (SIGINT, then SIGTERM)."""
    logs = {pool: open(tmp_path / f"worker-{pool}.log", "w") for pool in ("cpu", "gpu")}
    procs = [
        subprocess.Popen(
            [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", pool, "--type", "process"],
            stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True,
        )
        for pool, log in logs.items()
    ]
    yield procs
    for worker in procs:
        worker.send_signal(signal.SIGINT)
    for worker in procs:
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.terminate()
            worker.wait(timeout=15)
    for log in logs.values():
        log.close()


def worker_logs(tmp_path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("worker-*.log")))


def test_deployments_run_through_workers_from_ingest_to_checkpoint(tmp_path, prefect_server, workers):
    mirror = make_mirror(tmp_path / "mirror", {"baseline": [BASELINE_SAMPLE], "updatefiles": [UPDATE_SAMPLE]})
    assert register() == ["ingest/nightly-ingest", "corpus/tokenize", "retrain/retrain"]

    async def read_deployment(name):
        async with get_client() as client:
            return await client.read_deployment_by_name(name)

    deployment = asyncio.run(read_deployment("ingest/nightly-ingest"))
    assert deployment.work_pool_name == "cpu"
    assert [s.schedule.cron for s in deployment.schedules] == [NIGHTLY_CRON]
    retrain = asyncio.run(read_deployment("retrain/retrain"))
    assert retrain.work_pool_name == "gpu" and not retrain.schedules
    assert {"preset", "steps", "batch_size", "lr", "shards_ref", "devices"} <= set(retrain.parameter_openapi_schema["properties"])

    store = Store(tmp_path / "store")
    with NcbiServer(mirror) as server:
        run = run_deployment(
            "ingest/nightly-ingest", parameters={"source": server.url, "store_root": str(store.root)}, timeout=240
        )
        assert run.state.is_completed(), f"{run.state}; worker logs:\n{worker_logs(tmp_path)}"
        assert len(server.requests_for("/updatefiles/pubmed21n1298.xml.gz")) == 1
    [corpus] = store.ls("corpus")
    assert corpus.summary["documents"] > 0 and len(corpus.parents) == 2

    # Retraining, as a user triggers it from the UI: tokenize on the cpu pool, train on the gpu pool.
    store_param = {"store_root": str(store.root)}
    run = run_deployment("corpus/tokenize", parameters={**store_param, "vocab_size": 600, "val_fraction": 0.05}, timeout=240)
    assert run.state.is_completed(), f"{run.state}; worker logs:\n{worker_logs(tmp_path)}"
    run = run_deployment("retrain/retrain", parameters={**store_param, "steps": 2, "batch_size": 2}, timeout=240)
    assert run.state.is_completed(), f"{run.state}; worker logs:\n{worker_logs(tmp_path)}"
    [checkpoint] = store.ls("checkpoint")
    assert checkpoint.summary["steps"] == 2
    assert checkpoint.parents == [store.newest("shards").ref, store.newest("tokenizer").ref]
