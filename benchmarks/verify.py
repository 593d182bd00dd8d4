"""What verifying a stage's inputs costs: the store's sha256 check against hashing the same files
with nothing around it.

    python -m benchmarks.verify [--copies 16] [--repeats 5]

The inputs are the two whole NCBI files (57 MB, fetched as benchmarks/common.py says), and a
shard-sized file made of ``--copies`` copies of them, published as one artifact. Measured, page
cache warm for all, interleaved (benchmarks/common.py ``interleaved``: median and spread):

- ``hashlib``: Python's hashlib.file_digest on the same files: the like-for-like floor, since the
  store hashes with hashlib (OpenSSL's SHA-256) too;
- ``cold``: ``Store.verified`` with nothing remembered: every file hashed, and the manifest and
  the remembered states read and written (what the first read after a copy, a restore or a
  change costs);
- ``warm``: ``Store.verified`` again: every file's (size, mtime, inode) matches what was
  remembered, nothing is hashed (what every later run costs);
- ``sha256sum``: coreutils on the same files, for scale only: it is another SHA-256
  implementation (without OpenSSL's SHA extensions here), not another way to verify;
- ``read alone`` and ``read in the store``: a build that reads every byte of the inputs once
  (numpy, as a stage reading its shards would), called bare, and as a stage through
  ``Store.get_or_build``, whose inputs are hashed again in a background thread while it builds
  (bit rot keeps (size, mtime, inode): nothing is published from an input that no longer
  matches its sha256). The difference is what that re-hash costs a build that does nothing
  else; a build that computes for longer hides it on a second core.

Writes benchmarks/results/verify.json.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import full_pubmed_files, interleaved, write_result
from storage import ArtifactSpec, Store
from storage.store import VERIFIED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=16, help="copies of the two files in the shard-sized file")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    load = os.getloadavg()
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
        def hashlib_only():
            for f in files:
                with open(f, "rb") as handle:
                    hashlib.file_digest(handle, "sha256")

        def cold():
            shutil.rmtree(store.root / VERIFIED, ignore_errors=True)
            store.verified(artifact.ref)

        def read(work: Path | None = None) -> dict:
            return {"byte_sum": int(sum(np.fromfile(f, dtype=np.uint8).sum(dtype=np.uint64) for f in files))}

        builds = itertools.count()

        def read_in_the_store():
            store.get_or_build(ArtifactSpec("derived", "bench", {"n": next(builds)}, (artifact.ref,)), read)

        figures = interleaved({
            "hashlib": hashlib_only,
            "cold": cold,
            "warm": lambda: store.verified(artifact.ref),
            "sha256sum": lambda: subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True),
            "read alone": read,
            "read in the store": read_in_the_store,
        }, args.repeats)
        for name, f in figures.items():
            f["mb_per_s"] = round(total_mb / f["median"], 1)
            print(f"{name:10s} median {f['median']:8.4f} s (spread {f['min']:.4f}-{f['max']:.4f})  {f['mb_per_s']:10.1f} MB/s")
    result = {
        "files": [f.name for f in files],
        "megabytes": round(total_mb, 1),
        "repeats": args.repeats,
        "figures": figures,
        "cold_over_hashlib": round(figures["cold"]["median"] / figures["hashlib"]["median"], 3),
        "read_in_the_store_over_read_alone": round(figures["read in the store"]["median"] / figures["read alone"]["median"], 3),
        "load_average_before": load,
    }
    print(f"cold verification takes {result['cold_over_hashlib']:.2f}x the time of hashing the files alone; "
          f"warm costs {figures['warm']['median'] * 1000:.2f} ms; a build that only reads its inputs takes "
          f"{result['read_in_the_store_over_read_alone']:.2f}x as long in the store (its inputs hashed again as it builds)")
    print(write_result("verify", result))


if __name__ == "__main__":
    main()
