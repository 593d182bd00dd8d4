"""From a checkpoint to files people run: GGUF (read back with llama.cpp's gguf package, and run by
llama.cpp itself through llama-cpp-python when its wheel is installed)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from model.checkpoint import load_model
from model.export_gguf import export_gguf
from model.export_hf import to_hf_state_dict

def rope_unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's adjacent rotary pairs back to ours (i, i + d/2): the inverse of rope_permute."""
    return weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def test_gguf_holds_our_weights_rope_permuted_the_tokenizer_and_the_shape(tiny_checkpoint, tmp_path):
    import gguf

    model = load_model(tiny_checkpoint.path)
    cfg = model.config
    ours = {k: v.float().numpy() for k, v in to_hf_state_dict(model).items()}
    tokenizer = json.loads(tiny_checkpoint.file("tokenizer.json").read_text())
    sizes = {}
    for type in ("f16", "q8_0"):
        path = export_gguf(tiny_checkpoint.path, tmp_path / f"model.{type}.gguf", type)
        reader = gguf.GGUFReader(path)
        sizes[type] = sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) > 1)  # the tiny model's file is mostly its vocabulary
        field = {name: f.contents() for name, f in reader.fields.items()}
        assert field["general.architecture"] == "llama" and field["general.file_type"] == (7 if type == "q8_0" else 1)
        assert (field["llama.block_count"], field["llama.attention.head_count"], field["llama.context_length"]) == (cfg.n_layer, cfg.n_head, cfg.context_length)
        assert field["tokenizer.ggml.tokens"] == sorted(tokenizer["model"]["vocab"], key=tokenizer["model"]["vocab"].get)
        assert field["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in tokenizer["model"]["merges"]]
        assert field["tokenizer.ggml.eos_token_id"] == 3 and field["tokenizer.ggml.add_bos_token"] is False
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
        tensors = {t.name: t for t in reader.tensors}
        assert len(tensors) == len(ours) - cfg.tie_embeddings  # tied: llama.cpp reads the output from token_embd
        for hf_name, weight in ours.items():
            if hf_name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            t = tensors[names.get_name(hf_name, try_suffixes=(".weight",))]
            stored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(weight.shape)
            if "q_proj" in hf_name or "k_proj" in hf_name:
                assert not np.allclose(stored, weight, atol=1e-2)  # permuted rows, not ours as they are
                stored = rope_unpermute(stored, cfg.n_head if "q_proj" in hf_name else cfg.n_kv_head)
            if weight.ndim == 1:
                assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(stored, weight)
            elif type == "f16":
                np.testing.assert_allclose(stored, weight, rtol=1e-3, atol=1e-6)
            else:  # 8 bits per weight, a scale per 32: an error of at most half a step of the block's
                assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
                assert np.abs(stored - weight).max() <= np.abs(weight).max() / 127
    assert sizes["q8_0"] == pytest.approx(sizes["f16"] * 34 / 64)  # 32 int8 and an f16 scale for every 32 f16 weights


def test_gguf_export_refuses_what_it_cannot_write(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="one of"):
        export_gguf(tiny_checkpoint.path, tmp_path / "m.gguf", "q4_k")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        export_gguf(tiny_checkpoint.path / "..", tmp_path / "m.gguf")


def test_llama_cpp_runs_the_gguf_and_predicts_our_tokens(tiny_checkpoint, tmp_path, monkeypatch):
    llama_cpp = pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python has no wheel for this Python on the registry and its build takes 4-7 min: "
        "`make llama-cpp-wheel` builds it once into ~/.cache/medlm-wheels, which `make venv` then installs",
    )
    # llama.cpp's extra CPU buffer types (AMX, repacking) segfault on q8_0 on this machine's CPU
    # (measured: every q8_0 file; f16 runs): the plain CPU path, which any laptop has.
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain_cpu():
        params = defaults()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain_cpu)
    model = load_model(tiny_checkpoint.path).eval()
    text = "Aspirin reduces the risk of myocardial infarction in patients with coronary artery disease."
    from storage.formats import load_tokenizer

    ids = load_tokenizer(tiny_checkpoint.file("tokenizer.json")).encode(text).ids
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    for type in ("f16", "q8_0"):
        llm = llama_cpp.Llama(model_path=str(export_gguf(tiny_checkpoint.path, tmp_path / f"m.{type}.gguf", type)), n_ctx=256,
                              n_threads=1, logits_all=True, verbose=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids  # the same tokenizer
        llm.eval(ids)
        theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
        torch.testing.assert_close(theirs, ours, atol=0.05 if type == "q8_0" else 2e-3, rtol=0)
        assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= (0.9 if type == "q8_0" else 1.0)


# -- the release stage ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(tiny_checkpoint, session_store):
    """A LoRA fine-tuning of the tiny checkpoint on PubMedQA and its evaluation (a few items)."""
    from eval_records import DATA

    from model.finetune import FinetuneConfig
    from model.train import TrainConfig
    from tasks.evaluate import EVALUATE, EvaluationConfig
    from tasks.finetune import FINETUNE, FinetuneRun
    from tasks.qa import QA, QAConfig

    pubmedqa = QA.run(session_store, {}, QAConfig(source=str(DATA / "pubmedqa")))
    steps = TrainConfig.of(max_steps=2, batch_size=4, lr=1e-3, warmup_steps=1, eval_every=100, checkpoint_every=100)
    tuned = FINETUNE.run(session_store, {"base": tiny_checkpoint, "data": [pubmedqa]}, FinetuneRun(FinetuneConfig(max_length=256), steps.optim, steps.run))
    evaluation = EVALUATE.run(session_store, {"model": tuned, "qa": [pubmedqa]}, EvaluationConfig(benchmarks=("pubmedqa",), shots=(0,), max_items=8, generation_items=0))
    return tuned, evaluation


def test_the_release_folder_loads_in_transformers_and_llama_cpp_s_format_and_its_card_holds_the_evaluation_and_the_pubmed_files(evaluated, session_store):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.chat import DISCLAIMER
    from storage.lineage import ancestors_first, lineage
    from tasks.release import RELEASE, ReleaseConfig

    tuned, evaluation = evaluated
    release = RELEASE.run(session_store, {"model": tuned, "evaluation": evaluation}, ReleaseConfig(name="tiny-medlm"))
    folder = release.path
    assert release.parents == [tuned.ref, evaluation.ref] and release.summary["gguf"] == ["tiny-medlm-f16.gguf", "tiny-medlm-q8_0.gguf"]

    ids = torch.randint(4, 1000, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(folder)(ids).logits, load_model(tuned.path)(ids)[0], atol=1e-4, rtol=1e-4)
    messages = [{"role": "user", "content": "Is it?"}]
    assert AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "Question: Is it?\nAnswer:"

    card = ModelCard.load(folder / "README.md")
    results = json.loads(evaluation.file("results.json").read_text())
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in card.data.eval_results] == [("qiaojin/PubMedQA", "acc", r["metrics"]["acc"]["value"]) for r in results]
    assert card.data.license == "apache-2.0" and "medical" in card.data.tags
    assert DISCLAIMER in card.text and evaluation.ref in card.text
    for r in results:  # every score with its interval, n and baseline
        assert f"| {r['metrics']['acc']['n']} |" in card.text and r["baseline"]["acc"]["name"] in card.text
    root = lineage(session_store, tuned.ref)
    downloads = [n for n in ancestors_first(root) if n.kind == "download"]
    assert downloads and all(n.label in card.text for n in downloads)  # the PubMed files, with their md5s
    assert json.loads((folder / "lineage.json").read_text()) == root.as_dict()

    with pytest.raises(ValueError, match="release a model with its own evaluation"):  # the base, not the model evaluated
        RELEASE.run(session_store, {"model": session_store.require(tuned.parents[0]), "evaluation": evaluation}, ReleaseConfig())


