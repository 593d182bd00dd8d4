"""Shared fixtures: real sample data, a real Prefect server on loopback, temporary stores.

Prefect reads its settings when it is imported, so the environment for the test session's
server (its own PREFECT_HOME, port, no telemetry) is set here, before any test imports it.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from flows.prefect_env import prefect_env, wait_healthy
from storage.processes import die_with_parent, free_port, stop, usable_cores
from storage.store import remove_tree
from ncbi_server import URL as NCBI_TEST_URL

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
PUBMED = DATA / "pubmed"
MIRROR = PUBMED / "mirror"
BASELINE_SAMPLE = MIRROR / "baseline" / "pubmed20n0014.xml.gz"
UPDATE_SAMPLE = MIRROR / "updatefiles" / "pubmed21n1298.xml.gz"
PREFECT_BIN = Path(sys.executable).with_name("prefect")


def _temporary_folder(prefix: str) -> Path:
    """A new folder under the system's temporary one, removed with everything in it (read-only
    artifacts too) when this process ends: every test session and xdist worker makes its own."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(lambda: folder.exists() and remove_tree(folder))
    return folder


_PREFECT_HOME = _temporary_folder("medlm-test-prefect-")
_PREFECT_PORT = free_port()
os.environ.update(prefect_env(_PREFECT_HOME))
os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_PREFECT_PORT}/api"
if "MEDLM_STORE" not in os.environ:
    os.environ["MEDLM_STORE"] = str(_temporary_folder("medlm-test-store-"))
# What runs in this session may read and reach (the workers' settings, storage/access.py): the
# bundled data, the tests' temporary folders, NCBI and the session's NCBI-like server.
os.environ["MEDLM_DATA_ROOTS"] = os.pathsep.join([str(DATA), tempfile.gettempdir()])
os.environ["MEDLM_SOURCES"] = f"https://ftp.ncbi.nlm.nih.gov/pubmed {NCBI_TEST_URL}"
# torch's threads, pinned before torch loads, for every process the session starts: the cores
# shared among pytest-xdist's workers (2 workers on 2 cores: one thread each; two threads each
# spin-wait for a core the other worker holds, model/threads.py). Pinned, so a subprocess's losses
# equal an in-process run's to the bit.
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

# rouge-score imports absl, whose log handler keeps the sys.stderr of its import and closes it when
# logging is configured again (Prefect's dictConfig closes every handler ever made) unless it is the
# process's own. Imported under pytest's capture, that stream is the capture's file: closed, the
# session dies ("lost sys.stderr") at the next test that reads its output. Give it the real one.
import absl.logging  # noqa: E402

absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__


def _template_database() -> Path:
    """A migrated Prefect database, made once and reused: a fresh migration takes ~25 s here."""
    import prefect

    template_home = REPO / ".medlm" / "test-cache" / f"prefect-{prefect.__version__}"
    database = template_home / "prefect.db"
    template_home.mkdir(parents=True, exist_ok=True)
    with open(template_home / "making.lock", "w") as lock:  # pytest-xdist's workers make it once, one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not database.exists():
            (template_home / "making").mkdir(exist_ok=True)
            env = {**os.environ, **prefect_env(template_home / "making")}
            subprocess.run([str(PREFECT_BIN), "server", "database", "upgrade", "-y"], env=env, check=True, capture_output=True)
            os.replace(template_home / "making" / "prefect.db", database)  # whole, or not there
    return database


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server on 127.0.0.1 for the whole session; yields its API URL."""
    shutil.copy(_template_database(), _PREFECT_HOME / "prefect.db")
    env = {**os.environ, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(_PREFECT_PORT)}
    log = open(_PREFECT_HOME / "server.log", "w")
    server = subprocess.Popen(
        [str(PREFECT_BIN), "server", "start", "--host", "127.0.0.1", "--port", str(_PREFECT_PORT)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
    )
    url = os.environ["PREFECT_API_URL"]
    wait_healthy(url, server, _PREFECT_HOME / "server.log")
    yield url
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # send the last run logs while the server is still there to take them
    stop(server)
    log.close()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback for the session; its credentials and endpoint are
    in this process's environment (the AWS_* settings obstore reads), so a remote is one URL."""
    from s3_server import SeaweedFS

    with SeaweedFS(tmp_path_factory.mktemp("s3")) as server:
        os.environ.update(server.env)
        yield server


