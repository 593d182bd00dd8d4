"""deployments/slurm/train.sbatch as Slurm runs it on two nodes, here on one machine: `srun` and
`scontrol` are stand-ins that start one task per "node" (SLURM_PROCID 0 and 1) on localhost, so
the script's own logic runs for real: node 0's stage, node 1's `medlm join`, one checkpoint."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO, build_corpus
from storage import Store
from storage.processes import free_port

pytestmark = pytest.mark.usefixtures("prefect_server")

SRUN = """#!/usr/bin/env bash
# One task per node, all on this machine: SLURM_PROCID 0 .. SLURM_NNODES-1.
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_PROCID=$i SLURM_NODEID=$i "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && echo localhost
"""


def test_the_slurm_script_trains_on_two_nodes(tmp_path):
    from tasks.shards import SHARDS, ShardsConfig
    from tasks.tokenizer import TOKENIZER, TokenizerConfig

    store = Store(tmp_path / "store")
    corpus = build_corpus(store)
    tokenizer = TOKENIZER.run(store, {"corpus": corpus}, TokenizerConfig(vocab_size=600, val_fraction=0.05, test_fraction=0.05))
    shards = SHARDS.run(store, {"corpus": corpus, "tokenizer": tokenizer}, ShardsConfig())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MEDLM_STORE": str(store.root), "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4711", "MEDLM_RDZV_PORT": str(free_port())}
    run = subprocess.run(["bash", str(REPO / "deployments" / "slurm" / "train.sbatch"), "pretrain", "--shards-ref", shards.ref,
                          "--optim.max-steps", "2", "--optim.batch-size", "2", "--eval-windows", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [checkpoint] = store.ls("pretrain")
    assert checkpoint.summary["world_size"] == 2 and checkpoint.params["run"]["nodes"] == 2
    assert "joining 4711: 2 nodes at localhost:" in run.stdout + run.stderr
    # Submitted again: node 0 finds the checkpoint in the store and launches nothing; node 1 learns
    # there is nothing to join (it used to wait 600 s for a launch, and the job failed). Given by its old name, pretrain still runs.
    again = subprocess.run(["bash", str(REPO / "deployments" / "slurm" / "train.sbatch"), "retrain", "--shards-ref", shards.ref,
                            "--optim.max-steps", "2", "--optim.batch-size", "2", "--eval-windows", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"nothing to join: 4711 has ended ({checkpoint.ref})" in again.stdout + again.stderr and len(store.ls("pretrain")) == 1
    assert "note: the command retrain is now pretrain; the old name still works for now, but use the new one" in again.stderr
