"""Release: an evaluated model -> a folder any user opens with the tools they know.

- ``model.safetensors`` + ``config.json`` + the tokenizer files (with the chat template a
  fine-tuning trained with): transformers' AutoModelForCausalLM / AutoTokenizer load it;
- ``NAME-f16.gguf`` and ``NAME-q8_0.gguf`` for llama.cpp and Ollama (model/export_gguf.py);
- ``README.md``, a Hugging Face model card: model-index results from the evaluation (with n, 95%
  CI, baseline and the items the pretraining corpus held), training data down to the PubMed
  files, intended use, limitations and a medical disclaimer;
- ``lineage.json``: every artifact the model came from, with its parameters and counts.

``medlm release push REPO`` uploads the folder to the Hugging Face Hub (``push_release``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from model.chat import DISCLAIMER
from model.checkpoint import is_hf_folder, load_checkpoint_config
from storage import Input, Stage
from storage.config import config_dataclass
from storage.formats import MODEL_KINDS
from storage.lineage import Node, ancestors_first

CARD_FILE = "README.md"
LINEAGE_FILE = "lineage.json"


@config_dataclass
class ReleaseConfig:
    """What the release folder is called and holds."""

    name: str = Field("medlm", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="The model's name: the card's title and the GGUF files' names.")
    license: str = Field("apache-2.0", description="The license the card declares (a Hugging Face license id).")
    gguf: tuple[Literal["f16", "q8_0"], ...] = Field(("f16", "q8_0"), description="GGUF files to write (llama-arch models of ours; none for a Hugging Face folder).")


def write_model_files(model: Path, out_dir: Path) -> None:
    """The model as transformers loads it: ours exported (model/export_hf.py), a Hugging Face folder copied."""
    from model.export_hf import export_hf

    if is_hf_folder(model):
        for source in model.iterdir():
            if source.is_file() and source.name not in ("manifest.json", "summary.json", "metrics.jsonl", "loss.png", "finetune.json"):
                shutil.copyfile(source, out_dir / source.name)
    else:
        export_hf(model, out_dir, model)


def write_gguf(model: Path, out_dir: Path, config: ReleaseConfig) -> list[str] | str:
    """The GGUF files written, or why none could be."""
    from model.export_gguf import export_gguf

    if is_hf_folder(model):
        return "not written: a Hugging Face base's model (convert it with llama.cpp's convert_hf_to_gguf.py)"
    arch = load_checkpoint_config(model)["model"].get("arch", "llama")
    if arch != "llama":
        return f"not written: a {arch} model (GGUF export writes llama-arch models)"
    return [export_gguf(model, out_dir / f"{config.name}-{type}.gguf", type).name for type in config.gguf]


TUNED = {  # what the card's first line says was done after pretraining
    "finetune": " and fine-tuned on medical question answering",
    "dpo": ", fine-tuned on medical question answering and preference-tuned (DPO) to prefer the right answers",
}


def training_data(root: Node) -> dict[str, list[Node]]:
    """The model's data by kind, from its lineage: PubMed files (download), corpus snapshots, QA sources."""
    found: dict[str, list[Node]] = {}
    for node in ancestors_first(root):
        if node.kind in ("download", "corpus", "qa", *MODEL_KINDS):
            found.setdefault(node.kind, []).append(node)
    return found


def build_release(inputs: dict, out_dir: Path, config: ReleaseConfig, lineage: dict[str, Node]) -> dict:
    model, evaluation = inputs["model"], inputs["evaluation"]
    if model.ref not in evaluation.parents:
        raise ValueError(f"{evaluation.ref} evaluated {next((p for p in evaluation.parents if p.split('/')[0] in MODEL_KINDS), '?')}, not {model.ref}; release a model with its own evaluation")
    write_model_files(model.path, out_dir)
    gguf = write_gguf(model.path, out_dir, config)
    (out_dir / LINEAGE_FILE).write_text(json.dumps(lineage["model"].as_dict(), indent=2) + "\n")
    card = model_card(config, model, evaluation, lineage["model"], gguf, out_dir)
    card.save(out_dir / CARD_FILE)
    data = training_data(lineage["model"])
    return {
        "model": model.ref, "evaluation": evaluation.ref, "gguf": gguf if isinstance(gguf, list) else [],
        "pubmed_files": len(data.get("download", [])), "qa_sources": len(data.get("qa", [])), "eval_results": len(card.data.eval_results or []),
    }


# The Hub datasets our benchmarks are (lm-evaluation-harness's tasks read these), for the model-index.
HUB_DATASETS = {
    "pubmedqa": ("qiaojin/PubMedQA", "PubMedQA"),
    "medmcqa": ("openlifescienceai/medmcqa", "MedMCQA"),
    "medqa_4options": ("GBaker/MedQA-USMLE-4-options-hf", "MedQA (USMLE, 4 options)"),
    "medqa_5options": ("bigbio/med_qa", "MedQA (USMLE, 5 options)"),
    "PubMedQA long answers": ("qiaojin/PubMedQA", "PubMedQA long answers"),
}


