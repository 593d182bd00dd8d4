"""From a checkpoint to files people run: GGUF (read back with llama.cpp's gguf package, and run by
llama.cpp itself through llama-cpp-python, whose wheel `make test` builds once), the Ollama
Modelfile (its TEMPLATE rendered by Go's text/template), and the release folder with its card."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

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
        path = export_gguf(tiny_checkpoint.path, tmp_path / f"model.{type}.gguf", type, name="tiny-medlm", license="apache-2.0")
        reader = gguf.GGUFReader(path)
        sizes[type] = sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) > 1)  # the tiny model's file is mostly its vocabulary
        field = {name: f.contents() for name, f in reader.fields.items()}
        assert field["general.architecture"] == "llama" and field["general.file_type"] == (7 if type == "q8_0" else 1)
        assert (field["general.name"], field["general.license"]) == ("tiny-medlm", "apache-2.0")
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


def test_gguf_name_defaults_to_the_folder_s_and_no_license_is_claimed_unless_given(tiny_checkpoint, tmp_path):
    import gguf

    fields = gguf.GGUFReader(export_gguf(tiny_checkpoint.path, tmp_path / "m.gguf", "f16")).fields
    assert fields["general.name"].contents() == tiny_checkpoint.path.name and "general.license" not in fields


def test_gguf_export_refuses_what_it_cannot_write(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="one of"):
        export_gguf(tiny_checkpoint.path, tmp_path / "m.gguf", "q4_k")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        export_gguf(tiny_checkpoint.path / "..", tmp_path / "m.gguf")


# llama.cpp's log-probabilities against ours on the same tokens, at every position of a text: f16
# rounds each weight to 11 significant bits, q8_0 to 8 bits per block of 32. Measured on conftest's
# tiny checkpoint, 63 positions: at most 2.1e-4 (f16) and 5.4e-3 (q8_0) apart, the top token ours at
# all 63 in both; a Q/K permutation left out puts them 3 apart (model/export_gguf.py).
LOGPROB_TOLERANCE = {"f16": 1e-3, "q8_0": 0.02}


def llama_cpp():
    """llama-cpp-python, which `make test` installs (building its wheel once: `make llama-cpp-wheel`)."""
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python is not installed: `make llama-cpp-wheel` builds its wheel once (cached outside the clone) and installs it; `make test` does it itself")
    return llama_cpp


@pytest.fixture
def plain_cpu_llama_cpp(monkeypatch):
    """llama_cpp with its model loader on the plain CPU path: llama.cpp's extra CPU buffer types
    (AMX, repacking) segfault on q8_0 on this machine's CPU (measured: every q8_0 file; f16 runs),
    and the plain path is the one any laptop has."""
    module = llama_cpp()
    defaults = module.llama_cpp.llama_model_default_params

    def plain_cpu():
        params = defaults()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(module.llama_cpp, "llama_model_default_params", plain_cpu)
    return module


def test_llama_cpp_runs_the_gguf_with_our_top_tokens_and_log_probabilities(tiny_checkpoint, tmp_path, plain_cpu_llama_cpp):
    """At every position: llama.cpp's log-probabilities within LOGPROB_TOLERANCE of ours, and its
    top token ours wherever ours leads the runner-up by more than twice the tolerance (closer than
    that, rounding may swap a near tie: such positions are counted, and few)."""
    from storage.formats import load_tokenizer

    model = load_model(tiny_checkpoint.path).eval()
    text = ("Aspirin reduces the risk of myocardial infarction in patients with coronary artery disease. "
            "Bleeding is the main risk of long-term antiplatelet therapy, and it rises with age.")
    ids = load_tokenizer(tiny_checkpoint.file("tokenizer.json")).encode(text).ids
    with torch.no_grad():
        ours = torch.log_softmax(model(torch.tensor([ids]))[0][0].double(), -1)
    top2 = ours.topk(2, -1).values
    for type, tolerance in LOGPROB_TOLERANCE.items():
        llm = plain_cpu_llama_cpp.Llama(model_path=str(export_gguf(tiny_checkpoint.path, tmp_path / f"m.{type}.gguf", type)), n_ctx=256,
                                        n_threads=1, logits_all=True, verbose=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids  # the same tokenizer
        llm.eval(ids)
        theirs = torch.log_softmax(torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float64), -1)
        difference = (theirs - ours).abs().max().item()
        assert difference <= tolerance, f"{type}: log-probabilities differ by up to {difference:.3g}"
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
        assert torch.equal(theirs.argmax(-1)[clear], ours.argmax(-1)[clear]) and clear.float().mean() >= 0.9, type


# -- Ollama's template -------------------------------------------------------------------------------

GO_RENDER = Path(__file__).with_name("ollama_template.go")
TWO_TURNS = [{"role": "user", "content": "Does aspirin lower the risk of stroke?"}, {"role": "assistant", "content": "yes"},
             {"role": "user", "content": "And of a heart attack?"}]


def go_render(template: str, messages: list[dict], tmp_path: Path) -> str:
    """``template`` executed by Go's text/template on Ollama's data (.Messages), as Ollama renders a TEMPLATE."""
    if shutil.which("go") is None:
        pytest.skip("Go renders Ollama's template here: Debian's golang-go (`apt-get install golang-go`; .ci/run installs it)")
    (tmp_path / "TEMPLATE").write_text(template)
    done = subprocess.run(["go", "run", str(GO_RENDER), str(tmp_path / "TEMPLATE")], input=json.dumps(messages), capture_output=True, text=True,
                          env={**os.environ, "GOTOOLCHAIN": "local"}, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("template", ["eval", "instruction"])
def test_the_ollama_template_renders_a_conversation_as_the_chat_template_does(template, tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from model.sft import chat_template, ollama_template, template_name, write_chat_template

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tiny_checkpoint.file(name), folder / name)
    write_chat_template(folder / "tokenizer_config.json", template)
    assert template_name(chat_template(template)) == template and template_name("{{ messages }}") is None
    ours = AutoTokenizer.from_pretrained(folder).apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    assert go_render(ollama_template(template, "[EOS]"), TWO_TURNS, tmp_path) == ours
    assert ours.count("[EOS]") == 1 and "yes[EOS]" in ours  # the first answer closed, the second opened


# -- the release stage ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(tiny_checkpoint, session_store):
    """The tiny checkpoint LoRA-tuned on PubMedQA, then preference-tuned on PubMedQA with MedQA held
    out (its test questions kept out of the pairs), and evaluated on both (a few items)."""
    from eval_records import DATA

    from model.dpo import DPOConfig
    from model.finetune import FinetuneConfig
    from model.train import TrainConfig
    from tasks.dpo import DPO, DPORun
    from tasks.evaluate import EVALUATE, EvaluationConfig
    from tasks.finetune import FINETUNE, FinetuneRun
    from tasks.qa import QA, QAConfig

    pubmedqa = QA.run(session_store, {}, QAConfig(source=str(DATA / "pubmedqa")))
    medqa = QA.run(session_store, {}, QAConfig(source=str(DATA / "medqa")))
    steps = TrainConfig.of(max_steps=2, batch_size=4, lr=1e-3, warmup_steps=1, eval_every=100, checkpoint_every=100)
    tuned = FINETUNE.run(session_store, {"base": tiny_checkpoint, "data": [pubmedqa]}, FinetuneRun(FinetuneConfig(max_length=256), steps.optim, steps.run))
    preferred = DPO.run(session_store, {"base": tuned, "data": [pubmedqa], "held_out": [medqa]},
                        DPORun(FinetuneConfig(max_length=256), DPOConfig(), steps.optim, steps.run))
    evaluation = EVALUATE.run(session_store, {"model": preferred, "qa": [pubmedqa, medqa]},
                              EvaluationConfig(benchmarks=("pubmedqa", "medqa_4options"), shots=(0,), max_items=8, generation_items=0))
    return preferred, evaluation, pubmedqa, medqa


def section(card_text: str, title: str) -> str:
    """The card's text under the line ``title``, to the next heading or bold block title."""
    start = card_text.index(title + "\n") + len(title) + 1
    end = re.search(r"^(#+ |\*\*)", card_text[start:], re.M)
    return card_text[start : start + end.start()] if end else card_text[start:]


