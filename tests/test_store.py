"""The artifact store: keys, atomic builds, verification, crash recovery, concurrency, lineage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage import ArtifactError, ArtifactSpec, Store, remove_tree
from storage.lineage import lineage, stage_times, tree_lines
from storage.store import MANIFEST


def write_files(files: dict[str, bytes]):
    def build(work: Path) -> dict:
        for name, data in files.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_bytes(data)
        return {"files_written": len(files)}

    return build


def test_key_depends_on_everything_that_decides_content():
    base = ArtifactSpec("corpus", "1", {"min_chars": 200}, ("parsed/aa",))
    assert base.key == ArtifactSpec("corpus", "1", {"min_chars": 200}, ("parsed/aa",)).key
    others = [
        ArtifactSpec("corpus", "2", {"min_chars": 200}, ("parsed/aa",)),
        ArtifactSpec("corpus", "1", {"min_chars": 100}, ("parsed/aa",)),
        ArtifactSpec("corpus", "1", {"min_chars": 200}, ("parsed/bb",)),
        ArtifactSpec("shards", "1", {"min_chars": 200}, ("parsed/aa",)),
    ]
    assert len({base.key, *(s.key for s in others)}) == 5
    # Parameter order does not matter; values do.
    assert ArtifactSpec("k", "1", {"a": 1, "b": 2}).key == ArtifactSpec("k", "1", {"b": 2, "a": 1}).key


def test_build_once_then_reuse(store):
    spec = ArtifactSpec("corpus", "1", {"x": 1})
    calls = []

    def build(work: Path) -> dict:
        calls.append(work)
        (work / "data.txt").write_text("hello")
        return {"rows": 1}

    first = store.get_or_build(spec, build)
    again = store.get_or_build(spec, build)
    assert len(calls) == 1 and not first.reused and again.reused
    assert first.ref == again.ref == f"corpus/{spec.key}"
    assert again.file("data.txt").read_text() == "hello"
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert manifest["summary"] == {"rows": 1} and manifest["params"] == {"x": 1}
    assert manifest["files"]["data.txt"]["size"] == 5
    assert not store.work_dir(spec).exists()


def test_failed_build_leaves_no_artifact(store):
    spec = ArtifactSpec("parsed", "1", {"file": "bad.xml"})

    def build(work: Path) -> dict:
        (work / "articles.parquet").write_bytes(b"half")
        raise ValueError("bad.xml line 3: broken")

    with pytest.raises(ValueError, match="line 3"):
        store.get_or_build(spec, build)
    assert store.get(spec.kind, spec.key) is None
    assert store.ls() == [] and not store.work_dir(spec).exists()  # no half-built folder left behind
    # The next attempt starts from a clean work folder.
    artifact = store.get_or_build(spec, write_files({"articles.parquet": b"good"}))
    assert artifact.file("articles.parquet").read_bytes() == b"good"
    assert sorted(p.name for p in artifact.path.iterdir()) == ["articles.parquet", MANIFEST]


def test_resume_keeps_the_work_folder_of_a_killed_run(store):
    spec = ArtifactSpec("download", "1", {"file_name": "x.xml.gz"})
    store.work_dir(spec).mkdir(parents=True)
    (store.work_dir(spec) / "x.xml.gz.part").write_bytes(b"first half")

    def finish(work: Path) -> dict:
        part = work / "x.xml.gz.part"
        data = part.read_bytes() + b" second half"
        part.unlink()
        (work / "x.xml.gz").write_bytes(data)
        return {}

    artifact = store.get_or_build(spec, finish, resume=True)
    assert artifact.file("x.xml.gz").read_bytes() == b"first half second half"


def test_a_resumable_build_that_fails_before_writing_leaves_no_work_folder(store):
    spec = ArtifactSpec("pretrain", "1")

    def refuse(work: Path) -> dict:
        raise RuntimeError("needs about 42.4 GB and cpu has 20.9 GB")

    def fail_after_a_checkpoint(work: Path) -> dict:
        (work / "ckpt_0000010").mkdir()
        raise RuntimeError("killed at step 12")

    with pytest.raises(RuntimeError, match="42.4 GB"):
        store.get_or_build(spec, refuse, resume=True)
    assert not store.work_dir(spec).exists()  # no empty KEY.partial to resume from
    with pytest.raises(RuntimeError, match="step 12"):
        store.get_or_build(spec, fail_after_a_checkpoint, resume=True)
    assert (store.work_dir(spec) / "ckpt_0000010").is_dir()  # what there is to resume from stays


def test_corrupted_artifact_fails_verification_and_is_rebuilt(store):
    spec = ArtifactSpec("corpus", "1")
    artifact = store.get_or_build(spec, write_files({"a.bin": b"0123456789"}))
    # Same size, different bytes: only the deep (sha256) check sees it.
    artifact.file("a.bin").write_bytes(b"9876543210")
    assert store.get(artifact.ref) is not None
    assert store.problems(artifact.ref) == [f"{artifact.file('a.bin')}: sha256 differs from the manifest"]
    # Truncated: the default check sees it, and the artifact is rebuilt.
    artifact.file("a.bin").write_bytes(b"01")
    assert store.get(artifact.ref) is None
    rebuilt = store.get_or_build(spec, write_files({"a.bin": b"0123456789"}))
    assert not rebuilt.reused and store.problems(rebuilt.ref) == []


def test_no_manifest_no_artifact(store):
    spec = ArtifactSpec("corpus", "1")
    artifact = store.get_or_build(spec, write_files({"a.bin": b"x"}))
    (artifact.path / MANIFEST).unlink()
    assert store.get(artifact.ref) is None and store.ls() == []


BUILDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from storage import ArtifactSpec, Store

    root, mode = sys.argv[1], sys.argv[2]
    spec = ArtifactSpec("corpus", "1", {"n": 1})

    def build(work: Path) -> dict:
        with open(Path(root) / "builds.log", "a") as log:
            log.write("build\\n")
        (work / "part1.bin").write_bytes(b"a" * 1000)
        if mode == "hang":
            print("building", flush=True)
            time.sleep(60)
        time.sleep(0.5)
        (work / "part2.bin").write_bytes(b"b" * 1000)
        return {"rows": 2}

    artifact = Store(Path(root) / "store").get_or_build(spec, build)
    print(artifact.ref, artifact.reused, flush=True)
    """
)


