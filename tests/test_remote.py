"""The store's remote on a real S3 server (SeaweedFS on loopback): what one machine builds another
reads without building it, fetching only what its stages read, every byte checked; nothing half
uploaded is ever visible; one manifest wins; a corrupt remote copy is quarantined and rebuilt."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path


from storage import ArtifactSpec, Store
from storage.lineage import lineage, tree_lines

REPO = Path(__file__).resolve().parents[1]


def build_files(files: dict[str, bytes], calls: list | None = None):
    def build(work: Path) -> dict:
        if calls is not None:
            calls.append(work)
        for name, data in files.items():
            (work / name).write_bytes(data)
        return {"files": len(files)}

    return build


def machines(tmp_path, remote: str) -> tuple[Store, Store]:
    """Two machines' stores: separate local folders, one remote."""
    return Store(tmp_path / "a", remote=remote), Store(tmp_path / "b", remote=remote)


def test_what_one_machine_builds_another_reads_without_building_and_fetches_only_what_it_reads(s3, tmp_path):
    a, b = machines(tmp_path, s3.url())
    raw = a.get_or_build(ArtifactSpec("raw", "1", {"n": 1}), build_files({"x.bin": b"x" * 100_000}))
    derived_spec = ArtifactSpec("derived", "1", {}, (raw.ref,))
    derived = a.get_or_build(derived_spec, build_files({"y.txt": b"why", "sub.txt": b"z"}))

    calls: list = []
    on_b = b.get_or_build(derived_spec, build_files({"y.txt": b"other"}, calls))
    assert calls == [] and on_b.reused  # found on the remote: not built again
    assert {n: (on_b.path / n).read_bytes() for n in ("y.txt", "sub.txt")} == {"y.txt": b"why", "sub.txt": b"z"}
    assert b.problems(derived.ref) == [] and not raw.path.with_name("nothing").exists()
    assert b.get(raw.ref) is None  # its parent was not fetched: nothing on b read it
    tree = "\n".join(tree_lines(lineage(b, derived.ref)))  # lineage reads the remote's manifests
    assert raw.ref in tree and "missing" not in tree
    assert [x.ref for x in b.ls("raw")] == [raw.ref] and not b.ls("raw")[0].present
    assert b.verified(raw.ref).file("x.bin").read_bytes() == b"x" * 100_000  # a stage about to read it: fetched
    assert b.require(f"raw/{raw.key[:8]}").present and b.newest("derived").ref == derived.ref


def test_a_process_killed_while_uploading_leaves_no_visible_artifact_and_the_rerun_completes(s3, tmp_path):
    remote = s3.url()
    script = (
        "import sys\n"
        "from storage import ArtifactSpec, Store\n"
        "def build(work):\n"
        "    for i in range(40):\n"
        "        (work / f'part-{i:02d}.bin').write_bytes(bytes([i]) * 4_000_000)\n"
        f"Store(sys.argv[1], remote={remote!r}).get_or_build(ArtifactSpec('big', '1'), build)\n"
    )
    killed = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "a")], cwd=REPO)
    a, b = machines(tmp_path, remote)
    deadline = time.time() + 120
    while not list(_blobs(a)):  # the first file is on the remote: the upload is under way
        assert killed.poll() is None and time.time() < deadline, "the upload finished before it could be killed"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    spec = ArtifactSpec("big", "1")
    assert a.remote.manifest(spec.ref) is None and b.ls("big") == []  # blobs without a manifest: nothing to read
    assert 0 < len(list(_blobs(a))) < 40
    published = Store(tmp_path / "a", remote=remote).get_or_build(spec, build_files({}))  # the rerun: built locally already
    assert published.reused and a.remote.manifest(spec.ref)["files"] == published.manifest["files"]
    assert b.verified(spec.ref).file("part-39.bin").read_bytes() == bytes([39]) * 4_000_000


def _blobs(store: Store):
    import obstore

    return [m for batch in obstore.list(store.remote._store, "blobs/") for m in batch]