def test_the_release_folder_loads_in_transformers_and_llama_cpp_s_format_and_its_card_holds_the_evaluation_and_the_pubmed_files(evaluated, session_store):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.chat import DISCLAIMER
    from storage.lineage import ancestors_first, lineage
    from tasks.release import HUB_DATASETS, RELEASE, ReleaseConfig

    tuned, evaluation, _, _ = evaluated
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
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in card.data.eval_results] == [
        (HUB_DATASETS[r["name"]][0], "acc", r["metrics"]["acc"]["value"]) for r in results
    ]
    assert card.data.license == "apache-2.0" and "medical" in card.data.tags
    assert DISCLAIMER in card.text and evaluation.ref in card.text
    for r in results:  # every score with its interval, n and baseline
        assert f"| {r['metrics']['acc']['n']} |" in card.text and r["baseline"]["acc"]["name"] in card.text
    root = lineage(session_store, tuned.ref)
    downloads = [n for n in ancestors_first(root) if n.kind == "download"]
    assert downloads and all(n.label in section(card.text, "**Trained on**") for n in downloads)  # the PubMed files, with their md5s
    assert json.loads((folder / "lineage.json").read_text()) == root.as_dict()

    with pytest.raises(ValueError, match="release a model with its own evaluation"):  # the base, not the model evaluated
        RELEASE.run(session_store, {"model": session_store.require(tuned.parents[0]), "evaluation": evaluation}, ReleaseConfig())


