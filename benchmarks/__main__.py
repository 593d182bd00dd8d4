"""Every benchmark, small: `make bench` (python -m benchmarks).

Each runs at a fraction of its recorded size, in a process of its own (all but
benchmarks.llama_cpp_wheel, a build of llama.cpp from scratch twice over: half an hour at any
size), and writes its JSON under
benchmarks/results/quick/ (not over the recorded figures, which the README quotes and which come
from the full runs: `python -m benchmarks.NAME` with its defaults). A check that every benchmark
still runs and prints its figures at this commit, in minutes. Then the README's figures are
refreshed from the recorded results (benchmarks/figures.py), and it says which changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from benchmarks import figures
from benchmarks.common import REPO

QUICK = {  # module -> arguments for a small run
    "parse": ["--repeat", "1"],
    "parse_scaling": ["--copies", "1"],
    "corpus": ["--records", "30000", "--result", "corpus"],
    "tokenize": ["--vocab", "4096", "--repeats", "2"],
    "train_throughput": ["--steps", "3", "--repeats", "1"],
    "train_memory": ["--shapes", "2"],  # the tiny model's: the small preset's take minutes
    "threads": ["--steps", "8", "--tokens", "40", "--repeats", "1"],
    "verify": ["--copies", "2", "--repeats", "3"],
    "finetune": ["--steps", "6", "--max-lengths", "256", "--repeats", "1"],
    "evaluate": ["--steps", "30", "--vocab", "4096", "--repeats", "1", "--harness-batch-sizes", "8", "--generation-items", "8", "--hf-batch-sizes", "8"],
    "prefect_database": ["--flows", "4", "--tasks", "4", "--repeats", "1"],
    "hygiene": ["--records", "60000"],  # its smallest: two files of 20 copies of the samples
    "pii": [],  # the bundled QA rows (the recorded figures: shared/data's fuller copies)
    "demo": [],  # already small: the whole demo, then its cached rerun
}


def main() -> None:
    env = {**os.environ, "MEDLM_BENCH_RESULTS": str(REPO / "benchmarks" / "results" / "quick")}
    failed = []
    for module, args in QUICK.items():
        started = time.time()
        print(f"== benchmarks.{module} {' '.join(args)}", flush=True)
        done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=REPO, env=env)
        print(f"== benchmarks.{module}: {'ok' if done.returncode == 0 else f'FAILED ({done.returncode})'} in {time.time() - started:.0f} s", flush=True)
        if done.returncode:
            failed.append(module)
    figures.main()
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
