"""Export a medlm checkpoint as a Hugging Face model folder.

``AutoModelForCausalLM.from_pretrained(out_dir)`` then loads a ``LlamaForCausalLM`` (llama arch)
or a ``GPT2LMHeadModel`` (gpt2 arch) with the same logits as ours, and, when a tokenizer folder is
given, ``AutoTokenizer.from_pretrained(out_dir)`` loads the tokenizer.

    python -m model.export_hf CHECKPOINT_DIR OUT_DIR [--tokenizer TOKENIZER_DIR]
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import torch

from model.checkpoint import is_hf_folder, load_checkpoint_config, load_model
from model.model import ModelConfig, Transformer
from storage.config import ArgumentParser
from storage.formats import TOKENIZER_FILES


def hf_config(cfg: ModelConfig, special_tokens: dict | None = None):
    """The transformers config describing the same network as ``cfg``."""
    from transformers import GPT2Config, LlamaConfig

    ids = special_tokens or {}
    token_ids = {"bos_token_id": ids.get("bos_id"), "eos_token_id": ids.get("eos_id"), "pad_token_id": ids.get("pad_id")}
    if cfg.arch == "llama":
        return LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.mlp_hidden,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_kv_head,
            max_position_embeddings=cfg.context_length,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings,
            attention_bias=False,
            mlp_bias=False,
            **token_ids,
        )
    if cfg.n_kv_head != cfg.n_head:
        raise ValueError("GPT2LMHeadModel has no grouped-query attention; export a gpt2 model with n_kv_head == n_head")
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.context_length,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.mlp_hidden,
        activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings,
        **token_ids,
    )


LLAMA_PROJECTIONS = tuple(f"attn.{p}_proj" for p in "qkvo") + tuple(f"mlp.{p}_proj" for p in ("gate", "up", "down"))


def hf_module_name(name: str) -> str:
    """The LlamaForCausalLM path of one of our llama projections (what a LoRA adapter is keyed by):
    blocks.3.attn.q_proj -> model.layers.3.self_attn.q_proj, blocks.3.mlp.up_proj -> model.layers.3.mlp.up_proj."""
    match = re.fullmatch(r"blocks\.(\d+)\.(attn|mlp)\.(\w+_proj)", name)
    if match is None:
        raise ValueError(f"{name!r} is not one of our llama projections (blocks.N.attn.q_proj, blocks.N.mlp.up_proj, ...)")
    layer, part, projection = match.groups()
    return f"model.layers.{layer}.{'self_attn' if part == 'attn' else 'mlp'}.{projection}"


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under the parameter names of the matching transformers model."""
    ours = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}
    cfg = model.config
    hf: dict[str, torch.Tensor] = {"lm_head.weight": ours["lm_head.weight"]}
    if cfg.arch == "llama":
        hf["model.embed_tokens.weight"] = ours["tok_emb.weight"]
        hf["model.norm.weight"] = ours["norm_f.weight"]
        for i in range(cfg.n_layer):
            src, dst = f"blocks.{i}.", f"model.layers.{i}."
            hf[dst + "input_layernorm.weight"] = ours[src + "attn_norm.weight"]
            hf[dst + "post_attention_layernorm.weight"] = ours[src + "mlp_norm.weight"]
            for proj in LLAMA_PROJECTIONS:
                hf[hf_module_name(src + proj) + ".weight"] = ours[src + proj + ".weight"]
        return hf
    # GPT-2 stores its projections as Conv1D, (in, out): the transpose of nn.Linear's weight,
    # with query, key and value fused into c_attn.
    hf["transformer.wte.weight"] = ours["tok_emb.weight"]
    hf["transformer.wpe.weight"] = ours["pos_emb.weight"]
    hf["transformer.ln_f.weight"] = ours["norm_f.weight"]
    hf["transformer.ln_f.bias"] = ours["norm_f.bias"]
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for ours_norm, hf_norm in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            for kind in ("weight", "bias"):
                hf[dst + f"{hf_norm}.{kind}"] = ours[src + f"{ours_norm}.{kind}"]
        qkv = [src + f"attn.{p}_proj" for p in "qkv"]
        hf[dst + "attn.c_attn.weight"] = torch.cat([ours[p + ".weight"] for p in qkv]).t()
        hf[dst + "attn.c_attn.bias"] = torch.cat([ours[p + ".bias"] for p in qkv])
        for ours_proj, hf_proj in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
            hf[dst + f"{hf_proj}.weight"] = ours[src + f"{ours_proj}.weight"].t()
            hf[dst + f"{hf_proj}.bias"] = ours[src + f"{ours_proj}.bias"]
    return hf


def to_hf_model(model: Transformer, special_tokens: dict | None = None):
    """A transformers model (eval mode, fp32) holding a copy of our weights."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_config(hf_config(model.config, special_tokens))
    state = {k: v.float().contiguous() for k, v in to_hf_state_dict(model).items()}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    # Causal-mask buffers some transformers versions keep in the state dict are not weights.
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping to transformers is incomplete: missing {missing}, unexpected {unexpected}")
    return hf_model.eval()


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write config.json + model.safetensors (+ the tokenizer files) into out_dir."""
    out = Path(out_dir)
    if is_hf_folder(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir} already is a Hugging Face model folder (fine-tuned from one): load it with from_pretrained as it is")
    if tokenizer_dir is not None:
        missing = [name for name in TOKENIZER_FILES if not (Path(tokenizer_dir) / name).is_file()]
        if missing:
            raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} lacks {missing}; pass the tokenizer artifact's folder")
    model = load_model(checkpoint_dir)
    special_tokens = load_checkpoint_config(checkpoint_dir).get("tokens")
    to_hf_model(model, special_tokens).save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            shutil.copy2(Path(tokenizer_dir) / name, out / name)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a ckpt_NNNNNNN folder, or a pretrain artifact folder")
    parser.add_argument("out", help="folder to write the Hugging Face model into")
    parser.add_argument("--tokenizer", help="tokenizer folder (tokenizer.json, tokenizer_config.json, ...)")
    args = parser.parse_args(argv)
    print(export_hf(args.checkpoint, args.out, args.tokenizer))


if __name__ == "__main__":
    main()
