"""LoRA as a transform of a model, through PEFT: add adapters (only they train), save them in
PEFT's format under the module names of the Hugging Face model they apply to, merge them in.

    lora = Lora(rank=16, alpha=32.0, dropout=0.05, targets=("q", "v"))
    adapted = add_lora(model, lora, hf=False, seed=0)   # ours or a transformers causal LM
    ... train adapted ...
    save_adapter(adapted, lora, hf=False, out_dir=Path("adapter"))
    merged = adapted.merge_and_unload()                # the base's shape again

Our GPT-2-style models (arch "gpt2") get no adapter folder: transformers' GPT2 fuses q, k and v
into one c_attn, which our separate q/k/v adapters do not map onto; their merged weights carry
the adapters all the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

ADAPTER_DIR = "adapter"
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class Lora:
    """The adapters: rank r, update scaled by alpha / r, dropout on their input, the projections that get them."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    def peft_config(self, for_hf: bool):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=[TARGETS[t] for t in self.targets], task_type="CAUSAL_LM" if for_hf else None,
        )

    def describe(self, base: dict) -> dict:
        """What an adapted network is, for its checkpoints (a resumed run must match it)."""
        return {"lora_of": base, "lora": {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}}


def add_lora(model: torch.nn.Module, lora: Lora, hf: bool, seed: int):
    """``model`` with LoRA adapters (only they train; B starts at zero, so nothing changes yet)."""
    from peft import get_peft_model

    torch.manual_seed(seed)  # the adapters' A matrices
    return get_peft_model(model, lora.peft_config(for_hf=hf))


def save_adapter(peft_model, lora: Lora, hf: bool, out_dir: Path) -> str:
    """The adapter in PEFT's format (adapter_config.json + adapter_model.safetensors), under the
    module names of the Hugging Face model it applies to; returns what was written, or why not."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from model.export_hf import hf_module_name

    if hf:
        peft_model.save_pretrained(out_dir)
        config_file = out_dir / "adapter_config.json"  # PEFT writes the base's local path: not in an artifact
        config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"base_model_name_or_path": None}, indent=2, sort_keys=True) + "\n")
        return ADAPTER_DIR
    if peft_model.get_base_model().config.arch != "llama":
        return "not written: transformers' GPT-2 fuses q, k, v into c_attn, which our adapters do not map onto (the merged weights have them)"
    renamed = {}
    for key, tensor in get_peft_model_state_dict(peft_model).items():  # base_model.model.blocks.0.attn.q_proj.lora_A.weight
        module, _, leaf = key.removeprefix("base_model.model.").rpartition(".lora_")
        renamed[f"base_model.model.{hf_module_name(module)}.lora_{leaf}"] = tensor.detach().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(renamed, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora.peft_config(for_hf=True).save_pretrained(str(out_dir))
    return ADAPTER_DIR
