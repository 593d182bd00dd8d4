"""Release: an evaluated model -> a folder any user opens with the tools they know.

- ``model.safetensors`` + ``config.json`` + the tokenizer files (with the chat template a
  fine-tuning trained with): transformers' AutoModelForCausalLM / AutoTokenizer load it;
- ``NAME-f16.gguf`` and ``NAME-q8_0.gguf`` for llama.cpp and Ollama (model/export_gguf.py), named
  and licensed in their metadata, and ``Modelfile``, Ollama's recipe for them: the chat template in
  Go's text/template, the end token as its stop, the context length;
- ``README.md``, a Hugging Face model card, every sentence about the model's quality written from
  the evaluation's numbers: first how each score stands against its baseline; model-index results
  (with n, 95% CI, baseline and the items the pretraining corpus held); the data trained on, held
  out and evaluated on, told apart by the role each stage read it in (DPO's ``held_out`` QA data is
  never trained on); each dataset's licence or terms; intended and out-of-scope use; bias, risks
  and limitations; the disclaimer; how to cite;
- ``lineage.json``: every artifact the model came from, with its parameters and counts.

The store publishes the folder read-only (files 0444). ``medlm release push REPO`` uploads it to
the Hugging Face Hub (``push_release``).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from model.chat import DISCLAIMER
from model.checkpoint import is_hf_folder, load_checkpoint_config
from storage import Input, Stage
from storage.config import config_dataclass
from storage.formats import MODEL_KINDS
from storage.lineage import Node, ancestors_first
from tasks.qa.records import Provenance
from tasks.qa.registry import BENCHMARKS, DATASETS

CARD_FILE = "README.md"
LINEAGE_FILE = "lineage.json"
MODELFILE = "Modelfile"
HELD_OUT = "held_out"  # the role of QA data a training stage kept out of what it trained on (tasks/dpo.py)


@config_dataclass
class ReleaseConfig:
    """What the release folder is called and holds."""

    name: str = Field("medlm", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="The model's name: the card's title, the GGUF files' names and their general.name.")
    license: str = Field("apache-2.0", description="The license the card and the GGUF files declare (a Hugging Face license id); the data's own terms, listed in the card, apply too.")
    gguf: tuple[Literal["f16", "q8_0"], ...] = Field(("f16", "q8_0"), description="GGUF files to write (llama-arch models of ours; none for a Hugging Face folder).")
    base_model: str | None = Field(None, description="The Hub id of the Hugging Face model this one was fine-tuned from, for the card's base_model (an hf_model artifact knows its files, not where they came from); none for a model pretrained by medlm.")


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
    return [export_gguf(model, out_dir / f"{config.name}-{type}.gguf", type, config.name, config.license).name for type in config.gguf]


def modelfile(model: Path, gguf: list[str], name: str) -> str:
    """An Ollama Modelfile for the smallest GGUF file: the chat template the model was fine-tuned
    with, in Go's text/template (a pretrained model's: the prompt as it is), its end token as the
    stop, its context length as num_ctx."""
    from model.sft import ollama_template, template_name

    tokenizer = json.loads((model / "tokenizer_config.json").read_text())
    eos, saved = tokenizer["eos_token"], tokenizer.get("chat_template")
    template = template_name(saved)
    if saved and template is None:
        raise ValueError(f"{model}'s chat template is not one of medlm's (model/sft.py TEMPLATES): no Modelfile TEMPLATE can be written for it")
    smallest = next((name for name in gguf if name.endswith("-q8_0.gguf")), gguf[0])
    return "\n".join([
        f"# Ollama: ollama create {name} -f {MODELFILE}, then ollama run {name}",
        f"FROM ./{smallest}",
        f'TEMPLATE """{ollama_template(template, eos) if template else "{{ .Prompt }}"}"""',
        f'PARAMETER stop "{eos}"',
        f"PARAMETER num_ctx {load_checkpoint_config(model)['model']['context_length']}",
    ]) + "\n"


def build_release(inputs: dict, out_dir: Path, config: ReleaseConfig, lineage: dict[str, Node]) -> dict:
    model, evaluation = inputs["model"], inputs["evaluation"]
    if model.ref not in evaluation.parents:
        raise ValueError(f"{evaluation.ref} evaluated {next((p for p in evaluation.parents if p.split('/')[0] in MODEL_KINDS), '?')}, not {model.ref}; release a model with its own evaluation")
    write_model_files(model.path, out_dir)
    gguf = write_gguf(model.path, out_dir, config)
    if isinstance(gguf, list) and gguf:
        (out_dir / MODELFILE).write_text(modelfile(model.path, gguf, config.name))
    (out_dir / LINEAGE_FILE).write_text(json.dumps(lineage["model"].as_dict(), indent=2) + "\n")
    data = data_uses(lineage["model"], lineage["evaluation"])
    card = model_card(config, model, evaluation, data, gguf, out_dir)
    card.save(out_dir / CARD_FILE)
    return {
        "model": model.ref, "evaluation": evaluation.ref, "gguf": gguf if isinstance(gguf, list) else [],
        "pubmed_files": len(data.pubmed_files), "qa_trained_on": len(data.trained_on), "qa_held_out": len(data.held_out),
        "qa_evaluated_on": len(data.evaluated_on), "eval_results": len(card.data.eval_results or []),
        "at_or_below_baseline": sum(s.at_or_below for s in standings(evaluation)),
    }


# -- the data, by the role each stage read it in ------------------------------------------------------


@dataclass
class DataUses:
    pubmed_files: list[Node]  # the NCBI files the pretraining corpus was built from
    corpora: list[Node]
    shards: list[Node]  # pretraining read their train split; val and test were held out (by PMID)
    trained_on: list[Node]  # QA artifacts a fine-tuning or DPO stage trained on (their train split)
    held_out: list[Node]  # QA artifacts a stage read only to keep their questions out of training, and none trained on
    evaluated_on: list[Node]  # QA artifacts the evaluation scored (their validation and test splits)
    trainings: list[Node]  # the training stages, base first


def data_uses(model: Node, evaluation: Node) -> DataUses:
    """What the model was trained on, what was held out of its training and what it was evaluated
    on, from the lineage: a QA parent of a training stage is trained on unless the stage read it as
    ``held_out`` (and no other stage trained on it); the evaluation's QA parents with records
    outside the train split, which is all evaluation scores, are evaluated on."""
    nodes = list(ancestors_first(model))
    trained: dict[str, Node] = {}
    held: dict[str, Node] = {}
    for node in nodes:
        if node.kind in MODEL_KINDS:
            for parent in node.parents:
                if parent.kind == "qa":
                    (held if node.role_of(parent) == HELD_OUT else trained)[parent.ref] = parent
    return DataUses(
        pubmed_files=[n for n in nodes if n.kind == "download"],
        corpora=[n for n in nodes if n.kind == "corpus"],
        shards=[n for n in nodes if n.kind == "shards"],
        trained_on=list(trained.values()),
        held_out=[n for ref, n in held.items() if ref not in trained],
        evaluated_on=[p for p in evaluation.parents if p.kind == "qa" and records(p, "train", outside=True)],
        trainings=[n for n in nodes if n.kind in MODEL_KINDS],
    )


PUBMED = Provenance(
    "PubMed/MEDLINE (U.S. National Library of Medicine)", "ncbi/pubmed",
    "NLM's terms for its downloaded data (https://www.nlm.nih.gov/databases/download.html): the citations are U.S. Government works, "
    "free of U.S. copyright, but abstracts may be under their publishers' copyright, and users answer for that; a product built on the "
    "data should say how it was derived and from which release, and must not suggest that NLM endorses it",
    "U.S. National Library of Medicine. MEDLINE/PubMed baseline and update files, https://ftp.ncbi.nlm.nih.gov/pubmed/",
)
# By the qa artifact's format: each dataset's module declares its provenance (tasks/qa/registry.py).
QA_SOURCES = {d.name: d.provenance for d in DATASETS if d.provenance}
UNKNOWN_TERMS = "not known to medlm (instruction data in any layout): the terms of whoever published the files apply"


def qa_source(node: Node) -> Provenance:
    fmt = str(node.summary.get("format", ""))
    return QA_SOURCES.get(fmt) or Provenance(node.label or node.ref, None, UNKNOWN_TERMS, "")


def records(node: Node, split: str, outside: bool = False) -> str:
    """A qa artifact's records in ``split`` (or in every other split), as its summary counts them: "test 40"."""
    counts = node.summary.get("records") or {}
    return ", ".join(f"{name} {n:,}" for name, n in counts.items() if n and (name != split if outside else name == split))


