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
def cpu_worker(prefect_server, tmp_path):
    """A process worker for the `cpu` pool, stopped by its PID (SIGINT, then SIGTERM)."""
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", "cpu", "--type", "process"],
        stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True,
    )
    yield worker
    worker.send_signal(signal.SIGINT)
    try:
        worker.wait(timeout=15)
    except subprocess.TimeoutExpired:
        worker.terminate()
        worker.wait(timeout=15)
    log.close()


def test_nightly_ingest_deployment_runs_through_a_worker(tmp_path, prefect_server, cpu_worker):
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
        assert run.state.is_completed(), f"{run.state}; worker log:\n{(tmp_path / 'worker.log').read_text()[-4000:]}"
        assert len(server.requests_for("/updatefiles/pubmed21n1298.xml.gz")) == 1
    [corpus] = store.ls("corpus")
    assert corpus.summary["documents"] > 0 and len(corpus.parents) == 2