def test_the_card_tells_data_trained_on_from_data_held_out_and_evaluated_on_by_lineage_role(evaluated, session_store):
    """DPO read MedQA only to keep its questions out of the pairs (role held_out): the card and
    the YAML's datasets do not count it as training data; PubMedQA's train split was trained on."""
    from huggingface_hub import ModelCard

    from storage.lineage import lineage
    from tasks.release import RELEASE, ReleaseConfig

    tuned, evaluation, pubmedqa, medqa = evaluated
    assert lineage(session_store, tuned.ref).roles == {"base": [tuned.parents[0]], "data": [pubmedqa.ref], "held_out": [medqa.ref]}
    release = RELEASE.run(session_store, {"model": tuned, "evaluation": evaluation}, ReleaseConfig(name="tiny-medlm"))
    card = ModelCard.load(release.path / "README.md")
    trained, held, tested = (section(card.text, title) for title in ("**Trained on**", "**Held out (never trained on)**", "**Evaluated on**"))
    assert pubmedqa.ref in trained and medqa.ref not in trained
    assert medqa.ref in held and "DPO's validation questions: " in held and "validation and test splits (by a hash of the PMID)" in held
    assert pubmedqa.ref in tested and medqa.ref in tested
    assert card.data.datasets == ["ncbi/pubmed", "qiaojin/PubMedQA"] and card.data.base_model is None  # pretrained here: no base on the Hub
    assert (release.summary["qa_trained_on"], release.summary["qa_held_out"], release.summary["qa_evaluated_on"]) == (1, 1, 2)
    terms = section(card.text, "## Licences and terms")
    assert "https://www.nlm.nih.gov/databases/download.html" in terms and "MIT (https://github.com/pubmedqa/pubmedqa, LICENSE)" in terms
    assert "MIT (https://github.com/jind11/MedQA, LICENSE)" in terms  # evaluated on, held out: its terms apply too
    for title in ("## Intended use", "## Out-of-scope use", "## Bias, risks and limitations", "## How to cite"):
        assert section(card.text, title).strip(), title
    risks = section(card.text, "## Bias, risks and limitations")
    assert "Publication bias" in risks and "no clinical validation" in section(card.text, "## Out-of-scope use")
    assert "- Mostly English: the corpus kept every language" in risks  # conftest's corpus: languages=()
    assert "- MedQA (USMLE)'s questions come from US medical licensing exams" in risks
    assert "Jin, Dhingra, Liu, Cohen and Lu. PubMedQA" in section(card.text, "## How to cite")
    base = ModelCard.load(RELEASE.run(session_store, {"model": tuned, "evaluation": evaluation}, ReleaseConfig(name="tiny-medlm", base_model="someone/base")).path / "README.md")
    assert base.data.base_model == "someone/base"


def test_the_card_s_language_limitation_is_the_corpus_s_language_filter():
    from storage.lineage import Node
    from tasks.release import DataUses, language_line

    def uses(languages) -> DataUses:
        return DataUses([], [Node("corpus/x", params={"languages": languages})], [], [], [], [], [])

    assert language_line(uses(["eng"])).startswith("English only: the corpus kept the articles whose language is English")
    assert language_line(uses(["eng", "fre"])).startswith("Languages: the corpus kept the articles in eng, fre")
    assert language_line(uses([])).startswith("Mostly English: the corpus kept every language")