def _builder(tmp_path: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(tmp_path), mode],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )


def test_a_build_killed_midway_is_cleaned_up_and_redone(tmp_path):
    proc = _builder(tmp_path, "hang")
    assert proc.stdout.readline().strip() == "building"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store(tmp_path / "store")
    assert store.ls() == []  # the half-built folder is not an artifact
    partial = list((tmp_path / "store" / "corpus").glob("*.partial"))
    assert len(partial) == 1 and (partial[0] / "part1.bin").exists()

    done = _builder(tmp_path, "normal")
    out, _ = done.communicate(timeout=60)
    ref, reused = out.split()
    artifact = store.require(ref)
    assert reused == "False" and store.problems(ref) == []
    assert sorted(artifact.manifest["files"]) == ["part1.bin", "part2.bin"]
    assert not partial[0].exists()


def test_two_processes_building_the_same_key_build_it_once(tmp_path):
    procs = [_builder(tmp_path, "normal") for _ in range(2)]
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0][0] == outputs[1][0]
    assert sorted(o[1] for o in outputs) == ["False", "True"]  # one built, the other waited and reused
    assert (tmp_path / "builds.log").read_text().count("build") == 1
    assert Store(tmp_path / "store").problems(outputs[0][0]) == []


def test_lineage_tree_reaches_the_source_files(store):
    label = "pubmed25n0001.xml.gz md5=" + "ab" * 16
    download = store.get_or_build(ArtifactSpec("download", "1", {"name": "pubmed25n0001.xml.gz"}), write_files({"f": b"x"}), label=label)
    parsed = store.get_or_build(ArtifactSpec("parse", "1", {}, (download.ref,)), write_files({"p": b"y"}))
    corpus = store.get_or_build(ArtifactSpec("corpus", "1", {}, (parsed.ref,)), lambda w: {"documents": 7})
    lines = tree_lines(lineage(store, corpus.ref))
    assert lines[0].startswith(corpus.ref) and "documents=7" in lines[0]
    assert parsed.ref in lines[1]
    assert download.ref in lines[2] and label in lines[2]
    tree = lineage(store, corpus.ref).as_dict()
    assert tree["parents"][0]["parents"][0]["params"]["name"] == "pubmed25n0001.xml.gz"


