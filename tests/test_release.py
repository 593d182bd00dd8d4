"""From a checkpoint to files people run: GGUF (read back with llama.cpp's gguf package, and run by
llama.cpp itself through llama-cpp-python when its wheel is installed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.checkpoint import load_model
from model.export_gguf import export_gguf
from model.export_hf import to_hf_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_llama_cpp_runs_the_gguf_and_predicts_our_tokens(tiny_checkpoint, tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python has no wheel for this Python on the registry and its build takes ~17 min: "
        "`make llama-cpp-wheel` builds it once into ~/.cache/medlm-wheels, which `make venv` then installs",
    )
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
