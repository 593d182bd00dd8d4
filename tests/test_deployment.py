"""Deployments registered on the session's Prefect server, triggered through the API and run by
real workers (test_make_up.py covers `make up` itself)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import PrefectHTTPStatusError

from conftest import BASELINE_SAMPLE, UPDATE_SAMPLE
from deployments.deploy import NIGHTLY_CRON, register, summary
from deployments.serve import worker_env
from ncbi_server import NcbiServer, make_mirror
from storage import Store


@contextmanager
def running_workers(machine: Path, pools: tuple[str, ...] = ("cpu", "gpu"), **settings: str) -> Iterator[Store]:
    """A process worker per entry of ``pools`` (a `gpu` worker takes one run at a time, as one per
    GPU machine would), whose runs write to machine/store (the store is the workers' setting, as
    are ``settings``: what runs may read and reach, the remote), stopped by PID (SIGINT, then SIGTERM)."""
    env = worker_env({**os.environ, "MEDLM_STORE": str(machine / "store"), "MEDLM_HOME": str(machine / ".medlm"),
                      "PREFECT_WORKER_QUERY_SECONDS": "2", **settings})  # default: every 10 s
    machine.mkdir(parents=True, exist_ok=True)
    logs = [open(machine / f"worker-{pool}-{i}.log", "w") for i, pool in enumerate(pools)]
    procs = [
        subprocess.Popen(
            [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", pool, "--type", "process", *(["--limit", "1"] if pool == "gpu" else [])],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        for pool, log in zip(pools, logs)
    ]
    try:
        yield Store(machine / "store", remote=settings.get("MEDLM_REMOTE", ""))
    finally:
        for worker in procs:
            worker.send_signal(signal.SIGINT)
        for worker in procs:
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.terminate()
                worker.wait(timeout=15)
        for log in logs:
            log.close()


@pytest.fixture
def workers(prefect_server, tmp_path):
    with running_workers(tmp_path) as store:
        yield store


DEPLOYED = ("ingest/nightly-ingest", "tokenize/tokenize", "pretrain/pretrain", "finetune/finetune", "evaluate/evaluate", "release/release", "pipeline/pipeline", "join/join", "store-gc/nightly-gc")


def worker_logs(tmp_path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.rglob("worker-*.log")))


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


def test_deployments_are_registered_with_typed_forms_and_a_change_made_in_the_ui_is_kept(prefect_server):
    assert register() == [f"deployed {name}" for name in DEPLOYED]
    deployment = asyncio.run(_read_deployment("ingest/nightly-ingest"))
    assert deployment.work_pool_name == "cpu"
    assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [(NIGHTLY_CRON, "UTC")]
    gc = asyncio.run(_read_deployment("store-gc/nightly-gc"))
    assert [(s.schedule.cron, s.active) for s in gc.schedules] == [("0 8 * * *", False)]  # off until a user switches it on
    pretrain = asyncio.run(_read_deployment("pretrain/pretrain"))
    assert pretrain.work_pool_name == "gpu" and not pretrain.schedules
    sections = pretrain.parameter_openapi_schema["definitions"]
    assert sections["ModelShape"]["properties"]["preset"]["enum"] == ["tiny", "small", "base", "gpt2"] and sections["OptimConfig"]["properties"]["max_steps"]["minimum"] == 1
    assert sections["OptimConfig"]["properties"]["warmup_steps"]["description"] and "devices" in sections["RunConfig"]["properties"]
    finetune = asyncio.run(_read_deployment("finetune/finetune"))
    assert finetune.work_pool_name == "gpu" and set(finetune.tags) == {"finetune", "evaluate"}
    form = finetune.parameter_openapi_schema["definitions"]
    assert form["FinetuneConfig"]["properties"]["method"]["enum"] == ["full", "lora"] and "lr" in form["OptimConfig"]["properties"]
    assert "ModelShape" not in form  # the base decides a fine-tuning's shape: no form fields it would refuse
    assert "pubmedqa" in json.dumps(form["Curriculum"]["properties"]["sources"])
    for name in DEPLOYED:
        assert "store_root" not in asyncio.run(_read_deployment(name)).parameter_openapi_schema["properties"]

    # A change made in the UI survives the next `make up` (which says so), unless reset.
    asyncio.run(_edit_parameters(pretrain.id, {"optim": {"max_steps": 3}}))
    assert register()[2] == "kept pretrain/pretrain as changed in the UI (--reset to register it again from the code and the run configuration)"
    assert asyncio.run(_read_deployment("pretrain/pretrain")).parameters == {"optim": {"max_steps": 3}}
    assert register(reset=True)[2] == "deployed pretrain/pretrain"
    assert asyncio.run(_read_deployment("pretrain/pretrain")).parameters == {}
    # A run configuration's tables: the deployments whose defaults it changed say which, the others the code's.
    table = "\n".join(summary(register("demo"), "demo", NIGHTLY_CRON))
    assert re.search(r"^pretrain/pretrain +gpu +- +demo +registered, optim changed$", table, re.M), table  # its shape, the tiny preset, is the code's
    assert re.search(r"^store-gc/nightly-gc +cpu +0 8 \* \* \* UTC \(off\) +the code +registered$", table, re.M), table
    assert [line for line in register(reset=True) if "changed" in line] == []  # the code's defaults again, for the tests below
    assert asyncio.run(_read_work_pool("gpu")).concurrency_limit == 1  # one run per GPU
    follow_ups = asyncio.run(_read_automations())
    assert {a.name: a.enabled for a in follow_ups} == {"medlm://corpus -> tokenize/tokenize": False, "medlm://shards -> pretrain/pretrain": False}

    # The form's bounds are the server's too: a run with steps = -5 is refused before it exists.
    with pytest.raises(PrefectHTTPStatusError, match="optim.max_steps'. Failure reason: -5 is less than the minimum of 1"):
        run_deployment("pretrain/pretrain", parameters={"optim": {"max_steps": -5}}, timeout=120)


def test_nightly_ingests_and_a_pretrain_at_the_same_time_on_one_store(tmp_path, workers):
    """Two nightly runs (a manual one beside the scheduled one) and a pretrain, all at once: every file
    is fetched once, every artifact built once, and the store verifies afterwards."""
    from prefect.deployments import run_deployment as start

    from conftest import build_corpus
    from tasks.shards import SHARDS, ShardsConfig
    from tasks.tokenizer import TOKENIZER, TokenizerConfig

    store = workers
    corpus = build_corpus(store)  # last week's snapshot, tokenized: what the pretrain trains on
    tokenizer = TOKENIZER.run(store, {"corpus": corpus}, TokenizerConfig(vocab_size=600, val_fraction=0.05, test_fraction=0.05))
    SHARDS.run(store, {"corpus": corpus, "tokenizer": tokenizer}, ShardsConfig())
    register()
    new_update = tmp_path / "pubmed21n1299.xml.gz"
    new_update.write_bytes(UPDATE_SAMPLE.read_bytes())  # tonight's update file (real bytes under a new name)
    mirror = make_mirror(tmp_path / "mirror", {"baseline": [BASELINE_SAMPLE], "updatefiles": [UPDATE_SAMPLE, new_update]})
    with NcbiServer(mirror) as server:
        source = {"source": {"source": server.url}}
        runs = [start("ingest/nightly-ingest", parameters=source, timeout=0) for _ in range(2)]
        runs.append(start("pretrain/pretrain", parameters={"optim": {"max_steps": 3, "batch_size": 2}}, timeout=0))
        states = asyncio.run(_wait_for([r.id for r in runs], timeout_s=300))
        assert all(s.is_completed() for s in states), f"{states}; worker logs:\n{worker_logs(tmp_path)}"
        assert len(server.requests_for("/updatefiles/pubmed21n1299.xml.gz")) == 1  # fetched once, not twice
    assert len(store.ls("download")) == 3 and len(store.ls("parse")) == 3 and len(store.ls("pretrain")) == 1
    assert len(store.ls("corpus")) == 2  # last week's and tonight's, built once although two runs asked for it
    for artifact in store.ls():
        assert store.problems(artifact.ref) == [], artifact.ref
    assert store.quarantined() == [] and not list(store.root.glob("*/*.partial"))


async def _wait_for(flow_run_ids, timeout_s: float):
    import time

    async with get_client() as client:
        deadline = time.time() + timeout_s
        while True:
            states = [(await client.read_flow_run(i)).state for i in flow_run_ids]
            if all(s.is_final() for s in states) or time.time() > deadline:
                return states
            await asyncio.sleep(1)


def test_a_run_reads_and_reaches_only_what_its_worker_allows(prefect_server, tmp_path):
    """As an attacker who reaches the API would try it: run parameters naming a download source, a
    mirror, an exclusion list, QA data, a Hugging Face model or a Dask scheduler beyond what the
    workers allow (MEDLM_SOURCES, MEDLM_DATA_ROOTS; the Dask address is no parameter at all). Each
    is refused before anything is fetched (a loopback listener sees no connection) or read, and
    no message of any run quotes what a file holds."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from conftest import DATA
    from ncbi_server import URL as ALLOWED_SOURCE
    from ncbi_server import Listener

    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    make_mirror(secret / "mirror", {"baseline": [BASELINE_SAMPLE]})
    shutil.copytree(DATA / "pubmedqa", secret / "pubmedqa")
    (secret / "pmids.txt").write_text("TOPSECRET-4711\n")
    allowed.mkdir()
    (allowed / "pmids.txt").write_text("31688362\nTOPSECRET-4711\n")  # readable, but not a PMID list
    shutil.copytree(DATA / "pubmedqa", allowed / "pubmedqa")
    register()
    mirror = make_mirror(tmp_path / "mirror", {"baseline": [BASELINE_SAMPLE]})
    settings = {"MEDLM_DATA_ROOTS": str(allowed), "MEDLM_SOURCES": ALLOWED_SOURCE}
    with Listener() as listener, NcbiServer(mirror) as server, running_workers(tmp_path, **settings) as store:
        qa = {"pubmedqa": str(allowed / "pubmedqa")}
        attempts = {  # what is tried -> (deployment, parameters, what the refusal names)
            "a source URL": ("ingest/nightly-ingest", {"source": {"source": f"{listener.url}/anything"}}, "not among the sources this process may download from (MEDLM_SOURCES="),
            "a mirror folder": ("ingest/nightly-ingest", {"source": {"source": str(secret / "mirror")}}, "is outside the folders this process may read (MEDLM_DATA_ROOTS="),
            "an exclusion list": ("ingest/nightly-ingest", {"corpus": {"exclude_pmids_file": str(secret / "pmids.txt")}}, "MEDLM_DATA_ROOTS="),
            "an exclusion list's content": ("ingest/nightly-ingest", {"source": {"source": server.url}, "corpus": {"exclude_pmids_file": str(allowed / "pmids.txt")}}, "line 2: not a PMID"),
            "QA data": ("evaluate/evaluate", {"qa": {"pubmedqa": str(secret / "pubmedqa")}}, "MEDLM_DATA_ROOTS="),
            "a model to evaluate": ("evaluate/evaluate", {"qa": qa, "hf_model": str(secret)}, "MEDLM_DATA_ROOTS="),
            "a model to fine-tune": ("finetune/finetune", {"qa": qa, "curriculum": {"sources": ["pubmedqa"]}, "hf_model": str(secret)}, "MEDLM_DATA_ROOTS="),
        }
        runs = {what: run_deployment(name, parameters=parameters, timeout=0) for what, (name, parameters, _) in attempts.items()}
        with pytest.raises(PrefectHTTPStatusError, match="dask_address"):  # no such parameter: refused before a run exists
            run_deployment("ingest/nightly-ingest", parameters={"parse": {"dask_address": listener.url.replace("http", "tcp")}}, timeout=0)
        states = dict(zip(runs, asyncio.run(_wait_for([r.id for r in runs.values()], timeout_s=300))))
        assert listener.connections == 0 and server.requests == []
        assert store.ls() == []  # nothing was built from anything
    APILogWorker.drain_all(timeout=10)

    async def messages(flow_run_id) -> str:
        async with get_client() as client:
            return "\n".join(log.message for log in await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))

    for what, (_, _, refusal) in attempts.items():
        state = states[what]
        assert state.is_failed() and refusal in state.message, (what, state, worker_logs(tmp_path))
        assert "TOPSECRET" not in state.message + asyncio.run(messages(runs[what].id)), what