def described(node: Node) -> str:
    known = QA_SOURCES.get(str(node.summary.get("format", "")))
    return f"`{node.label or node.ref}`" + (f" ({known.name})" if known else "") + f", `{node.ref}`"


# -- how the scores stand --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Standing:
    """One headline score against its baseline on the same items."""

    what: str
    value: str
    baseline: str
    at_or_below: bool
    inside_interval: bool  # above the baseline, but the baseline lies within the score's 95% CI


def standings(evaluation) -> list[Standing]:
    """Every headline score with a baseline (higher is better for all of them), compared with it."""
    from tasks.evaluate import RESULTS_FILE, kind_of
    from tasks.evaluate.statistics import format_value

    found = []
    for r in json.loads(evaluation.file(RESULTS_FILE).read_text()):
        kind = kind_of(r)
        metric = kind.main_metric
        base = (r["baseline"] or {}).get(metric)
        if not base:
            continue
        m = r["metrics"][metric]
        low = m["ci95"][0]
        found.append(Standing(
            what=", ".join(filter(None, [r["name"], kind.how(r), f"{metric}, n={m['n']}"])),
            value=format_value(metric, m["value"]), baseline=f"{format_value(metric, base['value'])} ({base['name']})",
            at_or_below=m["value"] <= base["value"], inside_interval=m["value"] > base["value"] and not low > base["value"],
        ))
    return found


