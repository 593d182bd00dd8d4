"""The `medlm` command on a store built by the real stages (no Prefect server needed)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import DATA, build_corpus
from flows.cli import main
from storage import Store
from storage.processes import free_port


def medlm(capsys, *args: str) -> tuple[int, str, str]:
    """Run `medlm ARGS` in-process: (exit status, stdout, stderr)."""
    try:
        main(list(args))
        status = 0
    except SystemExit as exit:
        status = exit.code or 0
    out, err = capsys.readouterr()
    return status, out, err


def test_store_ls_lineage_verify_and_purge(tmp_path, capsys):
    store = Store(tmp_path / "store")
    corpus = build_corpus(store)
    args = ["--store", str(store.root)]

    status, listing, _ = medlm(capsys, "store", "ls", *args)
    assert status == 0 and corpus.ref in listing and listing.count("download/") == 2
    downloads = store.ls("download")
    for download in downloads:
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(download.manifest["created"]))
        assert f"{download.ref:<32} {created}  {'newest' if download == downloads[-1] else '':<6}  {download.label}" in listing
    assert f"{corpus.ref:<32} " in listing and listing.count("newest") == 3 + 1  # one per kind, and the note

    status, tree, _ = medlm(capsys, "lineage", corpus.ref, *args)
    assert status == 0
    for download in downloads:
        assert download.label in tree and download.label.startswith(download.params["name"] + " md5=" + download.params["md5"])
    status, as_json, _ = medlm(capsys, "lineage", corpus.ref, "--json", *args)
    names = {p["parents"][0]["params"]["name"] for p in json.loads(as_json)["parents"]}
    assert names == {d.params["name"] for d in downloads}

    assert medlm(capsys, "store", "verify", corpus.ref, *args)[0] == 0
    stats = corpus.file("stats.json")
    stats.chmod(0o644)
    stats.write_text(stats.read_text().replace("1", "2"))  # same size, different bytes
    status, _, err = medlm(capsys, "store", "verify", corpus.ref, *args)
    assert status == 1 and "stats.json: sha256 differs" in err

    # A stage about to read it quarantines it; ls shows it; purge removes it only when asked.
    with pytest.raises(Exception, match="stats.json: sha256 differs"):
        store.verified(corpus.ref)
    status, listing, _ = medlm(capsys, "store", "ls", *args)
    assert "quarantined" in listing and corpus.ref in listing.split("quarantined")[1]
    status, _, err = medlm(capsys, "store", "purge", *args)  # not at a terminal: nothing to ask, nothing deleted
    assert status == 2 and "Nothing was deleted: give --yes" in err and len(store.quarantined()) == 1
    status, out, _ = medlm(capsys, "store", "purge", "--yes", *args)
    assert status == 0 and "deleted 1 quarantined artifact" in out and store.quarantined() == []


def test_store_gc_is_a_dry_run_unless_told_and_keeps_what_is_pinned(tmp_path, capsys):
    store = Store(tmp_path / "store")
    corpus = build_corpus(store)
    args = ["--store", str(store.root), "--keep-last", "1", "--min-age-hours", "0"]
    downloads = store.ls("download")
    status, out, _ = medlm(capsys, "store", "gc", *args)  # the corpus keeps every file it came from
    assert status == 0 and out.strip().endswith("0 artifact(s), 0 B freed; 5 kept")
    status, out, _ = medlm(capsys, "store", "pin", f"{downloads[0].ref[:20]}", "--store", str(store.root))
    assert out.strip() == f"pinned {downloads[0].ref}"
    # A second snapshot, of one file: the first corpus and the other file's parse and download may go.
    from tasks.corpus import CORPUS, CorpusConfig

    parsed = [p for p in store.ls("parse") if p.parents == [downloads[0].ref]]
    newer = CORPUS.run(store, {"parsed": parsed}, CorpusConfig(min_abstract_chars=0))
    status, out, _ = medlm(capsys, "store", "gc", *args)
    gone = [line.split()[0] for line in out.splitlines()[:-2] if not line.startswith("kept ")]
    assert status == 0 and gone == [corpus.ref] and "a dry run: nothing was removed (--yes removes them)" in out
    assert f"kept {downloads[0].ref:<27} pinned" in out and f"kept {newer.ref:<27} one of the 1 newest corpus" in out  # and why
    assert store.get(corpus.ref) is not None
    status, out, _ = medlm(capsys, "store", "gc", *args, "--yes")
    assert status == 0 and out.strip().endswith("removed 1 artifact(s)") and store.get(corpus.ref) is None
    assert [a.ref for a in store.ls("corpus")] == [newer.ref] and len(store.ls("download")) == 2  # the other is the newest download


MEDLM = Path(sys.executable).with_name("medlm")
# Errors found before any flow runs (options, configurations, the paths and URLs a run may use).
REFUSED_AT_ONCE = [
        (["lineage", "corpus"], "invalid artifact ref 'corpus': expected KIND/KEY"),
        (["pretrain", "--optim.max-steps", "0"], "optim: max_steps: Input should be greater than or equal to 1"),
        (["pretrain", "--optim.batch-size", "-3"], "optim: batch_size: Input should be greater than or equal to 1"),
        (["pretrain", "--run.devices", "0"], "run: devices: Input should be greater than or equal to 1"),
        (["pretrain", "--run.nodes", "2"], "nodes 2 needs rdzv_endpoint (HOST:PORT every node reaches) and rdzv_id"),
        (["finetune", "--finetune-run.nodes", "2"], "nodes 2 needs rdzv_endpoint (HOST:PORT every node reaches) and rdzv_id"),
        (["finetune", "--preset", "base"], "medlm finetune: unrecognized arguments: --preset base"),  # the base decides the shape
        (["pretrain", "--run.nodes", "2", "--run.rdzv-endpoint", "10.9.8.7:29500", "--run.rdzv-id", "j"], "10.9.8.7:29500 is not a rendezvous this process may join (MEDLM_RENDEZVOUS_HOSTS="),
        (["ingest", "--baseline-limit", "-1"], "source: baseline_limit: Input should be greater than or equal to 0"),
        (["tokenize", "--vocab-size", "3"], "tokenizer: vocab_size: Input should be greater than or equal to 260"),
        (["tokenize", "--vocab-size", "70000"], "tokenizer: vocab_size: Input should be less than or equal to 65536"),
        (["ingest", "--source", "ftp://example.org/pubmed"], "source: source: 'ftp://example.org/pubmed': expected an http(s) URL"),
        (["ingest", "--source", "/no/such/mirror"], "source: source: /no/such/mirror is outside the folders this process may read (MEDLM_DATA_ROOTS="),
        (["ingest", "--source", str(DATA / "no-such-mirror")], f"source: source: {DATA / 'no-such-mirror'} does not exist"),
        (["ingest", "--source", "http://127.0.0.1:9/pubmed"], "http://127.0.0.1:9/pubmed is not among the sources this process may download from (MEDLM_SOURCES="),
        (["ingest", "--exclude-pmids-file", "/etc/passwd"], "corpus: exclude_pmids_file: /etc/passwd is outside the folders this process may read"),
        (["evaluate", "--hf-model", "/root"], "hf_model: /root is outside the folders this process may read"),
        (["pipeline", "--config", "no-such-config"], "no run configuration 'no-such-config'"),
        (["pretrain", "--preset", "huge"], "medlm pretrain: argument --preset: invalid choice: 'huge'"),
        (["store", "verify"], "medlm store verify: the following arguments are required: ref"),
]
# Errors a flow run or the store finds: the installed command, as a user runs it.
USER_ERRORS = [
        (["lineage", "corpus/0123456789abcdef0123"], "corpus/0123456789abcdef0123 is not in the store"),
        (["pretrain", "--shards-ref", "shards/0123456789abcdef0123"], "shards/0123456789abcdef0123 is not in the store"),
        (["pretrain", "--shards-ref", "../../etc/passwd"], "invalid artifact ref"),
        (["ingest", "--source", str(DATA / "pubmed")], f"{DATA / 'pubmed' / 'baseline'} is not a folder"),
        (["qa", "--pubmedqa", str(DATA / "medmcqa" / "medmcqa_val.json"), "--medqa", str(DATA / "medqa")], "index 0: no field 'QUESTION' or 'pubid' (fields: choice_type, cop, exp, id, opa,"),
        (["store", "verify", "corpus/0123456789abcdef0123"], "artifact corpus/0123456789abcdef0123 is not in the store"),
]


@pytest.mark.parametrize("args, message", REFUSED_AT_ONCE, ids=[" ".join(a)[:60] for a, _ in REFUSED_AT_ONCE])
def test_a_wrong_option_or_value_is_one_line_and_status_2(args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDLM_STORE", str(tmp_path / "store"))
    status, _, err = medlm(capsys, *args)
    assert status == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err


def test_a_user_error_is_one_line_and_status_2(prefect_server, tmp_path):
    """The installed command, as a user runs it (all cases at once: each process imports torch)."""
    env = {**os.environ, "MEDLM_STORE": str(tmp_path / "store")}
    env.pop("MEDLM_DEBUG", None)
    runs = [
        (args, message, subprocess.Popen([str(MEDLM), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for args, message in USER_ERRORS
    ]
    for args, message, run in runs:
        _, err = run.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert run.returncode == 2 and len(lines) == 1 and message in lines[0], (args, err[-2000:])
        assert err.splitlines()[-1] == lines[0] and "usage:" not in err, (args, err[-2000:])  # nothing after it, no usage text
        assert "Traceback" not in err and "CancelledError" not in err, (args, err[-2000:])


def test_a_wrong_value_is_refused_before_a_run_is_made_and_the_server_started_beside_the_checks_stops(tmp_path):
    """The command's Prefect server starts while the command imports and checks (flows/prefect_env.py
    ``temporary_server``): a refused command stops it, on a new home too (killed while it migrated
    a new database, the next server starts on it), and asking for help starts none."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    run = subprocess.run([str(MEDLM), "pretrain", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "--optim.lr" in run.stdout
    assert not (tmp_path / ".medlm" / "prefect" / "temporary-server.log").exists()
    for args in (["tokenize", "--vocab-size", "70000"], ["ingest", "--exclude-pmids-file", "/etc/passwd"], ["pretrain", "--optim.lr", "x"]):
        run = subprocess.run([str(MEDLM), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and run.stderr.startswith("error: ") and len(run.stderr.splitlines()) == 1, run.stderr
    assert _no_server_left(tmp_path), "a Prefect server outlived the command"
    assert _flow_run_states(tmp_path, env) == []


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLM_STORE", str(tmp_path / "store"))
    with pytest.raises(Exception, match="is not in the store"):
        main(["lineage", "corpus/0123456789abcdef0123", "--debug"])


def test_export_refuses_to_write_inside_the_store(tmp_path, monkeypatch, capsys):
    store = Store(tmp_path / "store")
    monkeypatch.setenv("MEDLM_STORE", str(store.root))
    corpus = build_corpus(store)
    before = {p.name: p.stat().st_mtime_ns for p in corpus.path.iterdir()}
    for out in (corpus.path, corpus.path / "hf", store.root / "exports"):
        status, _, err = medlm(capsys, "export-hf", str(corpus.path), str(out))
        assert status == 2 and "is inside the artifact store" in err
    status, _, err = medlm(capsys, "train", "--shards", "S", "--out", str(store.root / "run"))
    assert status == 2 and "is inside the artifact store" in err
    assert {p.name: p.stat().st_mtime_ns for p in corpus.path.iterdir()} == before
    assert store.problems(corpus.ref) == []


def test_export_refuses_a_folder_that_holds_files_unless_forced(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("my own")
    status, _, err = medlm(capsys, "export-hf", str(tiny_checkpoint.path), str(out))
    assert status == 2 and f"{out} is not empty" in err and "--force" in err and len(err.splitlines()) == 1
    assert (out / "config.json").read_text() == "my own"
    status, printed, _ = medlm(capsys, "export-hf", str(tiny_checkpoint.path), str(out), "--force")
    assert status == 0 and (out / "model.safetensors").is_file() and (out / "config.json").read_text() != "my own"


def test_the_installed_command_works_in_an_empty_folder(tmp_path):
    """Nothing pre-created, no Prefect settings: `medlm ingest` starts its own server under ./.medlm."""
    from conftest import MIRROR

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEDLM_"))}
    run = subprocess.run([str(MEDLM), "ingest", "--source", str(MIRROR), "--workers", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    [corpus] = Store(tmp_path / ".medlm" / "store").ls("corpus")
    assert run.stdout.strip().splitlines()[-1] == corpus.ref and corpus.summary["documents"] > 0
    assert (tmp_path / ".medlm" / "prefect" / "prefect.db").is_file()
    # One server, ours: nothing else starts one (Prefect's own says "Starting temporary server"),
    # and its parse worker processes never start Prefect (they only parse).
    assert "temporary server" not in run.stderr, run.stderr[-3000:]
    assert (tmp_path / ".medlm" / "prefect" / "temporary-server.log").is_file()


def _servers_of(pid: int) -> list[int]:
    """The temporary Prefect servers (uvicorn) that process ``pid`` started and that still run."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and b"uvicorn" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, IndexError):
            continue  # a process that ended while we looked
    return found


def _gone(pids: list[int], timeout_s: float = 15) -> bool:
    deadline = time.time() + timeout_s
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:1] for pid in pids):
        if time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


def _started_by(pid: int) -> list[int]:
    """The processes the parse pool of command ``pid`` left (its forkserver, workers and resource
    tracker carry MEDLM_PARENT_PID=pid in their environment), still running."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"MEDLM_PARENT_PID={pid}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_a_command_killed_while_parsing_in_worker_processes_leaves_none_of_them(tmp_path):
    """Issue 26: `kill -9` while the parse pool ran left its forkserver, a worker and the resource
    tracker alive for minutes. They now end with the command, however it ends."""
    from conftest import MIRROR

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEDLM_"))}
    for attempt in range(3):
        (tmp_path / str(attempt)).mkdir()
        run = subprocess.Popen([str(MEDLM), "ingest", "--source", str(MIRROR), "--workers", "2"], cwd=tmp_path / str(attempt),
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not (pool := _started_by(run.pid)):  # the pool is up: parsing has begun
            assert run.poll() is None, run.stderr.read()[-2000:]
            time.sleep(0.01)
        run.kill()
        run.wait()
        assert _gone(pool, timeout_s=10) and not _started_by(run.pid), f"attempt {attempt}: the parse pool outlived its command"


def test_commands_share_a_new_home_and_a_killed_or_stopped_one_leaves_no_server_and_no_running_run(tmp_path):
    """Two first starts on one home at once (they would race on the SQLite migration); then a
    command killed with SIGKILL, and one stopped with SIGTERM, while they download (from a server
    that sends the file 1 KiB a second, so the signal always finds the download under way)."""
    from conftest import MIRROR, PUBMED
    from ncbi_server import NcbiServer

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEDLM_"))}
    both = [subprocess.Popen([str(MEDLM), "qa", "--pubmedqa", str(PUBMED.parent / "pubmedqa")], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in both:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]

    with NcbiServer(MIRROR) as server:
        baseline = "/baseline/pubmed20n0014.xml.gz"
        server.faults.trickle.add(baseline)
        for signal_sent, status in ((signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, 143)):
            run = subprocess.Popen([str(MEDLM), "ingest", "--source", server.url, "--folders", "baseline", "--workers", "1"], cwd=tmp_path,
                                   env=env | {"MEDLM_SOURCES": server.url}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            gets = len(server.requests_for(baseline))
            while len(server.requests_for(baseline)) == gets:  # its download is under way
                assert run.poll() is None, run.stderr.read()[-2000:]
                time.sleep(0.05)
            leases = tmp_path / ".medlm" / "prefect" / "command-runs"
            assert [x for x in leases.glob("*.json") if json.loads(x.read_text())["pid"] == run.pid]
            servers = _servers_of(run.pid)
            assert len(servers) == 1
            run.send_signal(signal_sent)
            assert run.wait(timeout=60) == status
            rest = run.stderr.read()
            assert _gone(servers), f"the temporary server outlived its command ({signal_sent.name})"
            assert signal_sent == signal.SIGKILL or not list(leases.glob("*.json"))  # the killed one's, swept; the stopped one's, cleared
            if signal_sent == signal.SIGTERM:
                assert rest.strip().splitlines()[-1] == "error: stopped by SIGTERM", rest[-2000:]

    # Two qa runs, the killed ingest (marked by the next command: it could not say so itself), the stopped one.
    assert _flow_run_states(tmp_path, env) == ["COMPLETED", "COMPLETED", "CRASHED", "CRASHED"]


def test_a_training_stopped_by_sigterm_ends_with_its_flow_run_crashed(session_store, tiny_checkpoint, tmp_path):
    """Training runs on in a task's thread, which Prefect waits for while the command unwinds: the
    command marks its run Crashed and exits 143 within its grace, not when training ends."""
    from conftest import TINY
    from flows.cli import STOP_GRACE_S

    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEDLM_"))}, "MEDLM_STORE": str(session_store.root)}
    shards = next(ref for ref in tiny_checkpoint.parents if ref.startswith("shards/"))
    log = tmp_path / "pretrain.log"
    with open(log, "w") as err:
        run = subprocess.Popen([str(MEDLM), "pretrain", "--shards-ref", shards, "--preset", "tiny", "--model", json.dumps(TINY), "--optim.max-steps", "1000000",
                                "--optim.batch-size", "2", "--run.eval-every", "1000000", "--run.checkpoint-every", "1000000"],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
    while "training: " not in log.read_text():  # under way: its steps run in a thread of the flow
        assert run.poll() is None, log.read_text()[-2000:]
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=STOP_GRACE_S + 45) == 143, log.read_text()[-2000:]
    assert log.read_text().strip().splitlines()[-1] == "error: stopped by SIGTERM"
    assert _no_server_left(tmp_path), "a Prefect server outlived the command"
    assert _flow_run_states(tmp_path, env) == ["CRASHED"]


def _no_server_left(cwd: Path) -> bool:
    """No process runs (within 15 s) on the Prefect home of a command run in ``cwd``."""
    home = f"PREFECT_HOME={cwd / '.medlm' / 'prefect'}".encode()
    return _gone([int(e.parent.name) for e in Path("/proc").glob("[0-9]*/environ") if _reads(e) and home in _reads(e).split(b"\0")])


def _reads(path: Path) -> bytes:
    """A /proc file's bytes, or none for a process that ended or is not ours to read."""
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_pretrain_refuses_before_a_run_starts_what_the_run_configuration_would_not_train_or_fit(session_store, tiny_checkpoint, tmp_path):
    """`pretrain --config full` on a store whose newest shards are another tokenizer's; then on
    those shards named, at a batch no machine holds: one line each, no flow run made, and the
    server started beside the checks stopped (on a new home: the next one starts on its database)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEDLM_"))}, "MEDLM_STORE": str(session_store.root)}
    shards = session_store.newest("shards")
    for args, expected in (
        ([], rf"error: the newest shards, {shards.ref}, have a 1,000-token vocabulary and full's \[tokenizer\] 32,000: "
             r"build its shards first \(`medlm tokenize --config full`\), or give --shards-ref shards/KEY"),
        (["--shards-ref", shards.ref, "--optim.batch-size", "256"],
         r"error: training 86M parameters at batch_size 256 x 2048 tokens needs about [0-9.]+ GB \(.*\) and cpu has [0-9.]+ GB \(MemAvailable\); lower batch_size .*"),
    ):
        run = subprocess.run([str(MEDLM), "pretrain", "--config", "full", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr[-3000:]
        assert re.fullmatch(expected, run.stderr.strip()), run.stderr
    assert _no_server_left(tmp_path), "a Prefect server outlived the command"
    assert _flow_run_states(tmp_path, env) == []


def _flow_run_states(cwd: Path, env: dict) -> list[str]:
    """The states of the flow runs on ``cwd``'s home, oldest first, as the next command there sees them."""
    script = (
        "import asyncio\n"
        "from flows.prefect_env import apply_prefect_defaults, temporary_server\n"
        "apply_prefect_defaults()\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as client:\n"
        "        runs = await client.read_flow_runs()\n"
        "        print(' '.join(r.state.type.value for r in sorted(runs, key=lambda r: r.expected_start_time)))\n"
        "with temporary_server() as ready:\n"
        "    ready()\n"
        "    asyncio.run(main())\n"
    )
    state = subprocess.run([sys.executable, "-c", script], cwd=cwd, env={**env, "PYTHONPATH": str(Path(__file__).parents[1])},
                           capture_output=True, text=True, timeout=120)
    assert state.returncode == 0, state.stderr[-2000:]
    return state.stdout.split()


@pytest.mark.usefixtures("prefect_server")
def test_the_store_gc_flow_is_a_dry_run_by_default_and_removes_when_told(store):
    from flows.store_gc import store_gc
    from tasks.corpus import CORPUS, CorpusConfig

    first = build_corpus(store)
    CORPUS.run(store, {"parsed": store.ls("parse")}, CorpusConfig(min_abstract_chars=0))  # a newer snapshot
    assert store_gc(keep_last=1, min_age_hours=0) == [first.ref] and store.get(first.ref) is not None
    assert store_gc(keep_last=1, min_age_hours=0, dry_run=False) == [first.ref] and store.get(first.ref) is None


def test_a_copied_run_configuration_keeps_its_paths_or_says_which_is_missing(tmp_path):
    from storage.config import CONFIG_DIR, ConfigError, read_run_config

    copy = tmp_path / "elsewhere" / "my-run.toml"
    copy.parent.mkdir()
    copy.write_text((CONFIG_DIR / "demo.toml").read_text())
    assert read_run_config(copy) == read_run_config("demo")  # the bundled data, found from the copy
    (tmp_path / "elsewhere" / "mine.jsonl").write_text("{}\n")
    copy.write_text('[qa]\ninstructions = ["./mine.jsonl"]\nmedqa = "../no-such-folder"\n')
    with pytest.raises(ConfigError, match=rf"my-run.toml \[qa\] medqa: ../no-such-folder is not there: {tmp_path / 'no-such-folder'} does not exist"):
        read_run_config(copy)
    copy.write_text('[qa]\ninstructions = ["./mine.jsonl"]\n')
    assert read_run_config(copy)["qa"]["instructions"] == [str(tmp_path / "elsewhere" / "mine.jsonl")]


def test_a_table_has_one_class_and_an_option_one_name_in_every_command():
    """A run configuration's table means the same in every command (`medlm qa --config demo` reads the
    [qa] the pipeline reads), and an option is spelt the same wherever it appears."""
    from flows.cli import _flow_parser, flow_parameters
    from flows.registry import COMMANDS

    tables = flow_parameters(COMMANDS["pipeline"].load())[0]
    spellings: dict[str, set[tuple[str, ...]]] = {}
    for command, entry in COMMANDS.items():
        configs = flow_parameters(entry.load())[0]
        assert {name: tables.get(name) for name in configs} == configs, command
        for action in _flow_parser(command, entry.load())._actions:
            if "." in action.dest:  # section.field
                spellings.setdefault(action.dest, set()).add(tuple(action.option_strings))
    assert {dest: names for dest, names in spellings.items() if len(names) > 1} == {}
    assert spellings["optim.lr"] == {("--optim.lr",)} and spellings["finetune_optim.lr"] == {("--finetune-optim.lr",)}
    assert spellings["tokenizer.vocab_size"] == {("--vocab-size",)} and spellings["shape.preset"] == {("--preset",)}



def test_every_flow_takes_its_parameters_by_name_only():
    """A flow has several tables of one class (the pipeline's optim, finetune_optim and dpo_optim):
    passed in a row, two swapped would pass every type check and train with the other's settings."""
    import inspect

    from flows.registry import FLOWS

    for entry in FLOWS:
        parameters = inspect.signature(entry.load().fn).parameters.values()
        assert [p.name for p in parameters if p.kind is not p.KEYWORD_ONLY] == [], entry.entrypoint
    with pytest.raises(TypeError, match="positional argument"):
        FLOWS[0].load().fn(object())

def test_a_server_is_waited_for_while_it_lives_and_a_dead_or_hung_one_is_named_with_the_setting(tmp_path, monkeypatch):
    """A loaded machine starts a Prefect server slowly: we wait while its process lives (not a fixed
    90 or 120 s), fail at once when it dies (its log in the error), and a hung one after
    MEDLM_SERVER_START_TIMEOUT seconds, naming that setting."""
    from flows.prefect_env import wait_healthy

    slow = textwrap.dedent("""
        import http.server, sys, time
        print("migrating", flush=True)
        time.sleep(float(sys.argv[2]))
        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers()
        http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
    """)
    log = tmp_path / "server.log"
    port = free_port()

    def server(delay: float, script: str = slow) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", script, str(port), str(delay)], stdout=open(log, "w"), stderr=subprocess.STDOUT)

    started = server(4)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", started, log)  # answers after 4 s: waited for
    finally:
        started.kill()
        started.wait()
    dead = server(0, "import sys; print('no database'); sys.exit(3)")
    with pytest.raises(RuntimeError, match=r"ended \(status 3\) before it answered; .*server.log:\nno database"):
        wait_healthy(f"http://127.0.0.1:{port}", dead, log)
    monkeypatch.setenv("MEDLM_SERVER_START_TIMEOUT", "1")
    hung = server(60)
    try:
        with pytest.raises(RuntimeError, match=r"still starting after 1 s \(a loaded machine\? raise MEDLM_SERVER_START_TIMEOUT\); .*\nmigrating"):
            wait_healthy(f"http://127.0.0.1:{port}", hung, log)
    finally:
        hung.kill()
        hung.wait()
