"""What building llama-cpp-python's wheel costs: as `make llama-cpp-wheel` builds it (the CMake
options LLAMA_CPP_CMAKE_ARGS of the Makefile) against the sdist's own defaults (how it was built
before).

    python -m benchmarks.llama_cpp_wheel [--repeats 1]

Each build is `pip wheel --no-deps` of the same sdist (downloaded once into the benchmark cache)
from scratch: pip's isolated build environment and a fresh build folder, nothing cached between
builds (no ccache). The variants run in interleaved rounds (benchmarks/common.py ``rounds``);
per build: wall seconds, the CPU seconds of the build's processes (user + system: what a
neighbour's load changes least), the wheel's size, and the load average before and after.
On a shared machine the wall times carry the neighbours' load; the CPU seconds are the work.

Writes benchmarks/results/llama_cpp_wheel.json.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import CACHE, REPO, rounds, write_result


def makefile_value(name: str) -> str:
    """A ``NAME := value`` of the Makefile, $(CURDIR) as the repository."""
    value = re.search(rf"^{name} := (.*)$", (REPO / "Makefile").read_text(), re.M).group(1)
    return value.replace("$(CURDIR)", str(REPO))


def sdist() -> Path:
    version = makefile_value("LLAMA_CPP_VERSION")
    path = CACHE / f"llama_cpp_python-{version}.tar.gz"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", str(CACHE)], check=True)
    return path


def build(source: Path, cmake_args: str) -> dict:
    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    with tempfile.TemporaryDirectory() as out:
        load, cpu_before, start = os.getloadavg()[0], cpu(), time.perf_counter()
        env = {**os.environ, "CMAKE_ARGS": cmake_args}
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", "-w", out, str(source)], env=env, check=True)
        wall, cpu_seconds = time.perf_counter() - start, cpu() - cpu_before
        wheel = next(Path(out).glob("*.whl"))
        return {"wall_s": round(wall, 1), "cpu_s": round(cpu_seconds, 1), "wheel_mb": round(wheel.stat().st_size / 1e6, 2),
                "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    source = sdist()
    variants = {"make_llama_cpp_wheel": makefile_value("LLAMA_CPP_CMAKE_ARGS"), "sdist_defaults": ""}  # names a figure's path can hold
    found = rounds({name: (lambda cmake_args=cmake_args: build(source, cmake_args)) for name, cmake_args in variants.items()}, args.repeats)
    results = {
        name: {"cmake_args": variants[name], "median_wall_s": statistics.median(b["wall_s"] for b in builds),
               "median_cpu_s": statistics.median(b["cpu_s"] for b in builds), "builds": builds}
        for name, builds in found.items()
    }
    print(write_result("llama_cpp_wheel", {"cores": os.cpu_count(), "variants": results}))
    for name, r in results.items():
        print(f"{name:>22}: wall {r['median_wall_s']:.0f} s, CPU {r['median_cpu_s']:.0f} s ({len(r['builds'])} builds; {r['cmake_args'] or 'no CMAKE_ARGS'})")


if __name__ == "__main__":
    main()