def test_stage_times_show_what_a_run_built_and_what_it_found_cached(store):
    download = store.get_or_build(ArtifactSpec("download", "1", {"name": "pubmed25n0001.xml.gz"}), write_files({"f": b"x"}))
    run_started = time.time()  # the download above is an earlier run's: this run finds it in the store

    def slow_parse(work: Path) -> dict:
        time.sleep(0.3)
        (work / "p").write_bytes(b"y")
        return {}

    parsed = [store.get_or_build(ArtifactSpec("parse", "1", {"n": n}, (download.ref,)), slow_parse) for n in range(2)]
    corpus = store.get_or_build(ArtifactSpec("corpus", "1", {}, tuple(p.ref for p in parsed)), lambda w: {"documents": 7})
    lines = stage_times(lineage(store, corpus.ref), since=run_started).splitlines()
    assert [line.split()[0] for line in lines] == ["download", "parse", "corpus"]
    assert lines[0].split()[1:] == ["cached", "(1", "in", "the", "store)"]
    parse_seconds, unit, *counts = lines[1].split()[1:]
    assert 0.6 <= float(parse_seconds) < 5 and unit == "s" and counts == ["2", "built"]  # the two builds' seconds, added
    assert lines[2].split()[2:] == ["s", "1", "built"]
    rerun = stage_times(lineage(store, corpus.ref), since=time.time()).splitlines()
    assert [line.split()[1] for line in rerun] == ["cached"] * 3


def test_bad_refs_are_explained(store):
    with pytest.raises(Exception, match="expected KIND/KEY"):
        store.get("corpus")
    with pytest.raises(Exception, match="not in the store"):
        store.require("corpus/0123456789abcdef0123")


def test_a_resumed_build_ignores_a_manifest_left_half_written(store):
    spec = ArtifactSpec("checkpoint", "1")
    work = store.work_dir(spec)
    work.mkdir(parents=True)
    (work / f".{MANIFEST}.tmp").write_text('{"kind": "checkp')  # killed while writing the manifest
    artifact = store.get_or_build(spec, write_files({"model.safetensors": b"w"}), resume=True)
    assert sorted(artifact.manifest["files"]) == ["model.safetensors"]
    assert store.get(artifact.ref) is not None


def test_verify_reports_a_manifest_of_another_artifact(store):
    artifact = store.get_or_build(ArtifactSpec("corpus", "1"), write_files({"a": b"x"}))
    other = store.get_or_build(ArtifactSpec("corpus", "2"), write_files({"a": b"x"}))
    (artifact.path / MANIFEST).write_text((other.path / MANIFEST).read_text())
    assert store.get(artifact.ref) is None
    assert "describes " + other.ref in store.problems(artifact.ref)[0]


def test_an_artifact_that_fails_its_check_is_quarantined_and_rebuilt_never_deleted(store):
    spec = ArtifactSpec("checkpoint", "1", {"steps": 5})
    trained = store.get_or_build(spec, write_files({"model.safetensors": b"weights of a long run"}))
    (trained.path / MANIFEST).chmod(0o644)
    (trained.path / MANIFEST).unlink()

    rebuilt = store.get_or_build(spec, write_files({"model.safetensors": b"weights again"}))
    assert not rebuilt.reused and rebuilt.file("model.safetensors").read_bytes() == b"weights again"
    [moved] = store.quarantined()
    assert moved["ref"] == trained.ref and moved["reasons"] == [f"{trained.path / MANIFEST}: missing"]
    assert (Path(moved["path"]) / "model.safetensors").read_bytes() == b"weights of a long run"

    # Only an explicit purge deletes, read-only files included.
    assert [item["ref"] for item in store.purge_quarantine()] == [trained.ref]
    assert store.quarantined() == [] and not Path(moved["path"]).exists()


