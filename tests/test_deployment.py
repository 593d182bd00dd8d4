"""Deployments as a user meets them: `make up` (a locked-down server, deployments, workers, a
schedule that fires), runs triggered through the API and run by real workers, `make down`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import PrefectHTTPStatusError

from conftest import BASELINE_SAMPLE, UPDATE_SAMPLE, _free_port, _template_database
from deployments.deploy import NIGHTLY_CRON, register
from deployments.serve import process_start_time
from ncbi_server import NcbiServer, make_mirror
from storage import Store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workers(prefect_server, tmp_path):
    """A process worker for each pool (`cpu`, `gpu`), whose runs write to tmp_path/store (the
    store is the workers' setting), stopped by PID (SIGINT, then SIGTERM)."""
    env = {**os.environ, "MEDLM_STORE": str(tmp_path / "store")}
    logs = {pool: open(tmp_path / f"worker-{pool}.log", "w") for pool in ("cpu", "gpu")}
    procs = [
        subprocess.Popen(
            [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", pool, "--type", "process"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        for pool, log in logs.items()
    ]
    yield Store(tmp_path / "store")
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


async def _read_deployment(name):
    async with get_client() as client:
        return await client.read_deployment_by_name(name)


async def _edit_parameters(deployment_id, parameters: dict) -> None:
    """What a user does in the UI's Edit form."""
    from prefect.client.schemas.actions import DeploymentUpdate

    async with get_client() as client:
        await client.update_deployment(deployment_id, DeploymentUpdate(parameters=parameters))


async def _read_work_pool(name):
    async with get_client() as client:
        return await client.read_work_pool(name)


async def _read_automations():
    async with get_client() as client:
        return [a for a in await client.read_automations() if a.name.startswith("medlm://")]


def test_deployments_run_through_workers_from_ingest_to_checkpoint(tmp_path, workers):
    store = workers
    mirror = make_mirror(tmp_path / "mirror", {"baseline": [BASELINE_SAMPLE], "updatefiles": [UPDATE_SAMPLE]})
    assert register() == ["deployed ingest/nightly-ingest", "deployed tokenize/tokenize", "deployed retrain/retrain"]

    deployment = asyncio.run(_read_deployment("ingest/nightly-ingest"))
    assert deployment.work_pool_name == "cpu"
    assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [(NIGHTLY_CRON, "UTC")]
    retrain = asyncio.run(_read_deployment("retrain/retrain"))
    assert retrain.work_pool_name == "gpu" and not retrain.schedules
    train_form = retrain.parameter_openapi_schema["definitions"]["TrainConfig"]["properties"]
    assert train_form["preset"]["enum"] == ["tiny", "small", "base", "gpt2"] and train_form["max_steps"]["minimum"] == 1
    assert train_form["warmup_steps"]["description"] and "context_length" in train_form and "weight_decay" in train_form
    for name in ("ingest/nightly-ingest", "tokenize/tokenize", "retrain/retrain"):
        assert "store_root" not in asyncio.run(_read_deployment(name)).parameter_openapi_schema["properties"]

    with NcbiServer(mirror) as server:
        run = run_deployment("ingest/nightly-ingest", parameters={"source": {"source": server.url}}, timeout=240)
        assert run.state.is_completed(), f"{run.state}; worker logs:\n{worker_logs(tmp_path)}"
        assert len(server.requests_for("/updatefiles/pubmed21n1298.xml.gz")) == 1
    [corpus] = store.ls("corpus")
    assert corpus.summary["documents"] > 0 and len(corpus.parents) == 2

    # Retraining, as a user triggers it from the UI: tokenize on the cpu pool, train on the gpu pool.
    run = run_deployment("tokenize/tokenize", parameters={"tokenizer": {"vocab_size": 600, "val_fraction": 0.05}}, timeout=240)
    assert run.state.is_completed(), f"{run.state}; worker logs:\n{worker_logs(tmp_path)}"
    run = run_deployment("retrain/retrain", parameters={"train": {"max_steps": 2, "batch_size": 2}}, timeout=240)
    assert run.state.is_completed(), f"{run.state}; worker logs:\n{worker_logs(tmp_path)}"
    [checkpoint] = store.ls("pretrain")
    assert checkpoint.summary["steps"] == 2
    assert checkpoint.parents == [store.newest("shards").ref, store.newest("tokenizer").ref]

    # A change made in the UI survives the next `make up` (which says so), unless reset.
    asyncio.run(_edit_parameters(retrain.id, {"train": {"max_steps": 3}}))
    assert register() == ["deployed ingest/nightly-ingest", "deployed tokenize/tokenize",
                          "kept retrain/retrain as changed in the UI (--reset to register it again from the code and the run configuration)"]
    assert asyncio.run(_read_deployment("retrain/retrain")).parameters == {"train": {"max_steps": 3}}
    assert register(reset=True)[-1] == "deployed retrain/retrain"
    assert asyncio.run(_read_deployment("retrain/retrain")).parameters == {}
    assert asyncio.run(_read_work_pool("gpu")).concurrency_limit == 1  # one run per GPU
    follow_ups = asyncio.run(_read_automations())
    assert {a.name: a.enabled for a in follow_ups} == {"medlm://corpus -> tokenize/tokenize": False, "medlm://shards -> retrain/retrain": False}

    # The form's bounds are the server's too: a run with steps = -5 is refused before it exists.
    with pytest.raises(PrefectHTTPStatusError, match="train.max_steps'. Failure reason: -5 is less than the minimum of 1"):
        run_deployment("retrain/retrain", parameters={"train": {"max_steps": -5}}, timeout=120)
    assert len(store.ls("pretrain")) == 1


# -- make up / make down ------------------------------------------------------------------------------


def _request(url: str, method: str = "GET", headers: dict | None = None, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_make_up_serves_a_locked_down_server_whose_nightly_schedule_fires(tmp_path):
    port = _free_port()
    home = tmp_path / ".medlm"
    (home / "prefect").mkdir(parents=True)
    shutil.copy(_template_database(), home / "prefect" / "prefect.db")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "MEDLM_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
        # The scheduler looks for runs to create every 60 s; sooner here, so the test waits less.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "3",
    }
    serve = [sys.executable, "-m", "deployments.serve"]
    up = subprocess.run([*serve, "up", "--port", str(port)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    api, ui = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}"
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert "deployed ingest/nightly-ingest" in up.stdout

        # The nightly schedule fires: the server's scheduler creates the next runs at 06:00 UTC.
        client_env = {**env, "PREFECT_API_URL": api}
        script = (
            "import asyncio, json\n"
            "from prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName\n"
            "async def main():\n"
            "    async with get_client() as c:\n"
            "        runs = await c.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=['nightly-ingest'])))\n"
            "        print(json.dumps([[r.state.type.value, r.expected_start_time.isoformat()] for r in runs]))\n"
            "asyncio.run(main())\n"
        )
        deadline, scheduled = time.time() + 60, []
        while not scheduled and time.time() < deadline:
            time.sleep(2)
            out = subprocess.run([sys.executable, "-c", script], env=client_env, capture_output=True, text=True, timeout=60)
            scheduled = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []
        assert len(scheduled) >= 3, (out.stderr[-2000:], (home / "run" / "server.log").read_text()[-3000:])
        assert all(state == "SCHEDULED" and start.endswith("T06:00:00+00:00") for state, start in scheduled)

        # A page from another origin can neither read a CSRF token nor start a run; the UI's origin can.
        evil = {"Origin": "http://evil.example"}
        status, headers, _ = _request(f"{api}/deployments/filter", "OPTIONS", {**evil, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in {h.lower() for h in headers}
        status, headers, _ = _request(f"{api}/csrf-token?client=evil-page", headers=evil)
        assert "access-control-allow-origin" not in {h.lower() for h in headers}  # the browser hides the token
        status, _, _ = _request(f"{api}/deployments/filter", "POST", evil, {})
        assert status == 403  # no token, no write
        [deployment_id] = [d["id"] for d in json.loads(_request(f"{api}/deployments/filter", "POST", *_ui_headers(api, ui), {})[2]) if d["name"] == "nightly-ingest"]
        status, _, _ = _request(f"{api}/deployments/{deployment_id}/create_flow_run", "POST", evil, {"parameters": {"source": {"source": "/tmp/x"}}})
        assert status == 403
        status, headers, body = _request(f"{api}/deployments/{deployment_id}/create_flow_run", "POST", *_ui_headers(api, ui), {})
        assert status == 201 and headers.get("access-control-allow-origin") == ui, body
    finally:
        # A stale record must never get an unrelated process signalled: a `sleep` now holds a recorded PID.
        bystander = subprocess.Popen(["sleep", "60"])
        (home / "run" / "old-worker.json").write_text(json.dumps({"pid": bystander.pid, "start_time": process_start_time(bystander.pid) - 1}))
        down = subprocess.run([*serve, "down", "--grace", "5"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert f"old-worker: PID {bystander.pid} is no longer the process `make up` started; not signalled" in down.stdout
    assert bystander.poll() is None
    bystander.kill()
    for name in ("server", "worker-cpu", "worker-gpu"):
        assert f"stopped {name}" in down.stdout
    assert not list((home / "run").glob("*.json"))


def _ui_headers(api: str, ui: str) -> tuple[dict]:
    """What the UI sends: its origin, and a CSRF token it fetched for its client id."""
    client = str(uuid.uuid4())
    token = json.loads(_request(f"{api}/csrf-token?client={client}", headers={"Origin": ui})[2])["token"]
    return ({"Origin": ui, "Prefect-Csrf-Token": token, "Prefect-Csrf-Client": client},)