def test_a_caller_of_the_api_chooses_nothing_a_worker_runs(prefect_server, tmp_path):
    """What issue 26 found: Prefect takes a run's job variables from its caller, and the default
    process template let `command` run anything on a worker and `env` undo its settings. Through
    the API: a run whose job variables would choose the command, the environment or the folder is
    refused; so is a run of a deployment given such job variables (Prefect stores them unchecked),
    and had such a run been made (by the scheduler, which checks nothing), the pool's template
    leaves them no effect; a deployment that is not one of ours (its own entrypoint, a pull step
    that runs a command) is run by no worker. A loopback listener hears nothing."""
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.workers.process import ProcessJobConfiguration

    from deployments.deploy import ENGINE, base_job_template
    from ncbi_server import Listener

    register()
    pool = asyncio.run(_read_work_pool("cpu"))
    assert set(pool.base_job_template["variables"]["properties"]) == {"name", "labels", "stream_output"}
    gc = asyncio.run(_read_deployment("store-gc/nightly-gc"))
    with Listener() as listener, running_workers(tmp_path, pools=("cpu",)):
        call = f"python3 -c \"import urllib.request; urllib.request.urlopen('{listener.url}/rce')\""
        evil = tmp_path / "evil.py"
        evil.write_text(f"from prefect import flow\nimport urllib.request\n@flow\ndef evil():\n    urllib.request.urlopen('{listener.url}/entrypoint')\n")
        tries = [{"command": call}, {"env": {"MEDLM_SOURCES": listener.url}}, {"env": {"MEDLM_DATA_ROOTS": "/"}},
                 {"env.MEDLM_STORE": str(tmp_path)}, {"working_dir": str(tmp_path)}]

        async def attack() -> list:
            async with get_client() as client:
                refused = []
                for job_variables in tries:
                    with pytest.raises(PrefectHTTPStatusError) as run_refused:
                        await client.create_flow_run_from_deployment(gc.id, parameters={}, job_variables=job_variables)
                    await client.update_deployment(gc.id, DeploymentUpdate(job_variables=job_variables))
                    try:
                        with pytest.raises(PrefectHTTPStatusError) as deployment_run_refused:
                            await client.create_flow_run_from_deployment(gc.id, parameters={})
                    finally:
                        await client.update_deployment(gc.id, DeploymentUpdate(job_variables={}))
                    configuration = await ProcessJobConfiguration.from_template_and_values(base_job_template(), job_variables)
                    assert configuration.command == ENGINE and not configuration.env and configuration.working_dir is None
                    refused.append((run_refused.value.response.status_code, deployment_run_refused.value.response.status_code))
                flow_id = await client.create_flow_from_name("evil")
                foreign = await client.create_deployment(
                    flow_id=flow_id, name="evil", entrypoint=f"{evil}:evil", work_pool_name="cpu",
                    pull_steps=[{"prefect.deployments.steps.run_shell_script": {"script": call}}],
                )
                run = await client.create_flow_run_from_deployment(foreign, parameters={})
                return refused, run.id

        refused, run_id = asyncio.run(attack())
        [state] = asyncio.run(_wait_for([run_id], timeout_s=120))
        assert refused == [(422, 422)] * len(tries)
        assert state.is_final() and not state.is_completed(), (state, worker_logs(tmp_path))
        assert "refused by the worker: this worker runs only medlm's flows" in state.message, (state, worker_logs(tmp_path))
        time.sleep(3)  # time for anything the worker might still start
        assert listener.connections == 0, worker_logs(tmp_path)


def test_a_worker_whose_stage_versions_differ_from_the_registered_ones_refuses_the_run_saying_which(prefect_server, tmp_path):
    """The same code on every host is checked, not assumed: the registration records its stage
    versions on the server; a worker of another commit that would build a stage with another
    version (here: the server's record says parse is at version 0) refuses the run, naming the
    stage, and builds nothing."""
    from prefect.variables import Variable

    from deployments import code

    register()
    registered = Variable.get(code.VARIABLE)
    assert registered == code.record()
    Variable.set(code.VARIABLE, {"commit": "0123abcd", "stages": registered["stages"] | {"parse": "0"}}, overwrite=True)
    try:
        with running_workers(tmp_path, pools=("cpu",)) as store:
            run = run_deployment("ingest/nightly-ingest", parameters={"source": {"source": str(BASELINE_SAMPLE.parents[1])}}, timeout=180)
    finally:
        Variable.set(code.VARIABLE, registered, overwrite=True)
    assert run.state.is_failed(), (run.state, worker_logs(tmp_path))
    assert "refused by the worker: this worker (commit" in run.state.message and "parse 1 here, 0 there" in run.state.message
    assert "(commit 0123abcd)" in run.state.message and store.ls() == []