def test_published_files_and_folders_have_no_write_bits(store):
    artifact = store.get_or_build(ArtifactSpec("corpus", "1"), write_files({"a.bin": b"x", "sub/b.bin": b"y"}))
    for path in [artifact.path, *artifact.path.rglob("*")]:
        assert path.stat().st_mode & 0o222 == 0, path
    assert store.problems(artifact.ref) == []  # verifying needs no write access


def _hashes(monkeypatch) -> list[tuple[str, str]]:
    """(file name, thread) of every sha256 the store computes from now on."""
    import threading

    import storage.store as store_module

    hashed: list[tuple[str, str]] = []  # the test's own thread is "here"
    real_sha256 = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda path: hashed.append((Path(path).name, "here" if threading.current_thread() is threading.main_thread() else threading.current_thread().name)) or real_sha256(path))
    return hashed


def test_a_build_hashes_each_input_file_once_before_it_or_while_it_builds(store, monkeypatch):
    """A file whose (size, mtime, inode) the store hashed before is not hashed before a build
    starts (a 40 GB shard set would hold it up), but while it builds, in a thread, since bit rot
    keeps all three: each input file is hashed once a build, and nothing is published unchecked."""
    parent = store.get_or_build(ArtifactSpec("shards", "1"), write_files({"train.bin": b"t" * 100, "val.bin": b"v"}))
    hashed = _hashes(monkeypatch)

    store.get_or_build(ArtifactSpec("checkpoint", "1", {"run": 1}, (parent.ref,)), write_files({"w": b"1"}))
    assert sorted(h for h in hashed if h[0].endswith(".bin")) == [("train.bin", "medlm-rehash"), ("val.bin", "medlm-rehash")]

    hashed.clear()
    os.utime(parent.file("train.bin"), ns=(1, 1))  # a new state (mtime), same bytes: hashed before the build
    store.get_or_build(ArtifactSpec("checkpoint", "1", {"run": 2}, (parent.ref,)), write_files({"w": b"2"}))
    assert sorted(h for h in hashed if h[0].endswith(".bin")) == [("train.bin", "here"), ("val.bin", "medlm-rehash")]


def test_a_file_linked_from_an_input_is_not_hashed_again_and_removing_it_leaves_the_input_read_only(store, monkeypatch):
    previous = store.get_or_build(ArtifactSpec("corpus", "1", {"night": 1}), write_files({"part.parquet": b"p" * 100}))
    hashed = _hashes(monkeypatch)

    def link_and_add(work: Path) -> None:
        os.link(previous.file("part.parquet"), work / "part.parquet")
        (work / "new.parquet").write_bytes(b"n")

    tonight = store.get_or_build(ArtifactSpec("corpus", "1", {"night": 2}), link_and_add, also_reads=[previous.ref])
    # The input's file is checked as the build runs; published, the link's digest is the input's.
    assert sorted(hashed) == [("new.parquet", "here"), ("part.parquet", "medlm-rehash")]
    assert tonight.manifest["files"]["part.parquet"] == previous.manifest["files"]["part.parquet"]
    assert store.problems(tonight.ref) == []  # (which re-hashes every file)

    # Not given as an input, the same link is hashed: a digest is only reused from a verified input.
    hashed.clear()
    store.get_or_build(ArtifactSpec("corpus", "1", {"night": 3}), link_and_add)
    assert sorted(hashed) == [("new.parquet", "here"), ("part.parquet", "here")]

    remove_tree(tonight.path)  # a published, read-only folder holding a link
    assert previous.file("part.parquet").stat().st_mode & 0o222 == 0 and store.problems(previous.ref) == []


