"""Export a checkpoint of ours (llama arch) as a GGUF file, the format llama.cpp and Ollama run,
written with llama.cpp's own ``gguf`` package: f16, or q8_0 (about half the bytes).

    python -m model.export_gguf CHECKPOINT_DIR OUT.gguf [--type q8_0] [--name medlm] [--license apache-2.0]

The folder needs the tokenizer files (a pretrain or finetune artifact has them): the vocabulary,
merges and special tokens go into the file, and a fine-tuned model's chat template too.

Our rotary embedding rotates the pairs (i, i + head_dim/2) of each head, as transformers' Llama
does; llama.cpp rotates adjacent pairs (2i, 2i + 1). So the rows of the Q and K projections are
permuted the way llama.cpp's convert_hf_to_gguf.py permutes a Llama's (``rope_permute``). On the
demo's pretrained model, 200 positions of a text, f16: with it llama.cpp's top token is ours at
every position (logits within 0.0023); without it at 78% (logits off by up to 3.0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import load_model
from model.export_hf import to_hf_state_dict
from storage.config import ArgumentParser
from storage.formats import TOKENIZER_FILE

TYPES = ("f16", "q8_0")


def rope_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a Q or K projection, each head's halves (i, i + d/2) made adjacent pairs (2i, 2i + 1)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def export_gguf(checkpoint_dir: str | Path, out_file: str | Path, type: str = "q8_0", name: str | None = None, license: str | None = None) -> Path:
    """Write the checkpoint in ``checkpoint_dir`` (weights, config.json, tokenizer files) as a GGUF
    file; ``general.name`` is ``name`` (default: the folder's name), ``general.license`` ``license`` if given."""
    import gguf

    folder, out = Path(checkpoint_dir), Path(out_file)
    if type not in TYPES:
        raise ValueError(f"GGUF type must be one of {TYPES}, got {type!r}")
    if not (folder / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {TOKENIZER_FILE}; export a pretrain or finetune artifact (it carries its tokenizer)")
    model = load_model(folder)
    cfg = model.config
    if cfg.arch != "llama":
        raise ValueError(f"{folder} is a {cfg.arch} model; GGUF export writes llama-arch models (RoPE, RMSNorm, SwiGLU)")

    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name or folder.name)
    if license:
        writer.add_license(license)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.mlp_hidden)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    vocab = json.loads((folder / TOKENIZER_FILE).read_text())
    special = {t["id"] for t in vocab["added_tokens"] if t["special"]}
    by_id = {i: token for token, i in vocab["model"]["vocab"].items()} | {t["id"]: t["content"] for t in vocab["added_tokens"]}
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("gpt-2")  # ByteLevel's GPT-2 split (tasks/tokenizer.py)
    writer.add_token_list([by_id[i] for i in range(cfg.vocab_size)])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(cfg.vocab_size)])
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=cfg.vocab_size).add_to_gguf(writer, quiet=True)  # merges, special ids, chat template
    writer.add_add_bos_token(False)  # our tokenizer adds nothing: documents are separated by [EOS]

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    state = to_hf_state_dict(model)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")  # llama.cpp uses token_embd for the output when output.weight is absent
    for hf_name, tensor in state.items():
        if hf_name.endswith("q_proj.weight"):
            tensor = rope_permute(tensor, cfg.n_head)
        elif hf_name.endswith("k_proj.weight"):
            tensor = rope_permute(tensor, cfg.n_kv_head)
        data = tensor.detach().float().numpy()
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise RuntimeError(f"gguf {gguf.__version__} has no llama tensor name for {hf_name}")
        if data.ndim == 1:  # norms stay f32, as convert_hf_to_gguf.py keeps them
            writer.add_tensor(name, data)
        elif type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a pretrain or finetune artifact folder (weights, config.json, tokenizer files)")
    parser.add_argument("out", help="the .gguf file to write")
    parser.add_argument("--type", choices=TYPES, default="q8_0", help="f16, or q8_0: 8-bit blocks of 32 with an f16 scale [default: q8_0]")
    parser.add_argument("--name", help="general.name, the model's name runtimes show [default: the folder's name]")
    parser.add_argument("--license", help="general.license, e.g. apache-2.0 [default: none]")
    args = parser.parse_args(argv)
    print(export_gguf(args.checkpoint, args.out, args.type, args.name, args.license))


if __name__ == "__main__":
    main()