@pytest.fixture(scope="session")
def session_store(tmp_path_factory):
    from storage import Store

    return Store(tmp_path_factory.mktemp("session") / "store")


def build_corpus(store, config=None, mirror: Path = MIRROR):
    """The corpus snapshot of a mirror's files, built by the real stages (no Prefect)."""
    from tasks.corpus import CORPUS, CorpusConfig
    from tasks.download import DOWNLOAD, SourceConfig, select_files
    from tasks.parse import PARSE, ParseConfig

    downloads = [DOWNLOAD.run(store, {}, remote) for remote in select_files(SourceConfig(source=str(mirror)))]
    parsed = [PARSE.run(store, {"download": d}, ParseConfig()) for d in downloads]
    return CORPUS.run(store, {"parsed": parsed}, config or CorpusConfig())


@pytest.fixture(scope="session")
def corpus(session_store):
    """The corpus snapshot of the two sample files. Kept broad (any language, any abstract
    length) so later stages see all the real text: MathML, Greek letters, non-English abstracts."""
    from tasks.corpus import CorpusConfig

    return build_corpus(session_store, CorpusConfig(min_abstract_chars=0, languages=()))


TEST_VOCAB = 1_000


@pytest.fixture(scope="session")
def documents(corpus) -> list[tuple[int, str]]:
    """(pmid, text) of every corpus document, in corpus order."""
    from storage.formats import iter_corpus

    return [pair for pmids, texts in iter_corpus(corpus.path) for pair in zip(pmids, texts)]


def write_corpus(folder: Path, table) -> Path:
    """A one-part corpus snapshot of ``table``'s rows, as readers see one (no state, no stats)."""
    import numpy as np
    import pyarrow.parquet as pq

    from storage.formats import CorpusPart, write_corpus_parts

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-0000.parquet")
    write_corpus_parts(folder, [CorpusPart(folder / "part-0000.parquet", table.num_rows, np.zeros(0, dtype=np.int64))])
    return folder


@pytest.fixture(scope="session")
def tokenizer(session_store, corpus):
    """A small byte-level BPE fitted on the sample corpus, with val and test fractions large enough
    that the ~2,000 documents give non-empty val and test splits."""
    from tasks.tokenizer import TOKENIZER, TokenizerConfig

    config = TokenizerConfig(vocab_size=TEST_VOCAB, val_fraction=0.05, test_fraction=0.05)
    return TOKENIZER.run(session_store, {"corpus": corpus}, config)


TINY = {"n_layer": 2, "d_model": 32, "n_head": 2, "context_length": 256}


@pytest.fixture(scope="session")
def tiny_checkpoint(session_store, corpus, tokenizer):
    """A tiny pretrained checkpoint artifact (2 steps) with the sample corpus's tokenizer."""
    from model.train import TrainConfig
    from tasks.pretrain import PRETRAIN
    from tasks.shards import SHARDS, ShardsConfig

    shards = SHARDS.run(session_store, {"corpus": corpus, "tokenizer": tokenizer}, ShardsConfig())
    return PRETRAIN.run(session_store, {"shards": shards, "tokenizer": tokenizer}, TrainConfig.of(model=TINY, max_steps=2, batch_size=2, eval_windows=2))


def kill_once_written(command: list[str], path: Path) -> None:
    """Run ``command`` (from the repository root) and SIGKILL it as soon as the folder ``path``
    exists; it must not end on its own first."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not path.is_dir() and proc.poll() is None:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.stderr.close()


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty store, which is also where flows run in this test put their artifacts (MEDLM_STORE:
    where the store lives is the process's setting, never a run parameter)."""
    from storage import Store

    monkeypatch.setenv("MEDLM_STORE", str(tmp_path / "store"))
    return Store(tmp_path / "store")


# Tests that need a server for the session (tens of seconds before the first of them runs) are
# slow by what they use; the rest that take long say so with @pytest.mark.slow.
SLOW_FIXTURES = {"prefect_server", "stack", "s3"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