def test_a_corrupted_input_is_quarantined_and_no_output_is_published(store):
    parent = store.get_or_build(ArtifactSpec("shards", "1"), write_files({"train.bin": b"0123456789"}))
    shard = parent.file("train.bin")
    shard.chmod(0o644)
    with open(shard, "r+b") as f:  # flip two bytes in place: same size, so only the hash tells
        f.seek(3)
        f.write(b"43")
    child = ArtifactSpec("checkpoint", "1", {}, (parent.ref,))
    with pytest.raises(Exception, match=f"{shard}: sha256 differs from the manifest"):
        store.get_or_build(child, write_files({"w": b"trained on bad data"}))
    assert store.get(child.kind, child.key) is None and not store.work_dir(child).exists()
    assert [item["ref"] for item in store.quarantined()] == [parent.ref]
    assert store.get(parent.ref) is None  # so the next run rebuilds it


def test_lineage_markdown_summarises_many_files_and_diff_names_what_changed(store):
    from storage.lineage import diff, dot, markdown

    parsed = []
    for seq in range(1, 16):
        name, folder = f"pubmed25n{seq:04d}.xml.gz", "baseline" if seq <= 10 else "updatefiles"
        params = {"name": name, "folder": folder, "md5": f"{seq:032x}", "seq": seq}
        download = store.get_or_build(ArtifactSpec("download", "1", params), write_files({name: b"x"}), label=f"{name} md5={seq:032x}")
        parsed.append(store.get_or_build(ArtifactSpec("parse", "1", {}, (download.ref,)), write_files({"a": b"y"}), label=name))
    old = store.get_or_build(ArtifactSpec("corpus", "1", {"min_abstract_chars": 200}, tuple(p.ref for p in parsed[:14])), write_files({"c": b"1"}))
    new = store.get_or_build(ArtifactSpec("corpus", "1", {"min_abstract_chars": 100}, tuple(p.ref for p in parsed)), write_files({"c": b"2"}))

    text = markdown(lineage(store, new.ref), "/store/.lineage/corpus.json")
    head, whole = text.split("## The whole lineage, as JSON")
    _, tree, tables = head.split("```")
    assert f"# Lineage of `{new.ref}`" in head and "## download (15)" in tables
    assert "per folder: baseline 10, updatefiles 5" in tables
    assert "first: `" in tables and "pubmed25n0001.xml.gz md5=" in tables and "pubmed25n0015.xml.gz md5=" in tables
    assert "pubmed25n0007.xml.gz" not in tables  # summarised by kind, listed in the JSON
    tree = tree.strip().splitlines()  # as `medlm lineage` prints it, 15 parents shortened
    assert tree[0].startswith(new.ref) and len(tree) == 1 + 2 * 11 + 1 + 2  # 11 shown with their downloads, the rest named
    assert any(line.endswith("... 3 more  in the JSON below") for line in tree)
    assert f"- `{new.ref}` files_written=1, created " in tables and "<br>parameters: min_abstract_chars=100" in tables  # a list: long lines wrap
    assert "`/store/.lineage/corpus.json`" in whole and f"medlm lineage {new.ref} --json" in whole
    assert json.loads(whole.split("```json\n")[1].split("```")[0])["ref"] == new.ref and "pubmed25n0007.xml.gz" in whole

    changes = diff(lineage(store, old.ref), lineage(store, new.ref))
    assert f"corpus: {old.ref} -> {new.ref} (min_abstract_chars: 200 -> 100)" in changes
    assert "download: 14 -> 15" in changes and f"  + pubmed25n0015.xml.gz md5={15:032x}" in changes
    assert not any(line.startswith("  -") for line in changes)
    assert diff(lineage(store, new.ref), lineage(store, new.ref)) == ["same ancestry"]

    graph = dot(lineage(store, new.ref))
    assert graph.startswith("digraph lineage {") and f'"{parsed[0].ref}" -> "{new.ref}";' in graph


