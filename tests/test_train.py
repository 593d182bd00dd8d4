"""The training loop, its checkpoints and resume, torchrun/DDP, HF export and the pretrain stage (CPU, tiny)."""

import json
import math
import os
import pickle
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from conftest import kill_once_written
from model.checkpoint import latest_checkpoint, load_model
from model.data import write_shards
from model.export_hf import export_hf
from model.train import ModelShape, OptimConfig, TrainConfig, lr_at, train
from model.training_stages import training_stage
from storage import ArtifactSpec, Store, sha256_file
from tasks.pretrain import PRETRAIN, shards_tokenizer

VOCAB = 300
MODEL = {"n_layer": 2, "n_head": 2, "d_model": 32, "context_length": 32}
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def config(**overrides) -> TrainConfig:
    base = dict(
        preset="tiny", model=dict(MODEL), context_length=16, batch_size=4, max_steps=12, lr=3e-3, min_lr=3e-4,
        warmup_steps=2, eval_every=6, eval_windows=8, checkpoint_every=6, keep_last=2,
    )
    return TrainConfig.of(**(base | overrides))


def patterned_tokens(rng, n: int) -> np.ndarray:
    """Documents of counting runs ending in [EOS]: learnable, so the loss has somewhere to go."""
    docs = [np.append((rng.integers(4, VOCAB) + np.arange(rng.integers(5, 40))) % (VOCAB - 4) + 4, 3) for _ in range(n)]
    return np.concatenate(docs)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("shards")
    splits = {"train": [patterned_tokens(rng, 200), patterned_tokens(rng, 100)], "val": [patterned_tokens(rng, 30)], "test": [patterned_tokens(rng, 30)]}
    return write_shards(root, splits, VOCAB)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A real byte-level BPE with our special tokens, in the files AutoTokenizer reads."""
    root = tmp_path_factory.mktemp("tokenizer")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Aspirin reduces the risk of myocardial infarction in adults."] * 20, trainer)
    tok.save(str(root / "tokenizer.json"))
    roles = dict(zip(("pad_token", "unk_token", "bos_token", "eos_token"), SPECIALS))
    (root / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **roles}))
    (root / "special_tokens_map.json").write_text(json.dumps(roles))
    return root


@pytest.fixture(scope="module")
def finished_run(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(config(checkpoint_every=4), shards, out)
    return out


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert len({r["step"] for r in train_records}) == len(train_records), "a step was logged twice"
    return {r["step"]: r["loss"] for r in train_records}


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig.of(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110).optim
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, cfg) == lr_at(500, cfg) == pytest.approx(0.1)
    after_warmup = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))


def test_overfits_a_single_fixed_batch(tmp_path):
    # One train file of exactly context + 1 tokens: every step trains on the same window.
    tokens = np.random.default_rng(1).integers(4, VOCAB, 17)
    shards = write_shards(tmp_path / "shards", {"train": [tokens], "val": [tokens]}, VOCAB)
    cfg = config(batch_size=1, max_steps=150, lr=1e-2, min_lr=1e-3, warmup_steps=5, weight_decay=0.0, eval_every=150, checkpoint_every=150)
    summary = train(cfg, shards, tmp_path / "run")
    first = losses(tmp_path / "run")[1]
    assert first > math.log(VOCAB) - 0.5
    assert summary["final_loss"] < 0.05 and summary["val_loss"] < 0.05


def test_run_folder_checkpoints_and_metrics(finished_run):
    assert sorted(p.name for p in finished_run.glob("ckpt_*")) == ["ckpt_0000008", "ckpt_0000012"]  # keep_last=2
    assert latest_checkpoint(finished_run).name == "ckpt_0000012"
    ckpt = finished_run / "ckpt_0000012"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "optimizer.pt", "state.json"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 12 and state["sampler"] == {"seed": 1337, "step": 12}
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["model"]["vocab_size"] == VOCAB and saved["optim"]["max_steps"] == 12 and saved["tokens"]["eos_id"] == 3
    torch.load(ckpt / "optimizer.pt", weights_only=True)  # plain tensors and containers only
    records = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]
    assert (finished_run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["tokens_seen"] == 12 * 4 * 16 and summary["checkpoint"] == "ckpt_0000012"
    assert losses(finished_run)[12] < losses(finished_run)[1]


def test_resume_after_sigkill_matches_an_uninterrupted_run(shards, tmp_path):
    cfg = config(max_steps=80, checkpoint_every=10, eval_every=40)
    (tmp_path / "config.json").write_text(json.dumps(asdict(cfg)))
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "model.train", "--config", str(tmp_path / "config.json"), "--shards", str(shards), "--out", str(killed)]
    kill_once_written(command, killed / "ckpt_0000010")
    assert not (killed / "ckpt_0000080").exists()
    (killed / ".tmp_ckpt_0000999").mkdir()  # as if killed while saving: never read, removed

    summary = train(cfg, shards, killed)
    straight = tmp_path / "straight"
    train(cfg, shards, straight)

    assert summary["resumed_from_step"] >= 10
    assert not (killed / ".tmp_ckpt_0000999").exists()
    resumed, uninterrupted = losses(killed), losses(straight)
    assert sorted(resumed) == list(range(1, 81))
    for step in (summary["resumed_from_step"] + 1, 60, 80):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7)


def test_resumed_run_with_a_different_model_fails(finished_run, shards, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    with pytest.raises(ValueError, match="holds a different model"):
        train(config(max_steps=14, model=MODEL | {"n_layer": 3}), shards, out)


def test_checkpoint_loading_never_unpickles(finished_run, shards, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    flag = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):  # unpickling this would create the flag file
            return (Path.touch, (flag,))

    torch.save({"state": {0: Payload()}, "param_groups": []}, out / "ckpt_0000012" / "optimizer.pt")
    with pytest.raises(pickle.UnpicklingError):
        train(config(max_steps=14), shards, out)
    assert not flag.exists()


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(model=MODEL | {"vocab_size": 512}), ValueError, "vocab_size 512 differs from the shards' vocab_size 300"),
        (dict(context_length=64), ValueError, "longer than the model's context_length 32"),
        (dict(tokens_per_step=100), ValueError, "not a multiple of batch_size"),
        (dict(dtype="bf16", device="cpu"), RuntimeError, "bf16 needs a CUDA GPU"),
        (dict(device="cuda"), RuntimeError, "no CUDA GPU is visible"),
    ],
    ids=["vocab", "context", "tokens-per-step", "bf16", "cuda"],
)
def test_bad_configs_fail_fast(shards, tmp_path, overrides, error, message):
    if torch.cuda.is_available() and overrides.get("device") == "cuda":
        pytest.skip("asking for CUDA only fails on a machine without a GPU")
    with pytest.raises(error, match=message):
        train(config(**overrides), shards, tmp_path / "run")
    assert not list((tmp_path / "run").glob("ckpt_*"))


def test_command_line_flags_build_the_config(tmp_path):
    (tmp_path / "base.json").write_text(json.dumps({"optim": {"max_steps": 7, "lr": 0.5}}))
    cfg, folders, out = training_stage("model.train").parse(
        ["--shards", "S", "--out", "O", "--config", str(tmp_path / "base.json"), "--optim.lr", "0.01",
         "--model", '{"n_layer": 3, "arch": "gpt2"}', "--run.compile", "--tokens-per-step", "4096"]
    )
    assert (folders, out) == ({"shards": Path("S")}, Path("O"))
    assert (cfg.optim.max_steps, cfg.optim.lr, cfg.run.compile, cfg.shape.tokens_per_step) == (7, 0.01, True, 4096)
    assert cfg.shape.model == {"n_layer": 3, "arch": "gpt2"}


def test_export_loads_in_transformers_with_the_same_logits(finished_run, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_hf(finished_run / "ckpt_0000012", tmp_path / "hf", tokenizer_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    ours = load_model(finished_run / "ckpt_0000012").eval()
    ids = torch.tensor([hf_tokenizer("Aspirin reduces the risk")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours(ids)[0], atol=1e-4, rtol=1e-4)
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (3, 0)
    assert hf_model.config.eos_token_id == 3
    with pytest.raises(FileNotFoundError, match="lacks"):
        export_hf(finished_run / "ckpt_0000012", tmp_path / "hf2", tmp_path)


def _artifacts(store: Store, shards: Path, tokenizer_dir: Path):
    tokenizer = store.get_or_build(ArtifactSpec("tokenizer", "test"), lambda work: [shutil.copy2(p, work) for p in tokenizer_dir.iterdir()] and None)

    def build_shards(work: Path) -> None:
        shutil.copytree(shards, work, dirs_exist_ok=True)
        meta = json.loads((work / "meta.json").read_text())
        meta["tokenizer"] = {"ref": tokenizer.ref, "sha256": sha256_file(tokenizer.file("tokenizer.json"))}
        (work / "meta.json").write_text(json.dumps(meta))

    return store.get_or_build(ArtifactSpec("shards", "test", {}, (tokenizer.ref,)), build_shards), tokenizer


def test_pretrain_under_torchrun_matches_one_process(shards, tokenizer_dir, tmp_path):
    """The pretrain stage, in-process and as torchrun --nproc_per_node=2 (gloo), same global batch."""
    store = Store(tmp_path / "store")
    shards_artifact, tokenizer = _artifacts(store, shards, tokenizer_dir)
    assert shards_tokenizer(shards_artifact) == tokenizer.ref
    inputs = {"shards": shards_artifact, "tokenizer": tokenizer}
    cfg = config(batch_size=2, tokens_per_step=2 * 16 * 2, max_steps=8, eval_every=8, checkpoint_every=4)

    single = PRETRAIN.run(store, inputs, cfg)
    double = PRETRAIN.run(store, inputs, cfg.replace(devices=2))

    assert single.summary["grad_accum"] == 2 and double.summary["world_size"] == 2 and double.summary["grad_accum"] == 1
    one, two = losses(single.path), losses(double.path)
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4)
    assert double.summary["val_loss"] == pytest.approx(single.summary["val_loss"], rel=1e-4)
    for artifact in (single, double):
        names = {p.name for p in artifact.path.iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "manifest.json"} <= names
        assert "run" not in names and "optimizer.pt" not in names
        assert artifact.parents == [shards_artifact.ref, tokenizer.ref]
    assert PRETRAIN.run(store, inputs, cfg.replace(log_every=2, keep_last=1)).reused  # how, not what: same artifact


def test_pretrain_flow_resolves_the_tokenizer_and_trains(prefect_server, shards, tokenizer_dir, store):
    from flows.pretrain import pretrain

    shards_artifact, tokenizer = _artifacts(store, shards, tokenizer_dir)
    ref = pretrain(shape=ModelShape(preset="tiny"), optim=OptimConfig(max_steps=3, batch_size=2, lr=1e-3), shards_ref=shards_artifact.ref)
    checkpoint = store.require(ref)
    assert checkpoint.kind == "pretrain" and checkpoint.parents == [shards_artifact.ref, tokenizer.ref]
    assert checkpoint.params["optim"]["max_steps"] == 3 and checkpoint.summary["steps"] == 3
    assert json.loads(checkpoint.file("config.json").read_text())["model"]["n_layer"] == 4  # the tiny preset

    from flows.cli import main  # export-hf takes a ref like every other command, a unique prefix of its key too

    main(["export-hf", f"pretrain/{checkpoint.key[:6]}", str(store.root.parent / "hf")])
    assert json.loads((store.root.parent / "hf" / "config.json").read_text())["model_type"] == "llama"
    assert (store.root.parent / "hf" / "tokenizer.json").is_file()


def test_pretrain_killed_while_clearing_its_run_folder_finishes_without_retraining(shards, tokenizer_dir, tmp_path, monkeypatch):
    import model.training_stages as training_stages

    store = Store(tmp_path / "store")
    shards_artifact, tokenizer = _artifacts(store, shards, tokenizer_dir)
    cfg = config(batch_size=2, max_steps=2, eval_every=2, checkpoint_every=2)

    rmtree = shutil.rmtree

    def killed_while_clearing(path, *args, **kwargs):
        if Path(path).name == "run.done":
            raise KeyboardInterrupt(f"killed while deleting {path}")
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_while_clearing)
    inputs = {"shards": shards_artifact, "tokenizer": tokenizer}
    with pytest.raises(KeyboardInterrupt):
        PRETRAIN.run(store, inputs, cfg)
    monkeypatch.undo()

    work = store.work_dir(PRETRAIN.spec(inputs, cfg))
    assert (work / "run.done").is_dir() and (work / "model.safetensors").is_file()
    monkeypatch.setattr(training_stages, "train", lambda *a, **k: pytest.fail("retrained a finished run"))
    artifact = PRETRAIN.run(store, inputs, cfg)
    assert artifact.summary["steps"] == 2 and not (artifact.path / "run.done").exists()


@pytest.mark.parametrize("rot", ["a write", "bit rot"])
def test_a_shard_with_two_flipped_bytes_publishes_no_checkpoint(rot, shards, tokenizer_dir, tmp_path):
    """Two bytes changed in place (same size), by a write, or as bit rot leaves a file: its size,
    mtime and inode kept, so the store's memory of having hashed it still matches. Nothing is
    published from it, and nothing learnt from it is kept to resume from."""
    store = Store(tmp_path / "store")
    shards_artifact, tokenizer = _artifacts(store, shards, tokenizer_dir)
    inputs = {"shards": shards_artifact, "tokenizer": tokenizer}
    store.verified(shards_artifact.ref)  # hashed once: its (size, mtime, inode) remembered
    shard = shards_artifact.file("train_0000.bin")
    before = shard.stat()
    shard.chmod(0o644)
    data = bytearray(shard.read_bytes())
    data[100:102] = bytes([data[101], data[100] ^ 1])
    with open(shard, "r+b") as f:  # in place: the same inode
        f.write(bytes(data))
    if rot == "bit rot":
        os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert (shard.stat().st_size, shard.stat().st_mtime_ns, shard.stat().st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    with pytest.raises(Exception, match=f"{shard}: sha256 differs from the manifest"):
        PRETRAIN.run(store, inputs, config(max_steps=2))
    assert store.ls("pretrain") == [] and [q["ref"] for q in store.quarantined()] == [shards_artifact.ref]
    assert not list((store.root / "pretrain").glob("*.partial"))  # no checkpoint trained on it to resume from


def test_two_nodes_train_as_one_launcher_of_their_world_size_and_resume_after_a_node_dies(shards, tokenizer_dir, tmp_path, monkeypatch):
    """Two torchrun launchers meeting at a c10d rendezvous on 127.0.0.1, gloo: the stage's and a
    `medlm join` (the other node), against one launcher of two processes: the same losses and the
    same weights. Then the joined node is killed mid-run: the stage fails and publishes nothing;
    run again with a new join, it resumes from the newest complete checkpoint and ends with the
    same weights as a run never interrupted."""
    import os
    import signal
    import subprocess
    import threading

    from storage.processes import free_port

    store = Store(tmp_path / "store")
    monkeypatch.setenv("MEDLM_STORE", str(store.root))  # where the stage announces the launch to `medlm join`
    shards_artifact, tokenizer = _artifacts(store, shards, tokenizer_dir)
    inputs = {"shards": shards_artifact, "tokenizer": tokenizer}
    cfg = config(batch_size=2, max_steps=8, eval_every=8, checkpoint_every=2, keep_last=4)
    reference = PRETRAIN.run(store, inputs, cfg.replace(devices=2))

    def on_two_nodes(job: str, kill_once: Path | None = None):
        multi = cfg.replace(nodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}", rdzv_id=job)
        joined = subprocess.Popen([str(Path(sys.executable).with_name("medlm")), "join", job, "--timeout", "120"],
                                  env={**os.environ, "MEDLM_STORE": str(store.root)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(joined.stdout))
        reader.start()

        def kill_when_written():
            while not kill_once.is_dir() and joined.poll() is None:
                threading.Event().wait(0.05)
            joined.send_signal(signal.SIGKILL)

        killer = threading.Thread(target=kill_when_written) if kill_once else None
        if killer:
            killer.start()
        try:
            return PRETRAIN.run(store, inputs, multi), multi
        finally:
            joined.wait(timeout=120)
            reader.join()
            if killer:
                killer.join()
            assert joined.returncode == (-signal.SIGKILL if kill_once else 0), "".join(output)[-3000:]

    two, multi = on_two_nodes("two-nodes")
    assert two.summary["world_size"] == reference.summary["world_size"] == 2
    one, other = losses(reference.path), losses(two.path)
    assert sorted(one) == sorted(other) == list(range(1, 9))
    for step in one:
        assert other[step] == pytest.approx(one[step], rel=1e-4)
    expected = load_model(reference.path).state_dict()
    for name, weight in load_model(two.path).state_dict().items():
        torch.testing.assert_close(weight, expected[name], rtol=1e-4, atol=1e-6)
    assert not list((store.root / ".rendezvous").iterdir())  # the announcement goes when the run ends

    # Another key (other steps), a node killed once its fourth-step checkpoint is written.
    longer = cfg.replace(max_steps=10, eval_every=10)
    reference = PRETRAIN.run(store, inputs, longer.replace(devices=2))
    cfg = longer
    spec = PRETRAIN.spec(inputs, longer.replace(nodes=2, rdzv_endpoint="127.0.0.1:1", rdzv_id="x"))  # where and what job: not in the key
    with pytest.raises(RuntimeError, match="torchrun exited with status"):
        on_two_nodes("killed", kill_once=store.work_dir(spec) / "run" / "ckpt_0000004")
    assert store.get(spec.ref) is None and latest_checkpoint(store.work_dir(spec) / "run") is not None  # nothing published, checkpoints kept
    resumed, _ = on_two_nodes("resumed")
    assert resumed.summary["resumed_from_step"] >= 4
    expected = load_model(reference.path).state_dict()
    for name, weight in load_model(resumed.path).state_dict().items():
        torch.testing.assert_close(weight, expected[name], rtol=1e-4, atol=1e-6)


def test_a_launcher_killed_alone_takes_its_workers_and_its_peers_stop(shards, tmp_path):
    """D4 of issue 27: one of two torchrun launchers killed by SIGKILL (the out-of-memory killer
    picks the biggest process it sees) left its worker training, and the other launcher waited
    minutes. Its workers end with it, and the other node's launcher fails within a bounded time."""
    import signal
    import subprocess

    from storage.processes import free_port

    port = free_port()

    def launcher(name: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=d4", "-m", "model.train", "--shards", str(shards), "--out", str(tmp_path / "run"),
                   "--preset", "tiny", "--model", json.dumps(MODEL), "--context-length", "16", "--optim.batch-size", "4",
                   "--optim.max-steps", "100000", "--run.checkpoint-every", "20", "--run.device", "cpu"]
        return subprocess.Popen(command, stdout=open(tmp_path / f"{name}.log", "w"), stderr=subprocess.STDOUT)

    a, b = launcher("a"), launcher("b")
    try:
        deadline = time.time() + 180
        while not list((tmp_path / "run").glob("ckpt_*")):  # training together
            assert a.poll() is None and b.poll() is None and time.time() < deadline, (tmp_path / "a.log").read_text()[-3000:]
            time.sleep(0.1)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(b.pid)], capture_output=True, text=True).stdout.split()]
        assert workers
        b.send_signal(signal.SIGKILL)
        b.wait()
        assert _ended(workers, timeout_s=15), "the killed launcher's worker trains on"
        assert a.wait(timeout=120) != 0  # its peers fail (their next collective has nobody to meet)
    finally:
        for launched in (a, b):
            launched.kill()
            launched.wait()


def _ended(pids: list[int], timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while any(Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" for pid in pids):
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_run_that_cannot_fit_is_refused_in_one_line_before_anything_is_allocated(shards, tmp_path):
    """The `base` preset at batch 64 x 2048 tokens needs about 220 GB on a CPU: refused at once,
    naming what it needs, what there is and what to lower, instead of being killed by the kernel."""
    import resource

    from model.train import NotEnoughMemory

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    huge = TrainConfig.of(preset="base", model={"vocab_size": VOCAB}, context_length=2048, batch_size=64, max_steps=1, device="cpu")
    with pytest.raises(NotEnoughMemory) as refused:
        train(huge, shards, tmp_path / "run")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("training 85M parameters at batch_size 64 x 2048 tokens needs about ")
    assert "GB (MemAvailable)" in message and "lower batch_size" in message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing of it was allocated
    assert not (tmp_path / "run").exists()