def test_of_two_machines_building_one_key_one_manifest_wins_and_both_end_with_its_bytes(s3, tmp_path):
    remote = s3.url()
    spec = ArtifactSpec("model", "1")
    offline_b = Store(tmp_path / "b", remote="")  # b built it too, before it could see a's
    offline_b.get_or_build(spec, build_files({"w.bin": b"b's bytes"}))
    a, b = machines(tmp_path, remote)
    a.get_or_build(spec, build_files({"w.bin": b"a's bytes"}))
    on_b = b.get_or_build(spec, build_files({"w.bin": b"never built"}))  # b's copy, then the upload that loses
    assert on_b.file("w.bin").read_bytes() == b"a's bytes"
    [moved] = b.quarantined()
    assert moved["ref"] == spec.ref and "with other bytes, published first" in moved["reasons"][0]
    assert (Path(moved["path"]) / "w.bin").read_bytes() == b"b's bytes"  # never deleted


def test_a_corrupt_remote_copy_is_quarantined_there_and_rebuilt(s3, tmp_path):
    import obstore

    a, b = machines(tmp_path, s3.url())
    spec = ArtifactSpec("shards", "1")
    built = a.get_or_build(spec, build_files({"train.bin": b"\x01\x02" * 1000}))
    blob = f"blobs/sha256/{built.manifest['files']['train.bin']['sha256']}"
    obstore.put(a.remote._store, blob, b"\x01\x03" * 1000)  # same size, other bytes
    assert a.remote.problems(spec.ref) == ["train.bin: sha256 differs from the manifest"]
    calls: list = []
    rebuilt = b.get_or_build(spec, build_files({"train.bin": b"\x01\x02" * 1000}, calls))
    assert len(calls) == 1 and not rebuilt.reused  # the fetch failed its check: built here, and uploaded
    [note] = b.remote.quarantined()
    assert note["ref"] == spec.ref and "sha256 differs from the manifest" in note["reasons"][0]
    assert b.remote.problems(spec.ref) == [] and not (tmp_path / "b" / "shards" / f"{spec.key}.pull").exists()


def test_a_file_remote_is_a_shared_folder(tmp_path):
    a, b = machines(tmp_path, (tmp_path / "shared").as_uri())
    spec = ArtifactSpec("corpus", "1")
    a.get_or_build(spec, build_files({"part-0000.parquet": b"rows"}))
    assert b.require(spec.ref).file("part-0000.parquet").read_bytes() == b"rows"
    assert json.loads((tmp_path / "shared" / "artifacts" / spec.ref / "manifest.json").read_text())["key"] == spec.key


def test_gc_on_the_remote_unpublishes_old_artifacts_and_deletes_the_blobs_nothing_names(s3, tmp_path):
    import obstore

    from storage.retention import plan_removal, remove

    a, b = machines(tmp_path, s3.url())
    pinned = a.get_or_build(ArtifactSpec("corpus", "1", {"night": 0}), build_files({"part.parquet": b"0" * 1000}))
    old = a.get_or_build(ArtifactSpec("corpus", "1", {"night": 1}), build_files({"part.parquet": b"1" * 1000, "stats.json": b"{}"}))
    new = a.get_or_build(ArtifactSpec("corpus", "1", {"night": 2}), build_files({"part.parquet": b"2" * 1000, "stats.json": b"{}"}))
    a.get_or_build(ArtifactSpec("corpus", "1", {"night": 3}), build_files({"part.parquet": b"3" * 1000}))
    b.pin(pinned.ref)  # pins are on the remote too: any machine's gc keeps it
    plan = plan_removal(a, keep_last=2, min_age_s=0, on_remote=True)
    assert [x.ref for x in plan.remove] == [old.ref] and plan.kept[pinned.ref] == "pinned"
    assert remove(a, plan) == [old.ref]
    assert a.remote.manifest(old.ref) is None and b.ls("corpus")[0].ref != old.ref
    blobs = {m["path"].rsplit("/", 1)[1] for batch in obstore.list(a.remote._store, "blobs/") for m in batch}
    assert old.manifest["files"]["part.parquet"]["sha256"] not in blobs
    assert old.manifest["files"]["stats.json"]["sha256"] in blobs  # the newer night names the same bytes
    assert a.get(old.ref) is not None  # this machine's copy is its own store's business
    assert b.require(new.ref).file("part.parquet").read_bytes() == b"2" * 1000


