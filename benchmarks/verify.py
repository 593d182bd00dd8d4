"""What verifying a stage's inputs costs: the store's sha256 check against `sha256sum` on the same files.

    python -m benchmarks.verify [--copies 16]

The inputs are the two whole NCBI files (57 MB, fetched as benchmarks/common.py says), and a
shard-sized file made of ``--copies`` copies of them, published as one artifact. Measured, page
cache warm for all (each is run once before it is timed):

- ``sha256sum``: coreutils on the same files, the reference;
- ``cold``: ``Store.verified`` with nothing remembered: every file hashed (what the first read
  after a copy, a restore or a change costs);
- ``warm``: ``Store.verified`` again: every file's (size, mtime, inode) matches what was
  remembered, nothing is hashed (what every later run costs).

Writes benchmarks/results/verify.json.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import full_pubmed_files, write_result
from storage import ArtifactSpec, Store
from storage.store import VERIFIED


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=16, help="copies of the two files in the shard-sized file")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sources = full_pubmed_files()
    if not sources:
        raise SystemExit("the full NCBI files could not be fetched; see benchmarks/common.py")
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")

        def build(work: Path) -> dict:
            for source in sources:
                shutil.copyfile(source, work / source.name)
            with open(work / "train_0000.bin", "wb") as big:
                for _ in range(args.copies):
                    for source in sources:
                        big.write(source.read_bytes())
            return {}

        artifact = store.get_or_build(ArtifactSpec("shards", "bench"), build)
        files = [artifact.path / name for name in artifact.manifest["files"]]
        total_mb = sum(f.stat().st_size for f in files) / 1e6
        sha256sum = lambda: subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True)  # noqa: E731

        def cold():
            shutil.rmtree(store.root / VERIFIED, ignore_errors=True)
            store.verified(artifact.ref)

        warm = lambda: store.verified(artifact.ref)  # noqa: E731
        figures = {}
        for name, action in (("sha256sum", sha256sum), ("cold", cold), ("warm", warm)):
            action()  # page cache and remembered states as they will be
            best = min(timed(action) for _ in range(args.repeats))
            figures[name] = {"seconds": round(best, 4), "mb_per_s": round(total_mb / best, 1)}
            print(f"{name:10s} {best:8.3f} s  {total_mb / best:10.1f} MB/s")
    result = {
        "files": [f.name for f in files],
        "megabytes": round(total_mb, 1),
        "repeats": args.repeats,
        "figures": figures,
        "cold_over_sha256sum": round(figures["sha256sum"]["seconds"] / figures["cold"]["seconds"], 3),
    }
    print(f"cold verification runs at {result['cold_over_sha256sum']:.2f}x sha256sum's speed; warm costs {figures['warm']['seconds'] * 1000:.1f} ms")
    print(write_result("verify", result))


if __name__ == "__main__":
    main()