def test_the_card_s_first_lines_say_how_every_score_stands_against_its_baseline(evaluated, session_store):
    """No overselling: the words come from the numbers, and a model at or below its baselines
    says so before anything else (after the disclaimer)."""
    from huggingface_hub import ModelCard

    from tasks.evaluate.statistics import format_value
    from tasks.release import RELEASE, ReleaseConfig

    tuned, evaluation, _, _ = evaluated
    release = RELEASE.run(session_store, {"model": tuned, "evaluation": evaluation}, ReleaseConfig(name="tiny-medlm"))
    text = ModelCard.load(release.path / "README.md").text
    results = json.loads(evaluation.file("results.json").read_text())
    below = [r for r in results if r["metrics"]["acc"]["value"] <= r["baseline"]["acc"]["value"]]
    assert release.summary["at_or_below_baseline"] == len(below)
    first = text.split("\n\n")[2]  # the title, the disclaimer, then this
    if len(below) == len(results):
        assert first.startswith(f"**This model scores at or below the baseline on every benchmark that has one ({len(results)} of {len(results)})**")
    else:
        assert first.startswith(f"**At or below the baseline on {len(below)} of {len(results)} scores**")
    for r in results:
        line = f"{format_value('acc', r['metrics']['acc']['value'])} against {format_value('acc', r['baseline']['acc']['value'])} ({r['baseline']['acc']['name']}): "
        assert line + ("at or below the baseline" if r in below else "above") in text
    assert "prefers the right answers" not in text


def test_standing_lines_say_at_or_below_and_within_the_interval_from_the_numbers():
    from tasks.release import Standing, standing_lines

    below = Standing("pubmedqa, cloze, 0-shot, acc, n=40", "30.0%", "55.0% (majority class 'yes')", at_or_below=True, inside_interval=False)
    near = Standing("medmcqa, letters, 0-shot, acc, n=58", "41.4%", "39.7% (always A)", at_or_below=False, inside_interval=True)
    clear = Standing("medqa_4options, letters, 0-shot, acc, n=45", "80.0%", "35.6% (always D)", at_or_below=False, inside_interval=False)
    assert standing_lines([below]).startswith("**This model scores at or below the baseline on every benchmark that has one (1 of 1)**")
    mixed = standing_lines([below, near, clear])
    assert mixed.startswith("**At or below the baseline on 1 of 3 scores**; above it on 2, of which 1 within the score's 95% confidence interval")
    assert "- medmcqa, letters, 0-shot, acc, n=58: 41.4% against 39.7% (always A): above, within the 95% CI" in mixed
    assert "- medqa_4options, letters, 0-shot, acc, n=45: 80.0% against 35.6% (always D): above, beyond the 95% CI" in mixed
    assert standing_lines([near, clear]).startswith("Above the baseline on all 2 scores, 1 of them within the score's 95% confidence interval")
    assert standing_lines([]) == "No score of the evaluation has a baseline to compare it with."


def test_the_release_folder_is_read_only_and_runs_in_ollama_s_format(evaluated, session_store, tmp_path):
    """Every file 0444 (the store publishes so); the GGUF files carry the model's name and licence;
    the Modelfile runs the smallest with the chat template in Go, the end token as stop, the context."""
    import stat

    import gguf
    from transformers import AutoTokenizer

    from tasks.release import RELEASE, ReleaseConfig

    tuned, evaluation, _, _ = evaluated
    folder = RELEASE.run(session_store, {"model": tuned, "evaluation": evaluation}, ReleaseConfig(name="tiny-medlm")).path
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) & 0o222 for p in files} == {0}, {p.name: oct(p.stat().st_mode) for p in files}
    for name in ("tiny-medlm-f16.gguf", "tiny-medlm-q8_0.gguf"):
        fields = gguf.GGUFReader(folder / name).fields
        assert (fields["general.name"].contents(), fields["general.license"].contents()) == ("tiny-medlm", "apache-2.0")
    modelfile = (folder / "Modelfile").read_text()
    assert re.search(r"^FROM \./tiny-medlm-q8_0\.gguf$", modelfile, re.M) and '\nPARAMETER stop "[EOS]"\n' in modelfile
    assert re.search(r"^PARAMETER num_ctx (\d+)$", modelfile, re.M).group(1) == str(load_model(tuned.path).config.context_length)
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.M | re.S).group(1)
    ours = AutoTokenizer.from_pretrained(folder).apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    assert go_render(template, TWO_TURNS, tmp_path) == ours


def test_release_push_uploads_the_folder_through_the_hub_api_and_without_a_token_says_how(evaluated, session_store, tmp_path, monkeypatch):
    import sys

    from tasks.release import RELEASE, ReleaseConfig, push_release

    tuned, evaluation, _, _ = evaluated
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