def test_an_unkeyed_input_speeds_a_build_without_entering_its_key_and_a_predecessor_is_found(store):
    """The previous snapshot an incremental build starts from: neither in the key nor among the
    parents, verified before use, and found as the newest artifact of the same stage and config
    built from a subset of today's inputs."""
    from dataclasses import dataclass as plain_dataclass

    from storage import Input, Stage

    @plain_dataclass(frozen=True)
    class Config:
        size: int = 1

    def build_source(inputs, out: Path, config) -> dict:
        (out / "n.txt").write_text(str(config.size))

    def build_total(inputs, out: Path, config) -> dict:
        start = int(inputs["previous"].file("total.txt").read_text()) if inputs.get("previous") else 0
        done = set(inputs["previous"].parents) if inputs.get("previous") else set()
        total = start + sum(int(a.file("n.txt").read_text()) for a in inputs["parts"] if a.ref not in done)
        (out / "total.txt").write_text(str(total))

    source = Stage("source", "1", Config, {}, build_source)
    total = Stage("total", "1", Config, {"parts": Input("source", many=True), "previous": Input("total", optional=True, keyed=False)}, build_total)
    parts = [source.run(store, {}, Config(size)) for size in (1, 2, 3)]
    first = total.run(store, {"parts": parts[:2]}, Config())
    assert total.previous(store, {"parts": parts[:2]}, Config()) is None  # itself is no predecessor
    assert total.previous(store, {"parts": parts}, Config(size=9)) is None  # other settings
    found = total.previous(store, {"parts": parts}, Config())
    assert found.ref == first.ref

    faster = total.run(store, {"parts": parts, "previous": found}, Config())
    assert faster.ref == total.spec({"parts": parts}, Config()).ref  # the same artifact as without it
    assert faster.parents == sorted(p.ref for p in parts) and faster.file("total.txt").read_text() == "6"

    first.file("total.txt").chmod(0o644)
    first.file("total.txt").write_text("9")  # same size, other bytes: caught before use
    remove_tree(faster.path)  # so that it is built again
    with pytest.raises(ArtifactError, match="sha256 differs"):
        total.run(store, {"parts": parts, "previous": found}, Config())
    assert [item["ref"] for item in store.quarantined()] == [first.ref]


@dataclass(frozen=True)
class _NoConfig:
    pass


def _exit_abruptly(inputs, out: Path, config) -> dict:
    os._exit(3)  # as if the kernel's OOM killer had ended the worker


def test_a_build_whose_worker_process_dies_fails_by_name_and_publishes_nothing(store):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from storage import Stage

    doomed = Stage("doomed", "1", _NoConfig, {}, _exit_abruptly, label=lambda inputs, config: "pubmed25n0001.xml.gz")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as pool:
        with pytest.raises(ArtifactError, match="doomed pubmed25n0001.xml.gz: the worker process building it ended abruptly .* Run again"):
            doomed.run(store, {}, _NoConfig(), build_in=pool)
    assert store.ls("doomed") == []


def test_a_unique_prefix_names_an_artifact_and_an_ambiguous_one_lists_the_matches(store):
    built = [store.get_or_build(ArtifactSpec("corpus", "1", {"n": n}), write_files({"a.txt": b"x"})) for n in range(40)]
    one = built[0]
    assert store.resolve(one.ref) == one.ref and store.require(f"corpus/{one.key[:8]}").ref == one.ref
    shared = next(k for k in "0123456789abcdef" if sum(a.key.startswith(k) for a in built) > 1)
    with pytest.raises(ArtifactError, match=rf"corpus/{shared} is ambiguous in the store at .*: corpus/{shared}"):
        store.resolve(f"corpus/{shared}")
    with pytest.raises(ArtifactError, match="corpus/zz is not in the store"):
        store.resolve("corpus/zz")


