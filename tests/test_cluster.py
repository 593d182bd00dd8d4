"""The topology the card's users run, on hosts that share no loopback: a head (Prefect server on
PostgreSQL, `make up HOST=...`, and an S3 remote), a CPU host and a GPU host (CPU torch), each
with its own local store, Prefect home and `medlm worker`, reaching the head only over the
network (Linux network namespaces on a bridge: tests/netns.py).

- the pipeline deployment, run from the API: ingest, tokenize and release on the CPU host,
  pretraining, fine-tuning and evaluation on the GPU host, whose store pulls only the shards and
  the tokenizer of the CPU host's work; the lineage, read from either host, reaches the XML md5s;
- a pretraining on two nodes (one process on each host, a c10d rendezvous on the GPU host's
  address) equals one host's run of the same world size; one host's cable pulled mid-run stops
  the job within its timeout, publishing nothing, and the rerun resumes from the newest checkpoint;
- nothing these hosts serve is reachable from outside them, and they have no route out.

Needs root (network namespaces). Without it the tests skip, saying so, unless
MEDLM_REQUIRE_NETNS=1 (as in .ci/run), where they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import DATA, MIRROR, REPO
from model.checkpoint import load_model
from netns import Network, leftovers
from s3_server import SeaweedFS
from storage import Store
from storage.config import read_run_config
from storage.processes import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a whole cluster: minutes on 2 cores
MEDLM = str(Path(sys.executable).with_name("medlm"))
PORT = 4200


def _can_build_hosts() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_NET_ADMIN"
    if shutil.which("ip") is None:
        return "no `ip` (Debian's iproute2)"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if why := _can_build_hosts():
        if os.environ.get("MEDLM_REQUIRE_NETNS") == "1":
            pytest.fail(f"the cluster tests must run here (MEDLM_REQUIRE_NETNS=1), but {why}")
        pytest.skip(f"the cluster tests build hosts as network namespaces: {why}")
    stale = leftovers()
    root = tmp_path_factory.mktemp("cluster")
    with Network({"head": 1, "cpu": 2, "gpu": 3}) as net:
        head = net.address("head")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEDLM_", "AWS_", "OMP_"))}
        base |= {"OMP_NUM_THREADS": "1", "PREFECT_WORKER_QUERY_SECONDS": "2", "MEDLM_DATA_ROOTS": str(DATA)}
        with SeaweedFS(root / "s3", host=head, wrap=("ip", "netns", "exec", net.namespace("head"))) as s3:
            home = root / "head"
            home.mkdir()
            head_env = base | {"MEDLM_HOME": str(home / ".medlm"), "PREFECT_HOME": str(home / ".medlm" / "prefect"), "MEDLM_STORE": str(home / "store")}
            up = net.run("head", [sys.executable, "-m", "deployments.serve", "up", "--host", head, "--port", str(PORT), "--no-workers", "--database", "postgres"],
                         env=head_env | {"PYTHONPATH": str(REPO)}, cwd=home, timeout=600)
            api = f"http://{head}:{PORT}/api"
            try:
                assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
                auth = (home / ".medlm" / "api-auth").read_text().strip()
                client = base | {"PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": auth, "MEDLM_REMOTE": s3.url("cluster"), **s3.env}
                hosts = {}
                for host in ("cpu", "gpu"):
                    folder = root / host
                    folder.mkdir()
                    hosts[host] = client | {"MEDLM_STORE": str(folder / "store"), "MEDLM_HOME": str(folder / ".medlm"), "PREFECT_HOME": str(folder / ".medlm" / "prefect"),
                                            "MEDLM_RENDEZVOUS_HOSTS": net.address("gpu")}
                workers = {host: net.start(host, [MEDLM, "worker", "--pool", host], env=env, log=root / f"worker-{host}.log", cwd=root / host)
                           for host, env in hosts.items()}
                yield {"net": net, "root": root, "api": api, "up": up, "client": client, "hosts": hosts, "workers": workers, "stale": stale, "s3": s3}
            finally:
                net.run("head", [sys.executable, "-m", "deployments.serve", "clean", "--grace", "5"], env=head_env | {"PYTHONPATH": str(REPO)}, cwd=home, timeout=120)
    assert not leftovers()  # every namespace this made is gone


def _logs(cluster) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-2500:]}" for p in sorted(cluster["root"].glob("worker-*.log")))


def _on_head(cluster, script: str, timeout: float = 900) -> str:
    """A Python script run on the head, as a client of the API; its last line of output."""
    done = cluster["net"].run("head", [sys.executable, "-c", script], env=cluster["client"] | {"PYTHONPATH": str(REPO)}, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:] + _logs(cluster)
    return done.stdout.strip().splitlines()[-1]


def test_workers_on_other_hosts_join_the_head_and_say_what_they_run(cluster):
    assert cluster["stale"] == [], f"namespaces an earlier run left behind (removed now): {cluster['stale']}"
    up = cluster["up"].stdout
    head = cluster["net"].address("head")
    assert f"API and UI: http://{head}:{PORT} (the server listens on {head}:{PORT}" in up
    assert "on 127.0.0.1:" in up and "(loopback: the server is its only client)" in up  # PostgreSQL stays on the head
    deadline = time.time() + 180
    while not all("started!" in p.read_text() for p in cluster["root"].glob("worker-*.log")):
        for host, worker in cluster["workers"].items():
            assert worker.poll() is None, f"the {host} worker ended: {_logs(cluster)}"
        assert time.time() < deadline, _logs(cluster)
        time.sleep(1)
    for host in ("cpu", "gpu"):
        said = (cluster["root"] / f"worker-{host}.log").read_text()
        assert f"for pool {host}" in said and "code:   commit " in said and f"API:    {cluster['api']}" in said
        assert f"remote: {cluster['client']['MEDLM_REMOTE']}" in said


@pytest.fixture(scope="module")
def pipelined(cluster) -> str:
    """The pipeline deployment, run once from the API (on the head, a client of it): its final state."""
    quick = read_run_config(DATA / "quick-pipeline.toml")
    return _on_head(cluster, (
        "import json, sys\n"
        "from prefect.deployments import run_deployment\n"
        f"run = run_deployment('pipeline/pipeline', parameters=json.loads({json.dumps(json.dumps(quick))}), timeout=1200)\n"
        "print(run.state.type.value, run.state.message)\n"
    ), timeout=1300)


def test_the_pipeline_runs_across_the_hosts_and_its_lineage_reads_the_same_from_each(cluster, pipelined):
    assert pipelined.startswith("COMPLETED"), pipelined + _logs(cluster)
    cpu, gpu = (Store(cluster["hosts"][h]["MEDLM_STORE"], remote=cluster["client"]["MEDLM_REMOTE"]) for h in ("cpu", "gpu"))
    env = {k: v for k, v in cluster["client"].items() if k.startswith("AWS_")}
    os.environ.update(env)  # the remote's credentials, to read the stores' remote side from here
    on_cpu, on_gpu = ({a.kind for a in store.ls(local=True)} for store in (cpu, gpu))
    assert {"download", "parse", "corpus", "hygiene", "tokenizer", "shards", "release"} <= on_cpu
    assert "pretrain" not in on_cpu, on_cpu  # (the release pulled what it packages: the model and its evaluation)
    assert {"pretrain", "finetune", "evaluate", "shards", "tokenizer"} <= on_gpu
    # It pulled what its stages read: pretraining the shards and the tokenizer, evaluation the cleaned
    # snapshot (the contamination check); none of the ingestion's files.
    assert not on_gpu & {"download", "parse", "corpus", "release"}, on_gpu
    [release] = cpu.ls("release", local=True)
    md5s = [f.read_text().removeprefix("MD5(").strip().split(")= ") for f in MIRROR.glob("*/*.md5")]
    for host in ("cpu", "gpu"):
        lineage = cluster["net"].run(host, [MEDLM, "lineage", release.ref], env=cluster["hosts"][host], timeout=120)
        assert lineage.returncode == 0, lineage.stderr[-2000:]
        assert all(f"{name} md5={md5}" in lineage.stdout for name, md5 in md5s), (host, lineage.stdout[-3000:])


def test_two_hosts_train_as_one_of_their_world_size_and_a_cut_cable_stops_the_job_which_then_resumes(cluster, pipelined):
    net, gpu_address = cluster["net"], cluster["net"].address("gpu")
    shared = cluster["root"] / "shared-store"  # what multi-node training needs: one folder every node sees at the same path
    env = {host: cluster["hosts"][host] | {"MEDLM_STORE": str(shared)} for host in ("cpu", "gpu")}
    os.environ.update({k: v for k, v in cluster["client"].items() if k.startswith("AWS_")})
    [shards] = Store(cluster["hosts"]["cpu"]["MEDLM_STORE"], remote=cluster["client"]["MEDLM_REMOTE"]).ls("shards", local=True)
    small = ["--shards-ref", shards.ref, "--model", json.dumps({"n_layer": 2, "d_model": 32, "n_head": 2, "context_length": 32}),
             "--context-length", "16", "--optim.batch-size", "2", "--eval-windows", "2", "--run.eval-every", "100", "--run.checkpoint-every", "2",
             "--run.keep-last", "10", "--run.timeout-s", "30"]

    def pretrain(steps: int, job: str | None = None, cut_at: str | None = None) -> tuple[int, int | None]:
        """The stage on the GPU host: two processes there, or, with a job, one there and one on the CPU
        host (`medlm join`), meeting at the GPU host's address; the CPU host's cable pulled once
        ``cut_at`` appears in the shared store. Their exit statuses."""
        where = ["--run.nodes", "2", "--run.rdzv-endpoint", f"{gpu_address}:{free_port()}", "--run.rdzv-id", job] if job else ["--run.devices", "2"]
        command = [MEDLM, "pretrain", *small, "--optim.max-steps", str(steps), *where]
        joined = net.start("cpu", [MEDLM, "join", job, "--timeout", "300"], env=env["cpu"], log=cluster["root"] / f"join-{job}.log") if job else None
        stage = net.start("gpu", command, env=env["gpu"], log=cluster["root"] / f"pretrain-{job or 'one'}.log")
        try:
            if cut_at:
                deadline = time.time() + 300
                while not list(shared.glob(cut_at)):
                    assert stage.poll() is None and time.time() < deadline, (cluster["root"] / f"pretrain-{job}.log").read_text()[-3000:]
                    time.sleep(0.1)
                net.cut("cpu")
                cut = time.time()
            stage_status = stage.wait(timeout=600)
            join_status = joined.wait(timeout=300) if joined else None
            if cut_at:
                assert time.time() - cut < 180, "the job did not stop within its timeout"
        finally:
            if cut_at:
                net.mend("cpu")
        return stage_status, join_status

    store = Store(shared)

    def newest():
        return max(store.ls("pretrain", local=True), key=lambda a: a.manifest["created"])

    assert pretrain(6) == (0, None), _tail(cluster, "one")
    reference = newest()
    assert pretrain(6, job="across") == (0, 0), _tail(cluster, "across")
    two = newest()
    assert two.ref != reference.ref and two.summary["world_size"] == reference.summary["world_size"] == 2 and two.params["run"]["nodes"] == 2
    _same_weights(two, reference)

    # Another key (more steps): the CPU host's cable pulled once the fourth step's checkpoint is written.
    assert pretrain(10) == (0, None), _tail(cluster, "one")
    reference, before = newest(), len(store.ls("pretrain", local=True))
    stage, joined = pretrain(10, job="cut", cut_at="pretrain/*.partial/run/ckpt_0000004")
    assert stage != 0 and joined != 0, _tail(cluster, "cut")  # both stopped, neither waits for ever
    assert len(store.ls("pretrain", local=True)) == before  # nothing published
    assert pretrain(10, job="cut-again") == (0, 0), _tail(cluster, "cut-again")
    resumed = newest()
    assert resumed.summary["resumed_from_step"] >= 4
    _same_weights(resumed, reference)


def _tail(cluster, job: str) -> str:
    return "\n".join(p.read_text()[-2500:] for p in (cluster["root"] / f"pretrain-{job}.log", cluster["root"] / f"join-{job}.log") if p.exists())


def _same_weights(a, b) -> None:
    expected = load_model(b.path).state_dict()
    for name, weight in load_model(a.path).state_dict().items():
        torch.testing.assert_close(weight, expected[name], rtol=1e-4, atol=1e-6)


def test_nothing_the_hosts_serve_is_reachable_from_outside_and_they_have_no_route_out(cluster):
    """This machine's own namespace has no interface on the hosts' network, so a request to the
    head's API or S3 from here never reaches them (whatever the machine's own default route does
    with it); the hosts have no route but their own network."""
    net, head = cluster["net"], cluster["net"].address("head")
    ours = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    assert f" {head.rsplit('.', 1)[0]}." not in ours  # no address of ours on 198.18.N.0/24
    for url in (f"http://{head}:{PORT}/api/health", f"http://{head}:{cluster['s3'].ports['s3']}/"):
        try:
            with urllib.request.urlopen(url, timeout=3) as answer:
                served = answer.read(200), dict(answer.headers)
        except OSError:
            continue  # unreachable, as it should be
        assert served[0] != b"true" and "SeaweedFS" not in str(served[1]), (url, served)  # if anything answered, it was not them
    for host in ("head", "cpu", "gpu"):
        assert "default" not in net.routes(host), net.routes(host)