def test_a_machine_that_loses_the_race_for_a_key_while_building_it_finishes_with_the_winners_bytes(s3, tmp_path):
    """D1 of issue 27: b builds a key, a publishes the same key (other bytes) before b uploads; b's
    upload loses, b quarantines its copy and fetches a's, holding the key's lock all along (it used
    to wait on that lock from a second descriptor, for ever)."""
    import threading

    a, b = machines(tmp_path, s3.url())
    spec = ArtifactSpec("pretrain", "1")

    def b_builds(work: Path) -> dict:
        a.get_or_build(spec, build_files({"w.bin": b"a's weights"}))  # the other machine finishes first
        (work / "w.bin").write_bytes(b"b's weights")
        return {}

    result: list = []
    builder = threading.Thread(target=lambda: result.append(b.get_or_build(spec, b_builds)), daemon=True)
    builder.start()
    builder.join(timeout=120)
    assert not builder.is_alive(), "b deadlocked on its own lock"
    assert result[0].file("w.bin").read_bytes() == b"a's weights" and b.problems(spec.ref) == []
    assert [q["ref"] for q in b.quarantined()] == [spec.ref]


def test_a_blob_deleted_from_the_remote_is_corruption_the_artifact_is_rebuilt_and_nothing_half_fetched_stays(s3, tmp_path):
    """D2 of issue 27: a pull whose blob is gone raised FileNotFoundError every time, and left its
    KEY.pull folder. It is treated as corruption: the remote's manifest is quarantined, the
    artifact built again here and uploaded."""
    import obstore

    a, b = machines(tmp_path, s3.url())
    spec = ArtifactSpec("shards", "1")
    built = a.get_or_build(spec, build_files({"train.bin": b"t" * 1000, "val.bin": b"v" * 10}))
    obstore.delete(a.remote._store, f"blobs/sha256/{built.manifest['files']['train.bin']['sha256']}")
    calls: list = []
    rebuilt = b.get_or_build(spec, build_files({"train.bin": b"t" * 1000, "val.bin": b"v" * 10}, calls))
    assert len(calls) == 1 and rebuilt.file("train.bin").read_bytes() == b"t" * 1000
    [note] = b.remote.quarantined()
    assert note["ref"] == spec.ref and "the blob is missing" in note["reasons"][0]
    assert b.remote.problems(spec.ref) == [] and not list((tmp_path / "b" / "shards").glob("*.pull"))


def test_remote_gc_spares_the_blobs_of_an_upload_under_way_and_a_publish_puts_back_a_blob_collected_meanwhile(s3, tmp_path, monkeypatch):
    """D3 of issue 27: `gc --remote` deleted every blob no manifest named, those of an upload under
    way too (its manifest comes last); that machine then published a manifest naming a deleted
    blob, and never uploaded it again. Blobs younger than the minimum age stay, and a publish checks
    its blobs once its manifest is written."""
    import obstore

    from storage.remote import Remote

    a, b = machines(tmp_path, s3.url())
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "part.bin").write_bytes(b"p" * 1000)
    digest = hashlib.sha256(b"p" * 1000).hexdigest()
    a.remote._put_blobs(folder, {"files": {"part.bin": {"sha256": digest, "size": 1000}}})  # an upload under way: no manifest yet
    b.remote.collect_blobs(min_age_s=3600)
    assert a.remote._has(f"blobs/sha256/{digest}", 1000)  # young: spared

    real = Remote._put_blobs
    calls = []

    def collected_between(self, folder, manifest):  # a gc that listed the manifests before ours, deleting after
        real(self, folder, manifest)
        calls.append(1)
        if len(calls) == 1:
            for entry in manifest["files"].values():
                obstore.delete(self._store, f"blobs/sha256/{entry['sha256']}")

    monkeypatch.setattr(Remote, "_put_blobs", collected_between)
    spec = ArtifactSpec("corpus", "1")
    a.get_or_build(spec, build_files({"part.bin": b"p" * 1000}))
    assert a.remote.problems(spec.ref) == [] and b.require(spec.ref).file("part.bin").read_bytes() == b"p" * 1000
