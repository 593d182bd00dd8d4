"""Training and generation beside a neighbour: tokens/s of the demo's pretraining step, and of
greedy generation with the same model, quiet, beside a one-thread spinner, and beside a second run
of the same work, for torch's own thread settings and ours.

    python -m benchmarks.threads [--steps 60] [--tokens 200] [--repeats 3]

The step is the demo's (tiny preset, 4,096-token vocabulary, batch 8 x 256, AdamW, fp32), run by
model.train.train on random shards in a fresh process per measurement. Generation is ``tokens``
greedy tokens after a 32-token prompt, one at a time from the key/value cache
(model/scoring.py, as `medlm chat` answers), with random weights. Settings:

- ``torch``: what a process got before model/threads.py: one thread per core, OpenMP's default
  wait (spinning), no tuner (OMP_NUM_THREADS = the cores, which also pins our count);
- ``one``: one thread (OMP_NUM_THREADS=1);
- ``medlm``: what medlm does now (model/threads.py: the usable cores, the tuner).

Each condition runs every setting in turn, ``--repeats`` rounds (benchmarks.common.rounds); the
figure is the median round with the slowest and fastest. A training run's tokens/s is its steps
after the first five (start-up) over their seconds, probes of the tuner included; a generation
run's, every token, the prompt's pass included (what a user waits for), over at most 15 s. Beside the spinner, a
core is taken, so one thread's speed is the most a 2-core machine can give; the figure to read
is the ratio to the same setting's quiet speed, and to medlm's quiet speed. Also: the machine's
fp32 matmul peak (1 thread and every core) and the share of it a step reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, rounds, write_result

SPINNER = [sys.executable, "-c", "while True: pass"]
CONDITIONS = ("quiet", "beside_a_spinner", "beside_a_second_run")  # JSON keys (benchmarks/figures.py paths have no spaces)
WORKS = ("training", "generation")
SKIP = 5  # start-up steps left out of a training run's tokens/s
GENERATION_CAP_S = 15  # a generation run stops after this many seconds, its tokens/s from the tokens it made


def settings(cores: int) -> dict[str, dict[str, str]]:
    return {"torch": {"OMP_NUM_THREADS": str(cores)}, "one": {"OMP_NUM_THREADS": "1"}, "medlm": {}}


def child(work: str, steps: int, tokens: int, out: Path) -> None:
    """One training or generation run here; prints its tokens/s and the thread counts its steps ran on."""
    if work == "generation":
        return generation_child(tokens)
    import numpy as np

    from model.data import write_shards
    from model.train import TrainConfig, train

    rng = np.random.default_rng(0)
    shards = write_shards(out / "shards", {s: [rng.integers(4, 4096, n).astype(np.uint16)] for s, n in (("train", 2_000_000), ("val", 20_000))}, 4096)
    config = TrainConfig.of(preset="tiny", batch_size=8, max_steps=steps, lr=1e-3, eval_every=10**6, eval_windows=1, checkpoint_every=10**6, device="cpu")
    train(config, shards, out / "run")
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "step_s" in r][SKIP:]
    print(json.dumps({
        "tokens_per_s": sum(r["tokens_per_s"] * r["step_s"] for r in timed) / sum(r["step_s"] for r in timed),
        "threads": [r["threads"] for r in records if "threads" in r],
    }))


def generation_child(tokens: int) -> None:
    import torch
    from tokenizers import Tokenizer, models

    from model.model import ModelConfig, Transformer
    from model.scoring import TransformerLM

    torch.manual_seed(0)
    lm = TransformerLM(Transformer(ModelConfig.preset("tiny", vocab_size=4096)), Tokenizer(models.BPE()))  # token ids only: no text
    used: list[int] = []
    lm.model.register_forward_pre_hook(lambda *_: used.append(torch.get_num_threads()))
    prompt = torch.randint(4, 4096, (32,)).tolist()
    seconds = []
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in lm._steps([prompt], tokens):
            seconds.append(time.perf_counter() - start)
            if sum(seconds) > GENERATION_CAP_S:  # torch's own settings beside a busy core: a few tokens a second
                break
            start = time.perf_counter()
    print(json.dumps({"tokens_per_s": len(seconds) / sum(seconds), "threads": used}))


def run(setting: dict[str, str], work: str, args: argparse.Namespace) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")} | setting
    folder = tempfile.mkdtemp(prefix="medlm-threads-")
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.threads", "--child", folder, "--work", work, "--steps", str(args.steps), "--tokens", str(args.tokens)],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    process.folder = folder
    return process


def result(process: subprocess.Popen) -> dict:
    out, _ = process.communicate()
    shutil.rmtree(process.folder, ignore_errors=True)
    if process.returncode:
        raise SystemExit(f"a training run failed ({process.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def measure(condition: str, setting: dict[str, str], work: str, args: argparse.Namespace) -> dict:
    neighbour = subprocess.Popen(SPINNER) if condition == "beside_a_spinner" else run(setting, work, args) if condition == "beside_a_second_run" else None
    try:
        time.sleep(0.5 if neighbour else 0)
        mine = result(run(setting, work, args))
    finally:
        if condition == "beside_a_spinner":
            neighbour.kill()
            neighbour.wait()
    if condition == "beside_a_second_run":  # both ran the same training side by side: each is a measurement
        second = result(neighbour)
        mine["tokens_per_s"] = (mine["tokens_per_s"] + second["tokens_per_s"]) / 2
    return mine


def matmul_peak(threads: int, size: int = 1024, seconds: float = 1.0) -> float:
    """fp32 FLOP/s of a size x size matmul on ``threads`` threads, best of a few timed batches."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * size**3 / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (the first five are not timed)")
    parser.add_argument("--tokens", type=int, default=200, help="generated tokens per run (the first five are not timed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", choices=WORKS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.work, args.steps, args.tokens, Path(args.child))

    from storage.processes import usable_cores

    cores, load = usable_cores(), os.getloadavg()
    by_work = {}
    for work in WORKS:
        figures: dict[str, dict[str, dict]] = {}
        for condition in CONDITIONS:
            runs = rounds({name: (lambda s=setting: measure(condition, s, work, args)) for name, setting in settings(cores).items()}, args.repeats)
            figures[condition] = {}
            for name, done in runs.items():
                speeds = [r["tokens_per_s"] for r in done]
                figures[condition][name] = {"median": round(statistics.median(speeds)), "min": round(min(speeds)), "max": round(max(speeds)),
                                            "rounds": [round(s) for s in speeds], "threads_used": sorted({t for r in done for t in r["threads"]})}
                print(f"{work:10s} {condition:20s} {name:6s} {figures[condition][name]['median']:>7,} tokens/s ({figures[condition][name]['min']:,}-{figures[condition][name]['max']:,})", flush=True)
        quiet = figures["quiet"]
        by_work[work] = {
            "tokens_per_s": figures,
            "ratio_to_quiet_same_setting": {condition: {name: round(f["median"] / quiet[name]["median"], 2) for name, f in by_setting.items()} for condition, by_setting in figures.items()},
            "ratio_to_medlm_quiet": {condition: {name: round(f["median"] / quiet["medlm"]["median"], 2) for name, f in by_setting.items()} for condition, by_setting in figures.items()},
        }
        for condition in CONDITIONS[1:]:
            ratios = by_work[work]["ratio_to_quiet_same_setting"][condition]
            print(f"{work} {condition}: medlm {ratios['medlm']}x its quiet speed (torch's settings {ratios['torch']}x)")

    from model.model import ModelConfig, Transformer

    flops_per_token = Transformer(ModelConfig.preset("tiny", vocab_size=4096)).flops_per_token()
    peak = {"1 thread": matmul_peak(1), f"{cores} threads": matmul_peak(cores)}
    quiet = by_work["training"]["tokens_per_s"]["quiet"]
    share = {f"{name}, quiet, of the {cores}-thread peak": round(quiet[name]["median"] * flops_per_token / peak[f"{cores} threads"], 3) for name in quiet}
    share["one, quiet, of the 1-thread peak"] = round(quiet["one"]["median"] * flops_per_token / peak["1 thread"], 3)
    print(f"fp32 matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak.items()) + "; a training step reaches " +
          ", ".join(f"{v:.0%} ({k})" for k, v in share.items()))
    path = write_result("threads", {
        "load_average_before": load, "usable_cores": cores, "settings": settings(cores), "steps": args.steps, "tokens": args.tokens, "repeats": args.repeats,
        "by_work": by_work, "training_flops_per_token": flops_per_token, "matmul_peak_flops": peak, "training_share_of_peak": share,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
