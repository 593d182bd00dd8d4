"""The model a fine-tuning starts from: our checkpoint folder or a local Hugging Face causal LM,
loaded the same way: its network, tokenizer (as an Encoder, model/sft.py), special tokens,
context length and shape.

    base = load_base("store/pretrain/KEY")          # or a Hugging Face folder
    network = base.network()                         # a fresh fp32 copy on the CPU
    base.save_tokenizer(out_dir, template="eval")    # with the chat template fine-tuning trained on
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model.checkpoint import CONFIG_FILE, check_causal_lm, is_hf_folder, load_checkpoint_config, load_weights
from model.model import IGNORE_INDEX, ModelConfig, Transformer, segment_positions
from model.sft import Encoder, HFEncoder, TokenizerEncoder, chat_template, write_chat_template
from storage.formats import SPECIAL_IDS, TOKENIZER_FILE, TOKENIZER_FILES, load_tokenizer


@dataclass
class Base:
    """A base model: ours (a checkpoint folder) or a Hugging Face folder (``hf``)."""

    path: Path
    hf: bool
    encoder: Encoder
    tokens: dict  # special-token ids, for checkpoints' config.json
    description: dict  # what the network is: a resumed run must match it
    context_length: int
    tokenizer: object  # ours: tokenizers.Tokenizer; HF: its PreTrainedTokenizer

    def network(self, weights: bool = True) -> torch.nn.Module:
        """A fresh copy of the base network (fp32, CPU), with its weights unless ``weights=False``."""
        if self.hf:
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True, dtype=torch.float32)
        model = Transformer(ModelConfig.from_dict(self.description))
        if weights:
            load_weights(model, self.path)
        return model

    def shape(self) -> ModelConfig:
        """The network's shape as a ModelConfig (a Hugging Face model's from its config), for the memory estimate."""
        if not self.hf:
            return ModelConfig.from_dict(self.description)
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(self.path, local_files_only=True)
        return ModelConfig(vocab_size=c.vocab_size, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, d_model=c.hidden_size,
                           mlp_hidden=c.intermediate_size, context_length=self.context_length, n_kv_head=None)

    def save_tokenizer(self, out_dir: Path, template: str) -> None:
        """The tokenizer files into ``out_dir``, with a chat template that renders ``template``'s prompt."""
        if self.hf:
            self.tokenizer.chat_template = chat_template(template)
            self.tokenizer.save_pretrained(out_dir, save_jinja_files=False)
            return
        for name in TOKENIZER_FILES:
            shutil.copyfile(self.path / name, out_dir / name)
        write_chat_template(out_dir / "tokenizer_config.json", template)


def load_base(path: str | Path) -> Base:
    """Our checkpoint folder (weights, config.json and the tokenizer files), or a Hugging Face
    causal-LM folder; checked: a one-line error when the tokenizer does not fit the model."""
    path = Path(path)
    if is_hf_folder(path) or not (path / CONFIG_FILE).is_file():
        return _load_hf_base(path)
    config = load_checkpoint_config(path)
    model_config = ModelConfig.from_dict(config["model"])
    if not (path / TOKENIZER_FILE).is_file():
        raise ValueError(f"{path} has no {TOKENIZER_FILE}; fine-tune a checkpoint artifact (it carries its tokenizer) or copy the tokenizer files in")
    tokenizer = load_tokenizer(path / TOKENIZER_FILE)
    if tokenizer.get_vocab_size() != model_config.vocab_size:
        raise ValueError(
            f"{path}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocabulary is {model_config.vocab_size}; "
            f"use the tokenizer the model was trained with"
        )
    tokens = config.get("tokens") or SPECIAL_IDS
    encoder = TokenizerEncoder(tokenizer, eos_id=tokens["eos_id"], pad_id=tokens["pad_id"])
    return Base(path, False, encoder, tokens, model_config.to_dict(), model_config.context_length, tokenizer)


def _load_hf_base(path: Path) -> Base:
    from transformers import AutoConfig, AutoTokenizer

    check_causal_lm(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    vocab = config.get_text_config().vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}; "
            f"use the tokenizer the model was trained with (or resize the model's embeddings first)"
        )
    encoder = HFEncoder(tokenizer)
    tokens = {"pad_id": encoder.pad_id, "eos_id": encoder.eos_id, "bos_id": tokenizer.bos_token_id}
    context = next((getattr(config, a) for a in ("max_position_embeddings", "n_positions", "n_ctx") if getattr(config, a, None)), None)
    if context is None:
        raise ValueError(f"{path}: config.json names no context length (max_position_embeddings, n_positions, n_ctx)")
    description = {"hf": json.loads(config.to_json_string(use_diff=False))}
    return Base(path, True, encoder, tokens, description, context, tokenizer)


class HFTrainable(torch.nn.Module):
    """A transformers causal LM as ``train_loop`` trains ours: (x, y, segments) -> (logits, mean
    loss over y != -100). Packed rows become position_ids restarting at 0 per example, from which
    transformers (sdpa, no attention_mask) builds the same block-diagonal causal mask as ours."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, segments: torch.Tensor | None = None):
        positions = segment_positions(segments) if segments is not None else None
        logits = self.model(input_ids=idx, position_ids=positions, use_cache=False).logits
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return logits, loss