def test_release_push_uploads_the_folder_through_the_hub_api_and_without_a_token_says_how(evaluated, session_store, tmp_path, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    from tasks.release import RELEASE, ReleaseConfig, push_release

    tuned, evaluation = evaluated
    release = RELEASE.run(session_store, {"model": tuned, "evaluation": evaluation}, ReleaseConfig(name="tiny-medlm"))

    class FakeHub:  # huggingface_hub.HfApi's two calls, recorded
        def __init__(self):
            self.calls = []

        def create_repo(self, repo_id, **kwargs):
            self.calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/1"})()

    hub = FakeHub()
    assert push_release(release.path, "someone/tiny-medlm", api=hub) == "https://huggingface.co/someone/tiny-medlm/commit/1"
    (_, repo, created), (_, _, uploaded) = hub.calls
    assert repo == "someone/tiny-medlm" and created == {"repo_type": "model", "private": False, "exist_ok": True}
    assert uploaded["folder_path"] == str(release.path) and uploaded["repo_type"] == "model" and uploaded["ignore_patterns"] == ["manifest.json"]

    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")} | {"HF_HOME": str(tmp_path / "hf"), "MEDLM_STORE": str(session_store.root)}
    run = subprocess.run([str(Path(sys.executable).parent / "medlm"), "release", "push", "someone/tiny-medlm", "--ref", release.ref],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip() == "error: no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again"
