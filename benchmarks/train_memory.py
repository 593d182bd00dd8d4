"""The training memory estimate (model/train.py ``training_memory``) against what training holds.

    python -m benchmarks.train_memory [--shapes 5]

For each shape below, two optimizer steps of ``model.train.train`` on CPU (fp32), each in a
process of its own: what it holds is its peak RSS less its RSS just before training (Python,
torch and the shards already loaded), against the estimate. The estimate is what `medlm pretrain`
and `medlm finetune` refuse to start beyond (MemAvailable, or a GPU's free memory); it should
be at or above every measurement, and not far above. Writes benchmarks/results/train_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, write_result

SHAPES = [  # (preset, context, batch_size, vocab)
    ("tiny", 256, 8, 4096),
    ("tiny", 256, 32, 4096),
    ("tiny", 256, 8, 32000),
    ("small", 512, 4, 32000),
    ("small", 1024, 8, 32000),
]

CHILD = """
import json, resource, sys, tempfile
import numpy as np, torch
from model.data import write_shards
from model.model import ModelConfig, Transformer
from model.train import TrainConfig, train, training_memory
preset, context, batch, vocab, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
tokens = np.random.default_rng(0).integers(4, vocab, 300_000).astype(np.uint16)
write_shards(root, {"train": [tokens], "val": [tokens[:20_000]], "test": [tokens[:20_000]]}, vocab)
cfg = TrainConfig.of(preset=preset, model={"vocab_size": vocab}, context_length=context, batch_size=batch, max_steps=2, warmup_steps=1,
                     eval_every=100, eval_windows=1, checkpoint_every=100, device="cpu")
shape = ModelConfig.preset(preset, vocab_size=vocab)
params = sum(p.numel() for p in Transformer(shape).parameters())
before = int(open("/proc/self/statm").read().split()[1]) * 4096
with tempfile.TemporaryDirectory() as out:
    train(cfg, root, out)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"measured": peak - before, "estimate": training_memory(shape, params, params, batch, context, False), "params": params}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="measure only the first N shapes (the smallest)")
    args = parser.parse_args()
    rows = []
    for preset, context, batch, vocab in SHAPES[: args.shapes]:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", CHILD, preset, str(context), str(batch), str(vocab), str(Path(tmp) / "shards")],
                                 cwd=REPO, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        estimate = sum(result["estimate"].values())
        row = {"preset": preset, "context": context, "batch_size": batch, "vocab": vocab, "params": result["params"],
               "measured_gb": round(result["measured"] / 1e9, 3), "estimate_gb": round(estimate / 1e9, 3),
               "estimate_over_measured": round(estimate / result["measured"], 2), "estimate_parts": result["estimate"]}
        rows.append(row)
        print(f"{preset:>5} ctx {context:>5} batch {batch:>3} vocab {vocab:>6}: measured {row['measured_gb']:.2f} GB, "
              f"estimate {row['estimate_gb']:.2f} GB (x{row['estimate_over_measured']})", flush=True)
    write_result("train_memory", {"device": "cpu", "dtype": "fp32", "shapes": rows})


if __name__ == "__main__":
    main()