def standing_lines(found: list[Standing]) -> str:
    """The card's first lines: how many scores are at or below their baseline, and each score."""
    if not found:
        return "No score of the evaluation has a baseline to compare it with."
    below = sum(s.at_or_below for s in found)
    unsure = sum(s.inside_interval for s in found)
    if below == len(found):
        head = (f"**This model scores at or below the baseline on every benchmark that has one ({below} of {len(found)})**: "
                "it does not answer these questions better than a constant answer (the best single answer on the same items) does.")
    elif below:
        head = f"**At or below the baseline on {below} of {len(found)} scores**; above it on {len(found) - below}, of which {unsure} within the score's 95% confidence interval (not shown to be better)."
    else:
        head = f"Above the baseline on all {len(found)} scores, {unsure} of them within the score's 95% confidence interval (not shown to be better)."
    rows = [f"- {s.what}: {s.value} against {s.baseline}: "
            + ("at or below the baseline" if s.at_or_below else "above, within the 95% CI" if s.inside_interval else "above, beyond the 95% CI")
            for s in found]
    return "\n".join([head, "", *rows])


# -- the card ------------------------------------------------------------------------------------------------


# The Hub datasets our benchmarks are (lm-evaluation-harness's tasks read these), for the model-index:
# result name -> (Hub id, name), each dataset's benchmarks and its long answers' set.
HUB_DATASETS = {b.name: (b.hub, b.hub_title) for b in BENCHMARKS.values()} | {
    d.prompting.long_answers: (d.provenance.hub, d.prompting.long_answers) for d in DATASETS if d.prompting.long_answers and d.provenance
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


STEPS = {"pretrain": "pretraining", "finetune": "fine-tuning", "dpo": "preference tuning (DPO)"}
VAL_ON = {"pretrain": "the corpus's validation split, held out by PMID"}  # the others' summaries say


def training_lines(data: DataUses) -> str:
    lines = []
    for n in data.trainings:
        s = n.summary
        if n.kind == "hf_model":
            lines.append(f"- `{n.ref}`: the base, a Hugging Face model taken in from the folder `{n.label}`")
            continue
        line = (f"- `{n.ref}`: {STEPS.get(n.kind, n.kind)}{f' ({n.label})' if n.label else ''}; {s.get('steps', '?')} steps, "
                f"{s.get('tokens_seen', 0):,} tokens, final training loss {s.get('final_loss', float('nan')):.4g}, "
                f"validation loss {s.get('val_loss', float('nan')):.4g} on {s.get('val_on', VAL_ON.get(n.kind, 'an unrecorded set'))}")
        if "val_reward_accuracy" in s:
            line += f" (reward accuracy {100 * s['val_reward_accuracy']:.1f}% on {s.get('val_pairs', '?')} pairs)"
        lines.append(line)
    return "\n".join(lines) or "- see lineage.json"


def data_lines(data: DataUses) -> tuple[str, str, str]:
    """(trained on, held out, evaluated on) as the card lists them."""
    pubmed = "\n".join(f"  - `{n.label or n.ref}`" for n in data.pubmed_files)
    corpora = ", ".join(f"`{n.ref}` ({n.summary.get('documents', 0):,} documents)" for n in data.corpora)
    trained = [f"- Pretraining: the train split of the corpus {corpora}, built from these PubMed files (NCBI baseline and update files, md5-verified):\n{pubmed}"] if data.pubmed_files else []
    trained += [f"- {described(n)}: its train split ({records(n, 'train')})" for n in data.trained_on]
    held = [f"- Pretraining: the corpus's validation and test splits (by a hash of the PMID): {n.summary.get('val_documents', 0):,} and "
            f"{n.summary.get('test_documents', 0):,} documents of `{n.ref}`" for n in data.shards]
    held += [f"- {described(n)} ({records(n, 'train', outside=True)}): read by DPO only to keep its questions out of the preference pairs"
             for n in data.held_out]
    held += [f"- DPO's validation questions: {n.summary['validation_questions']} train questions held out by a hash of the record id (`{n.ref}`)"
             for n in data.trainings if n.summary.get("validation_questions")]
    evaluated = [f"- {described(n)}: {records(n, 'train', outside=True)}" for n in data.evaluated_on]
    return "\n".join(trained) or "- none recorded", "\n".join(held) or "- none", "\n".join(evaluated) or "- none"


def language_line(data: DataUses) -> str:
    """The card's language limitation, from the corpus's language filter."""
    languages = sorted({lang for n in data.corpora for lang in n.params.get("languages") or []})
    if languages == ["eng"]:
        return ("English only: the corpus kept the articles whose language is English (its `languages` filter), so research published "
                "in other languages is missing and other languages are not understood")
    if languages:
        return f"Languages: the corpus kept the articles in {', '.join(languages)} (its `languages` filter); research in other languages is missing"
    return "Mostly English: the corpus kept every language, but PubMed's abstracts are mostly in English; research in other languages is under-represented"


def terms_lines(data: DataUses, config: ReleaseConfig) -> str:
    sources = ([PUBMED] if data.pubmed_files else []) + [qa_source(n) for n in [*data.trained_on, *data.held_out, *data.evaluated_on]]
    lines = [f"- The model: `{config.license}`, as this card declares it; the data's terms below apply to what it learned from them."]
    lines += [f"- {s.name}: {s.terms}" for s in dict.fromkeys(sources)]
    return "\n".join(lines)


def model_card(config: ReleaseConfig, model, evaluation, data: DataUses, gguf: list[str] | str, out_dir: Path):
    """The Hugging Face model card (huggingface_hub.ModelCard): YAML metadata with model-index
    results, then the text a person reads."""
    from huggingface_hub import ModelCard, ModelCardData

    from tasks.evaluate import evaluation_rows, rows_markdown

    hub_datasets = ([PUBMED.hub] if data.pubmed_files else []) + [s.hub for s in map(qa_source, data.trained_on) if s.hub]
    metadata = ModelCardData(
        model_name=config.name, license=config.license, language="en", library_name="transformers", pipeline_tag="text-generation",
        tags=["medical", "biomedical", "pubmed", "medlm", *(["gguf"] if isinstance(gguf, list) and gguf else [])],
        datasets=list(dict.fromkeys(hub_datasets)) or None, base_model=config.base_model,
        eval_results=eval_results(evaluation), ignore_metadata_errors=True,
    )
    files = "\n".join(f"- `{name}`: llama.cpp (`llama-cli -m {name}`)" for name in gguf) if isinstance(gguf, list) else f"- GGUF: {gguf}"
    if isinstance(gguf, list) and gguf:
        files += f"\n- `{MODELFILE}`: Ollama (`ollama create {config.name} -f {MODELFILE}`, then `ollama run {config.name}`): the chat template, the stop token and the context length"
    trained, held, evaluated = data_lines(data)
    chat = model.kind in ("finetune", "dpo")
    bases = [n for n in data.trainings if n.kind == "hf_model"]
    origin = (f"fine-tuned from the Hugging Face model `{bases[0].label}`" + (f" (`{config.base_model}`)" if config.base_model else "")
              if bases else "pretrained from scratch on PubMed abstracts")
    steps = " then ".join(dict.fromkeys(STEPS[n.kind] for n in data.trainings if n.kind in STEPS))
    scopes = "".join(f"- {s.name}'s questions come from {s.scope}.\n" for s in dict.fromkeys(map(qa_source, data.trained_on + data.evaluated_on)) if s.scope)
    cite_data = "\n".join(f"- {s.cite}" for s in dict.fromkeys([PUBMED] * bool(data.pubmed_files) + list(map(qa_source, data.trained_on + data.evaluated_on))) if s.cite)
    text = f"""
# {config.name}

> **Not medical advice.** {DISCLAIMER}

{standing_lines(standings(evaluation))}

A causal language model of {parameter_count(out_dir):,} parameters, {origin} by the medlm pipeline ({steps}; `{model.ref}`).

## Files

- `model.safetensors`, `config.json`, tokenizer files: `AutoModelForCausalLM.from_pretrained(".")` and `AutoTokenizer.from_pretrained(".")`{'; `tokenizer.apply_chat_template(...)` renders the prompt the model was fine-tuned on' if chat else ''}
{files}
- `lineage.json`: every artifact this model came from, with its parameters and counts

## Evaluation

`{evaluation.ref}`. Each score has its 95% confidence interval, the number of items and a baseline
on the same items (for multiple choice the best constant answer, for PubMedQA the majority
class); "in pretraining corpus" counts the items whose text the pretraining corpus held, and
"clean value" is the score without them.

{rows_markdown(evaluation_rows(evaluation))}
## Data

Told apart by the role each stage of the lineage read the data in (`lineage.json`).

**Trained on**

{trained}

**Held out (never trained on)**

{held}

**Evaluated on**

{evaluated}

## Licences and terms

{terms_lines(data, config)}

## Training

{training_lines(data)}

## Intended use

Research on language models for biomedical text: studying what pretraining on PubMed and
fine-tuning on medical questions teach a model, reproducing this pipeline's numbers, and as a
baseline to compare other models with.

## Out-of-scope use

Any clinical or health decision: diagnosis, treatment, triage, dosing, or advice to patients or
clinicians; answering medical questions for people who may act on the answer; any use where its
text would be taken as medical fact. It has had no clinical validation of any kind.

## Bias, risks and limitations

- It generates fluent text that can be false; nothing it says has been checked by a clinician.
- {language_line(data)}.
- Publication bias: abstracts over-represent positive findings, well-funded fields and the
  populations studied most; the model inherits what the literature says and how often it says it,
  not what is true of a patient.
- Its knowledge stops at its corpus snapshot (the files listed above); later findings, retractions
  and guideline changes are unknown to it.
{scopes}- The scores above are on the items listed, with the intervals shown; a small evaluation set
  gives wide intervals, and items its corpus held may be remembered rather than answered.

## How to cite

```bibtex
@misc{{{config.name.replace('-', '_').replace('.', '_')},
  title = {{{config.name}: a causal language model for biomedical text, built by the medlm pipeline}},
  note = {{Model {model.ref}, evaluation {evaluation.ref}}}
}}
```

And the data it was trained and evaluated on:

{cite_data or '- see lineage.json'}
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
    version="2",  # 2: the card from the data's roles and the scores' standing, the GGUF's name and licence, the Modelfile
    config=ReleaseConfig,
    inputs={"model": Input(MODEL_KINDS), "evaluation": Input("evaluate")},
    build=build_release,
    lineage=True,  # lineage.json and the card's data
    label=lambda inputs, config: f"{config.name}: {inputs['model'].ref}",
)