def eval_results(evaluation) -> list:
    """The evaluation's headline scores as model-index entries (huggingface_hub.EvalResult): the
    multiple-choice accuracies, bits per byte on held-out abstracts, ROUGE-L of generated answers."""
    from huggingface_hub import EvalResult

    from tasks.evaluate import RESULTS_FILE, kind_of

    found = []
    for r in json.loads(evaluation.file(RESULTS_FILE).read_text()):
        kind = kind_of(r)
        metric = kind.main_metric
        hub, name = (kind.corpus, r["name"]) if kind.corpus else HUB_DATASETS.get(r["name"], (r["name"], r["name"]))
        how = ", ".join(filter(None, [kind.how(r), f"n={r['metrics'][metric]['n']}"]))
        found.append(EvalResult(
            task_type=kind.task_type, dataset_type=hub, dataset_name=name,
            dataset_split=r.get("split"), metric_type=metric, metric_name=f"{metric} ({how})", metric_value=r["metrics"][metric]["value"],
        ))
    return found


def parameter_count(folder: Path) -> int:
    """The parameters in a folder's safetensors files (LoRA merged; tied weights are stored once)."""
    from safetensors import safe_open

    count = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "np") as weights:
            count += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return count


def model_card(config: ReleaseConfig, model, evaluation, root: Node, gguf: list[str] | str, out_dir: Path):
    """The Hugging Face model card (huggingface_hub.ModelCard): YAML metadata with model-index
    results, then the text a person reads."""
    from huggingface_hub import ModelCard, ModelCardData

    from tasks.evaluate import evaluation_rows, rows_markdown

    data = training_data(root)
    metadata = ModelCardData(
        model_name=config.name, license=config.license, language="en", library_name="transformers", pipeline_tag="text-generation",
        tags=["medical", "biomedical", "pubmed", "medlm", *(["gguf"] if isinstance(gguf, list) and gguf else [])],
        eval_results=eval_results(evaluation), ignore_metadata_errors=True,
    )
    files = "\n".join(f"- `{name}`: llama.cpp (`llama-cli -m {name}`) and Ollama (`FROM ./{name}` in a Modelfile)" for name in gguf) if isinstance(gguf, list) else f"- GGUF: {gguf}"
    pubmed = "\n".join(f"  - `{n.label or n.ref}`" for n in data.get("download", [])) or "  - none (a model not pretrained by medlm)"
    corpora = ", ".join(f"`{n.ref}` ({n.summary.get('documents', '?'):,} documents)" for n in data.get("corpus", [])) or "none"
    qa = "\n".join(f"  - `{n.label or n.ref}` (`{n.ref}`)" for n in data.get("qa", [])) or "  - none"
    steps = "\n".join(
        f"- `{n.ref}`: {n.label or 'pretraining'}; {n.summary.get('steps', '?')} steps, {n.summary.get('tokens_seen', 0):,} tokens, "
        f"final loss {n.summary.get('final_loss', float('nan')):.4g}, validation loss {n.summary.get('val_loss', float('nan')):.4g}"
        for kind in ("pretrain", "finetune", "dpo") for n in data.get(kind, [])
    )
    text = f"""
# {config.name}

A causal language model for biomedical text, pretrained from scratch on PubMed abstracts{TUNED.get(model.kind, '')} by the medlm pipeline: {parameter_count(out_dir):,} parameters (`{model.ref}`).

> **Not medical advice.** {DISCLAIMER}

## Files

- `model.safetensors`, `config.json`, tokenizer files: `AutoModelForCausalLM.from_pretrained(".")` and `AutoTokenizer.from_pretrained(".")`{'; `tokenizer.apply_chat_template(...)` renders the prompt the model was fine-tuned on' if model.kind == 'finetune' else ''}
{files}
- `lineage.json`: every artifact this model came from, with its parameters and counts

## Evaluation

`{evaluation.ref}`. Each score has its 95% confidence interval, the number of items and a baseline
on the same items (for multiple choice the best constant answer, for PubMedQA the majority
class); "in pretraining corpus" counts the items whose text the pretraining corpus held, and
"clean value" is the score without them.

{rows_markdown(evaluation_rows(evaluation))}
## Training data

- Pretraining corpus: {corpora}, built from these PubMed files (NCBI baseline and update files, md5-verified):
{pubmed}
- Fine-tuning data:
{qa}

## Training

{steps or '- see lineage.json'}

## Intended use

Research on language models for biomedical text: studying what pretraining on PubMed and
fine-tuning on medical QA teach a model, and as a baseline to compare with. Not for clinical
decisions, diagnosis, treatment or any advice to patients.

## Limitations

- It generates fluent text that can be false; nothing it says has been checked by a clinician.
- It knows only the abstracts of its corpus snapshot, in English, up to the files listed above.
- The scores above are on the items listed, with the intervals shown; a small evaluation set
  gives wide intervals, and items its corpus held may be remembered rather than answered.
"""
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n{text}")


def push_release(folder: Path, repo: str, api=None, private: bool = False) -> str:
    """Upload the release folder to the Hugging Face Hub model repository ``repo`` (created if
    missing); ``api`` is a huggingface_hub.HfApi (its token: HF_TOKEN or ``hf auth login``).
    Returns the commit's URL."""
    if api is None:
        from huggingface_hub import HfApi, get_token

        if get_token() is None:
            raise ValueError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
        api = HfApi()
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(folder), ignore_patterns=["manifest.json"],
                               commit_message=f"medlm release {folder.name}")
    return str(getattr(commit, "commit_url", commit))


RELEASE = Stage(
    name="release",
    version="1",
    config=ReleaseConfig,
    inputs={"model": Input(MODEL_KINDS), "evaluation": Input("evaluate")},
    build=build_release,
    lineage=True,  # lineage.json and the card's training data
    label=lambda inputs, config: f"{config.name}: {inputs['model'].ref}",
)
