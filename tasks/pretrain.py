"""Pretrain: shards + tokenizer -> a checkpoint artifact, on one device in-process or many under torchrun.

The run folder (intermediate checkpoints, metrics) lives in the artifact's work folder, which the
store keeps across a crash (``resume=True``), so rerunning a killed pretrain continues from its
last checkpoint. The finished artifact holds the final weights and config, the tokenizer files
(so ``medlm export-hf`` needs nothing else), metrics.jsonl, loss.png and summary.json.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from prefect import task

from model.export_hf import TOKENIZER_FILES
from model.train import TrainConfig, format_record, train
from storage import Artifact, ArtifactError, ArtifactSpec, Store, sha256_file
from tasks.binarize import META_FILE, TOKENIZER_FILE

PRETRAIN_VERSION = "1"
RUN_DIR = "run"
CHECKPOINT_FILES = ("model.safetensors", "config.json", "state.json")
RUN_FILES = ("metrics.jsonl", "loss.png", "summary.json")
REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("medlm.pretrain")


def tokenizer_ref(shards: Artifact) -> str:
    """The tokenizer the shards were encoded with, as meta.json (or else the lineage) names it."""
    meta = json.loads(shards.file(META_FILE).read_text())
    ref = meta.get("tokenizer", {}).get("ref") or next((p for p in shards.parents if p.startswith("tokenizer/")), None)
    if ref is None:
        raise ArtifactError(f"{shards.ref}: neither meta.json nor its parents name a tokenizer; rebuild the shards")
    return ref


def pretrain_spec(shards: Artifact, tokenizer: Artifact, config: TrainConfig, devices: int) -> ArtifactSpec:
    return ArtifactSpec("checkpoint", PRETRAIN_VERSION, {**config.to_dict(), "devices": devices}, (shards.ref, tokenizer.ref))


def _log_record(record: dict) -> None:
    log.info(format_record(record))


def _train_distributed(config: TrainConfig, shards_dir: Path, run_dir: Path, devices: int) -> dict:
    """torchrun -m model.train on this machine, its output lines streamed into our logger."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "train_config.json"
    config_file.write_text(json.dumps(config.to_dict(), indent=2))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
        "-m", "model.train", "--config", str(config_file), "--shards", str(shards_dir), "--out", str(run_dir),
    ]
    log.info("launching %s", " ".join(command))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            tail.append(line.rstrip())
            log.info("%s", tail[-1])
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with status {proc.returncode}; last lines:\n" + "\n".join(tail))
    return json.loads((run_dir / "summary.json").read_text())


def pretrain(store: Store, shards: Artifact, tokenizer: Artifact, config: TrainConfig, devices: int = 1) -> Artifact:
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    expected = json.loads(shards.file(META_FILE).read_text()).get("tokenizer", {}).get("sha256")
    if expected and expected != sha256_file(tokenizer.file(TOKENIZER_FILE)):
        raise ArtifactError(f"{shards.ref} was encoded with a different tokenizer than {tokenizer.ref}; pass {tokenizer_ref(shards)}")

    def build(work: Path) -> dict:
        run, finished_run = work / RUN_DIR, work / f"{RUN_DIR}.done"
        if finished_run.exists() or ((work / "summary.json").is_file() and not run.exists()):
            # Killed after the final files were copied out: only the clean-up was left.
            shutil.rmtree(finished_run, ignore_errors=True)
            return json.loads((work / "summary.json").read_text())
        if devices == 1:
            summary = train(config, shards.path, run, progress=_log_record)
        else:
            summary = _train_distributed(config, shards.path, run, devices)
        final = run / summary["checkpoint"]
        for name in CHECKPOINT_FILES:
            shutil.copy2(final / name, work / name)
        for name in RUN_FILES:
            shutil.copy2(run / name, work / name)
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer.file(name), work / name)
        # Intermediate checkpoints and optimizer state are not part of the artifact. Renamed first,
        # so a crash while deleting never leaves a half-deleted run that looks resumable.
        os.rename(run, finished_run)
        shutil.rmtree(finished_run)
        return summary

    return store.get_or_build(pretrain_spec(shards, tokenizer, config, devices), build, resume=True)


@task(name="pretrain")
def pretrain_task(store: Store, shards: Artifact, tokenizer: Artifact, config: TrainConfig, devices: int = 1) -> Artifact:
    return pretrain(store, shards, tokenizer, config, devices)