def test_retention_keeps_the_newest_their_ancestors_pins_and_what_a_running_build_reads(store):
    import threading

    from storage.retention import plan_removal, remove

    def build(kind: str, name: str, parents: tuple[str, ...] = ()):
        return store.get_or_build(ArtifactSpec(kind, "1", {"name": name}, parents), write_files({f"{name}.txt": name.encode() * 1000}))

    r1, r2, r3 = (build("raw", f"r{i}") for i in (1, 2, 3))
    d1, d2 = build("derived", "d1", (r1.ref,)), build("derived", "d2", (r2.ref,))
    d3 = build("derived", "d3", (r3.ref, r1.ref))

    plan = plan_removal(store, keep_last=1, min_age_s=0)
    assert [a.ref for a in plan.remove] == [d1.ref, d2.ref, r2.ref]  # children before parents
    assert plan.kept == {r3.ref: "one of the 1 newest raw", d3.ref: "one of the 1 newest derived", r1.ref: f"an ancestor of {d3.ref}"}
    assert plan_removal(store, keep_last=1).remove == []  # all younger than the default minimum age (24 h)
    assert [a.ref for a in plan_removal(store, keep_last=1, kinds=["derived"], min_age_s=0).remove] == [d1.ref, d2.ref]
    assert plan_removal(store, keep_last=1, kinds=["raw"], min_age_s=0).remove == []  # r2 is d2's parent, and d2 stays

    store.pin(f"derived/{d1.key[:10]}")
    assert [a.ref for a in plan_removal(store, keep_last=1, min_age_s=0).remove] == [d2.ref, r2.ref]

    # A build running now that reads r2 keeps it (its lock names what it reads), whatever else holds.
    started, release = threading.Event(), threading.Event()

    def slow(work: Path) -> dict:
        started.set()
        release.wait(30)
        (work / "x.txt").write_text("x")
        return {}

    reader = threading.Thread(target=store.get_or_build, args=(ArtifactSpec("derived", "1", {"name": "d4"}, (r2.ref,)), slow))
    reader.start()
    started.wait(30)
    try:
        plan = plan_removal(store, keep_last=1, min_age_s=0)
        assert [a.ref for a in plan.remove] == [d2.ref] and plan.kept[r2.ref] == "read by a build running now"
    finally:
        release.set()
        reader.join()

    plan = plan_removal(store, keep_last=2, min_age_s=0)  # d4 is now the newest derived: d3 and d4 stay
    assert [a.ref for a in plan.remove] == [d2.ref] and plan.bytes_freed == 2000
    assert remove(store, plan) == [d2.ref]
    assert store.get(d2.ref) is None and r2.path.is_dir()
    for artifact in store.ls():
        assert store.problems(artifact.ref) == [], artifact.ref
    assert not (store.root / ".trash").exists() or not list((store.root / ".trash").iterdir())


def test_a_flow_runs_lease_keeps_what_it_made_or_read_until_its_processes_end(store):
    """Store.hold: every process of a run holds its lease (a shared lock), so retention keeps the
    lease's artifacts until the last of them ends, by release_holds or killed by SIGKILL."""
    from storage.retention import plan_removal
    from storage.store import release_holds

    def build(name: str):
        return store.get_or_build(ArtifactSpec("raw", "1", {"name": name}, ()), write_files({f"{name}.txt": name.encode()}))

    old, other, newest = build("old"), build("other"), build("newest")
    holder = textwrap.dedent(f"""
        import sys, time
        from storage import Store
        Store({str(store.root)!r}).hold("run-1", [{old.ref!r}])
        print("holding", flush=True)
        time.sleep(120)
    """)
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert process.stdout.readline().strip() == "holding"
        store.hold("run-1", [other.ref])  # a second process of the same run
        plan = plan_removal(store, keep_last=1, min_age_s=0)
        assert plan.remove == [] and plan.kept[old.ref] == plan.kept[other.ref] == "made or read by flow run run-1, still running"
        release_holds()  # this process is done with it; the other still holds the lease
        assert plan_removal(store, keep_last=1, min_age_s=0).kept[old.ref].startswith("made or read by flow run run-1")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert [a.ref for a in plan_removal(store, keep_last=1, min_age_s=0).remove] == [old.ref, other.ref]
    assert not list((store.root / ".leases").iterdir())  # nobody held it: gone
