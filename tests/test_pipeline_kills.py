"""The whole pipeline killed with SIGKILL while parsing, tokenizing, pretraining and fine-tuning,
started again each time: it finishes with the artifacts an uninterrupted run makes, and redoes only
what had not finished. Run as a user runs it: the installed `medlm pipeline`, a run configuration."""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BASELINE_SAMPLE, DATA, UPDATE_SAMPLE
from ncbi_server import make_mirror
from storage import Store
from test_corpus import real_articles, write_update

MEDLM = Path(sys.executable).with_name("medlm")
QUICK = DATA / "quick-pipeline.toml"  # the demo's data, a very small model, a few steps of everything
COPIES = 8  # the update file made this many times bigger, so parsing lasts long enough to be caught


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    """The baseline sample, and an update file of COPIES shifted copies of the update sample's articles."""
    folder = tmp_path_factory.mktemp("kills")
    articles = []
    for n in range(COPIES):
        for article in real_articles(UPDATE_SAMPLE):
            twin = copy.deepcopy(article)
            pmid = twin.find("MedlineCitation/PMID")
            pmid.text = str(int(pmid.text) + n * 50_000_000)
            articles.append(twin)
    update = folder / "pubmed21n1298.xml.gz"
    update.write_bytes(gzip.compress(write_update(folder / "update.xml", articles).read_bytes()))
    return make_mirror(folder / "mirror", {"baseline": [BASELINE_SAMPLE], "updatefiles": [update]})


def start(store: Path, mirror: Path) -> subprocess.Popen:
    env = {**os.environ, "MEDLM_STORE": str(store)}
    command = [str(MEDLM), "pipeline", "--config", str(QUICK), "--source", str(mirror)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_when(run: subprocess.Popen, store: Path, pattern: str, timeout_s: float = 300) -> None:
    """SIGKILL the run's whole process group as soon as a path matching ``pattern`` exists in the store."""
    deadline = time.time() + timeout_s
    while not list(store.glob(pattern)):
        assert run.poll() is None, f"the run ended before {pattern} appeared:\n{run.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"no {pattern} after {timeout_s} s"
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()


def finish(run: subprocess.Popen) -> list[str]:
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    return out.split()


def built(store: Store) -> dict[str, float]:
    """When each artifact in the store was built."""
    return {a.ref: a.manifest["created"] for a in store.ls()}


def weights(store: Store) -> dict[str, str]:
    return {a.ref: a.manifest["files"]["model.safetensors"]["sha256"] for kind in ("pretrain", "finetune") for a in store.ls(kind)}


@pytest.mark.usefixtures("prefect_server")
def test_killed_in_every_stage_and_started_again_it_ends_as_an_uninterrupted_run(mirror, tmp_path):
    reference_store = Store(tmp_path / "reference")
    reference = finish(start(reference_store.root, mirror))

    root = tmp_path / "killed"
    store = Store(root)
    checkpoints = [
        ("parse/*.partial", None),  # parsing the big update file
        ("tokenizer/*.partial", "corpus"),  # fitting the BPE; the snapshot is done
        ("pretrain/*.partial/run/ckpt_0000010", "shards"),  # pretraining, a checkpoint written
        ("finetune/*.partial/run/ckpt_0000004", "pretrain"),  # fine-tuning, a checkpoint written
    ]
    before: dict[str, float] = {}
    for pattern, finished_kind in checkpoints:
        kill_when(start(root, mirror), root, pattern)
        now = built(store)
        assert {ref: now[ref] for ref in before} == before, f"killed at {pattern}: something built before was built again"
        if finished_kind:
            assert store.ls(finished_kind), f"killed at {pattern}: no {finished_kind} yet"
        before = now
    refs = finish(start(root, mirror))

    assert refs == reference  # the same evaluations of the same models ...
    assert {ref: built(store)[ref] for ref in before} == before  # ... redoing only what was unfinished
    assert weights(store) == weights(reference_store)  # resumed training ends on the same weights
    assert set(built(store)) == set(built(reference_store))
    assert store.quarantined() == [] and not list(root.glob("*/*.partial"))
    summary = json.loads(store.path(*store.ls("finetune")[0].ref.split("/")).joinpath("summary.json").read_text())
    assert 4 <= summary["resumed_from_step"] < 12  # from a checkpoint the killed run wrote (a slow machine may get to ckpt 8)


def test_gc_through_the_api_keeps_what_a_running_pipeline_made_until_it_ends(prefect_server, mirror, tmp_path):
    """Issue 26: `store-gc` through the API (keep_last 1, no minimum age, not a dry run) while a
    pipeline was pretraining deleted the QA artifacts it had converted for its later stages. A
    flow run's lease (Store.hold) keeps what it made or read until it ends: the gc run says why it
    kept them, the pipeline finishes, and once it has ended its lease is gone."""
    from prefect.deployments import run_deployment

    from deployments.deploy import register
    from test_deployment import running_workers

    def gc() -> str:
        """A store-gc run through the API; what it reported (its markdown artifact)."""
        run = run_deployment("store-gc/nightly-gc", parameters={"keep_last": 1, "min_age_hours": 0, "dry_run": False}, timeout=240)
        assert run.state.is_completed(), run.state
        return asyncio.run(_artifact(run.id, "store-gc"))

    register()
    with running_workers(tmp_path, pools=("cpu",)) as store:
        pipeline = start(store.root, mirror)
        deadline = time.time() + 300
        while not list(store.root.glob("pretrain/*.partial/run/ckpt_0000010")):
            assert pipeline.poll() is None and time.time() < deadline, pipeline.stderr.read()[-3000:]
            time.sleep(0.01)
        os.killpg(pipeline.pid, signal.SIGSTOP)  # held mid-run (its lease with it) while gc runs
        try:
            converted = {a.ref for a in store.ls("qa")}
            report = gc()
        finally:
            os.killpg(pipeline.pid, signal.SIGCONT)
        assert len(converted) == 2 and {a.ref for a in store.ls("qa")} == converted
        older = min(store.ls("qa"), key=lambda a: a.manifest["created"]).ref
        assert re.search(rf"kept {older} +made or read by flow run [0-9a-f-]+, still running", report), report
        finish(pipeline)
        assert {a.ref for a in store.ls("qa")} == converted
        report = gc()
    assert "still running" not in report and not list((store.root / ".leases").iterdir())  # the run has ended: its lease with it
    assert re.search(rf"kept {older} +an ancestor of evaluate/", report), report  # what stays now stays for what it made


async def _artifact(flow_run_id, key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async with get_client() as client:
        [artifact] = await client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])))
        return artifact.data
