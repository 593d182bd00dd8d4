"""Log-likelihood scoring against lm-evaluation-harness 0.4.13, the peer implementation.

A tiny seeded Transformer with the real BPE fitted on the sample corpus (conftest), saved as a
checkpoint and exported to a Hugging Face folder by model/export_hf.py; lm-eval's HFLM reads that folder and our local task YAMLs
(tests/data/lm_eval_tasks/), which call the harness's own prompt functions. Its context length
(256) is shorter than the PubMedQA and MedQA prompts, so left truncation is compared too.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

# Nothing from the hub, and the datasets cache out of the home folder: set before HF imports.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="medlm-test-datasets-"))

import lm_eval  # the `eval` extra (lm-eval[hf]); these tests are its peer check, so they need it
import pytest
import torch
from eval_records import LM_EVAL_TASKS, LOCAL_TASKS, REPO, load_records

from model.export_hf import export_hf
from model.model import ModelConfig, Transformer
from model.prompts import doc_to_text, fewshot_context
from model.scoring import HFCausalLM, TransformerLM, rolling_windows
from model.checkpoint import save_checkpoint
from storage.formats import load_tokenizer
from tasks.evaluate import benchmark_records, multiple_choice

ITEMS_PER_TASK = 8

@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory) -> Path:
    """A seeded random model saved as pretraining saves it."""
    vocab = load_tokenizer(tokenizer.file("tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=64, context_length=256)
    model = Transformer(cfg)
    config = {"model": cfg.to_dict(), "tokens": {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}}
    run = tmp_path_factory.mktemp("run")
    return save_checkpoint(run, 0, model, torch.optim.AdamW(model.parameters()), config, {"step": 0}, keep_last=1)


@pytest.fixture(scope="module")
def ours(checkpoint, tokenizer) -> TransformerLM:
    return TransformerLM.from_checkpoint(checkpoint, load_tokenizer(tokenizer.file("tokenizer.json")))


@pytest.fixture(scope="module")
def hf_dir(checkpoint, tokenizer, tmp_path_factory) -> Path:
    return export_hf(checkpoint, tmp_path_factory.mktemp("hf"), tokenizer.path)


@pytest.fixture(scope="module")
def harness(hf_dir):
    from lm_eval.models.huggingface import HFLM

    # prefix_token_id=3: condition empty contexts and documents on [EOS], as TransformerLM does.
    return HFLM(pretrained=str(hf_dir), device="cpu", batch_size=8, prefix_token_id=3)


def chosen_items(task: str) -> list[int]:
    """Indices of the items compared in a local task's data file: the first ITEMS_PER_TASK, and
    every item whose texts the harness takes as they are where a cleaner would not (outer
    whitespace, MedMCQA's "nan" options)."""
    benchmark = LOCAL_TASKS[task][0]
    docs = [json.loads(line) for line in (LM_EVAL_TASKS / "data" / f"{benchmark}.jsonl").read_text(encoding="utf-8").splitlines()]
    texts = lambda doc: [v for k, v in doc.items() if k not in ("id", "final_decision") and isinstance(v, str)]  # noqa: E731
    quirks = [i for i, doc in enumerate(docs) if any(t != t.strip() or t == "nan" for t in texts(doc))]
    return sorted(set(range(ITEMS_PER_TASK)) | set(quirks))


@pytest.fixture(scope="module")
def harness_samples(harness):
    """Per-item log-likelihoods from lm_eval.simple_evaluate on the chosen items of each local task."""
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # the task YAMLs name their data files relative to the repository root
        out = lm_eval.simple_evaluate(
            model=harness, tasks=list(LOCAL_TASKS), task_manager=TaskManager(include_path=str(LM_EVAL_TASKS), include_defaults=False),
            num_fewshot=0, samples={task: chosen_items(task) for task in LOCAL_TASKS}, log_samples=True, bootstrap_iters=0,
        )
    return out["samples"]


@pytest.mark.parametrize("task", list(LOCAL_TASKS))
def test_per_item_loglikelihoods_and_accuracy_match_lm_eval(task, harness_samples, ours):
    benchmark, style = LOCAL_TASKS[task]
    samples = harness_samples[task]
    ids = [s["doc"]["id"] for s in samples]
    records = [r for r in load_records() if r["id"] in ids]
    result = multiple_choice(ours, records, benchmark, style)
    by_id = {item["id"]: item for item in result["per_item"]}
    assert sorted(by_id) == sorted(ids) and len(ids) == len(chosen_items(task))
    for s in samples:
        item = by_id[s["doc"]["id"]]
        record = next(r for r in records if r["id"] == item["id"])
        # The same prompt text, character for character, from the harness's own doc_to_text.
        assert s["arguments"][0][0] == doc_to_text(record)
        theirs = [ll for ll, _ in s["filtered_resps"]]
        assert item["logprobs"] == pytest.approx(theirs, abs=1e-4)
        assert item["is_greedy"] == [greedy for _, greedy in s["filtered_resps"]]
        assert (float(item["pred"] == item["gold"]), float(item["pred_norm"] == item["gold"])) == (s["acc"], s["acc_norm"])
    mean_acc = sum(s["acc"] for s in samples) / len(samples)
    assert result["metrics"]["acc"]["value"] == pytest.approx(mean_acc)


def test_the_peer_run_covers_truncation_and_multi_token_options(harness_samples, ours):
    """Guards the comparison above: it must include prompts longer than the context and options
    of several tokens (the KV-cache path), or it would prove little."""
    pubmedqa = [r for r in load_records() if r["id"] in {s["doc"]["id"] for s in harness_samples["local_pubmedqa"]}]
    assert max(len(ours.encode(doc_to_text(r))) for r in pubmedqa) > ours.max_length
    medqa = [r for r in load_records() if r["id"] in {s["doc"]["id"] for s in harness_samples["local_medqa_4options_cloze"]}]
    assert min(len(ours.encode_pair("Answer:", " " + o)[1]) for r in medqa for o in r["options"]) >= 1
    assert max(len(ours.encode_pair("Answer:", " " + o)[1]) for r in medqa for o in r["options"]) > 5


def test_transformer_and_hf_folder_give_the_same_numbers(ours, hf_dir):
    hf = HFCausalLM.from_folder(hf_dir, prefix_token_id=3)
    records, _ = benchmark_records(load_records(), "medqa_5options")
    requests = [(doc_to_text(r), [" " + o for o in r["options"]]) for r in records[:4]]
    requests.append(("", [" yes", " no"]))  # empty context: the prefix token stands in
    for a, b in zip(ours.loglikelihoods(requests), hf.loglikelihoods(requests)):
        assert [s[0] for s in a] == pytest.approx([s[0] for s in b], abs=1e-4)
        assert [s[1] for s in a] == [s[1] for s in b]
    documents = [ours.encode(" ".join(r["question"] for r in records[:3]))]
    assert ours.rolling_loglikelihoods(documents) == pytest.approx(hf.rolling_loglikelihoods(documents), abs=1e-3)
    assert ours.generate(requests[0][0], 12) == hf.generate(requests[0][0], 12)


@torch.no_grad()
def naive_loglikelihood(lm: TransformerLM, context: str, continuation: str) -> tuple[float, bool]:
    """The textbook way: one full forward pass of context + continuation per option."""
    ctx, cont = lm.encode_pair(context, continuation)
    ids = (ctx + cont)[-(lm.max_length + 1) :][:-1]
    logprobs = torch.log_softmax(lm.model(torch.tensor([ids]))[0][0, -len(cont) :].float(), dim=-1)
    targets = torch.tensor(cont)
    return float(logprobs.gather(1, targets[:, None]).sum()), bool((logprobs.argmax(-1) == targets).all())


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lively(request, ours) -> TransformerLM:
    """A seeded model of each architecture with its weights times 4: at its initial scale a random
    model repeats one token, so a batch that mixed up its rows would still give every row the same answer."""
    torch.manual_seed(0)
    model = copy.deepcopy(ours.model) if request.param == "llama" else Transformer(
        ModelConfig(vocab_size=ours.model.config.vocab_size, n_layer=2, n_head=4, d_model=64, context_length=256, arch="gpt2")
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return TransformerLM(model, ours.tokenizer)


@pytest.mark.parametrize("batch_tokens", [8192, 300])
def test_batched_scoring_equals_one_option_at_a_time(lively, batch_tokens):
    """Every option of many items in few forward passes (each item's context once, its options
    after it) against one full forward pass per option, alone: within 1e-5, or 1e-6 relative for a
    sum past 64 (8 float32 steps: the two ways multiply in other orders, so each token's
    log-probability rounds apart, and the sum adds those roundings; 3 steps seen at -166)."""
    lm = TransformerLM(lively.model, lively.tokenizer, batch_tokens=batch_tokens)  # 300: many small batches
    records = [r for r in load_records() if r["split"] != "train"][::9]
    requests = [(doc_to_text(r), [" " + o for o in r["options"]] + [" " + o[0] for o in r["options"][:2]]) for r in records]
    requests.append(("Question: " + "very long " * 200 + "\nAnswer:", [" A", " " + "long option text " * 10]))
    requests.append(("", [" yes", " no at all"]))
    for (context, continuations), scores in zip(requests, lm.loglikelihoods(requests)):
        expected = [naive_loglikelihood(lm, context, c) for c in continuations]
        assert [s[0] for s in scores] == pytest.approx([e[0] for e in expected], abs=1e-5, rel=1e-6)
        assert [s[1] for s in scores] == [e[1] for e in expected]


def test_continuations_encoded_from_the_last_line_are_lm_evals_tokens(ours, hf_dir):
    """A continuation's tokens come from the context's last line alone (our byte-level BPE splits
    at a line start): the same as lm-eval's tail of encode(context + continuation), on every bundled
    prompt, zero- and few-shot, and on texts built to trip the rule."""
    from tokenizers import Tokenizer, normalizers

    records = load_records()
    contexts = [doc_to_text(r) for r in records]
    contexts += [fewshot_context(r, records[i + 1 : i + 4], "cloze") for i, r in enumerate(records[:40]) if r["options"]]
    contexts += ["a\n\nb", "x  \nAnswer:", "x\r\nAnswer:", "Q\n's\nA:", "\n Answer:", "one line", "Answer:  ", "é\nü\nAnswer:", "[EOS]\nA"]
    continuations = [" yes", " A", "no", " 's", "\n\nB", " Hérnia", "  two spaces"]
    normalized = Tokenizer.from_str(ours.tokenizer.to_str())
    normalized.normalizer = normalizers.Lowercase()  # the rule is not known to hold: the whole text each time
    lms = [ours, HFCausalLM.from_folder(hf_dir, prefix_token_id=3), TransformerLM(ours.model, normalized)]
    assert [lm.line_split for lm in lms] == [True, True, False]
    for lm in lms:
        for context in contexts:
            stripped = context.rstrip()
            ctx = lm.encode(stripped)
            expected = [(ctx, lm.encode(stripped + context[len(stripped) :] + c)[len(ctx) :]) for c in continuations]
            assert lm.encode_request(context, continuations) == expected, context


@torch.no_grad()
def textbook_greedy(lm: TransformerLM, context: str, max_new_tokens: int) -> list[int]:
    """Greedy decoding the textbook way: the whole sequence through the model for every token."""
    ids = lm.encode(context)[-(lm.max_length - max_new_tokens) :]
    new = []
    for _ in range(max_new_tokens):
        token = int(lm.model(torch.tensor([ids + new]))[0][0, -1].argmax())
        if token == lm.eos_token_id:
            break
        new.append(token)
    return new


@pytest.mark.parametrize("batch_tokens", [8192, 600])
def test_batched_greedy_generation_equals_one_prompt_at_a_time(lively, batch_tokens):
    """Prompts of many lengths (some longer than the context, so left-truncated) padded into
    batches: every prompt gets the tokens it gets alone, with and without the key/value cache."""
    lm = TransformerLM(lively.model, lively.tokenizer, batch_tokens=batch_tokens)  # 600: several batches
    records = [r for r in load_records() if r["split"] != "train"][::11]
    prompts = [doc_to_text(r) for r in records] + ["Question: Is it?\nAnswer:", "Hi"]
    assert len({len(lm.encode(p)) for p in prompts}) > 5 and max(len(lm.encode(p)) for p in prompts) > lm.max_length
    alone = [textbook_greedy(lm, p, 12) for p in prompts]
    assert len({tuple(new) for new in alone}) == len(prompts) and all(len(set(new)) > 4 for new in alone)
    assert lm.greedy(prompts, 12) == alone == [lm.greedy([p], 12)[0] for p in prompts]
    # EOS ends a row (it is left out) while the others go on: make a token that a row first
    # generates 4th or later the EOS.
    row, eos = next((r, new[k]) for r, new in enumerate(alone) for k in range(3, len(new)) if new[k] not in new[:k])
    stopping = TransformerLM(lm.model, lm.tokenizer, eos_token_id=eos, batch_tokens=batch_tokens)
    expected = [new[: new.index(eos)] if eos in new else new for new in alone]
    assert stopping.greedy(prompts, 12) == expected and 3 <= len(expected[row]) < 12
    # A stop string ends a row after the token that completes it; generate_many cuts the text before it.
    stop = lm.decode(alone[1][:5])[-2:]
    texts = lm.generate_many(prompts, 12, until=(stop,))
    assert texts == [lm.generate(p, 12, until=(stop,)) for p in prompts] and stop not in "".join(texts)
    assert texts[1] == lm.decode(alone[1]).split(stop)[0]


def test_encode_pair_moves_trailing_spaces_and_uses_the_prefix_for_an_empty_context(ours):
    assert ours.encode_pair("Answer: ", "yes") == ours.encode_pair("Answer:", " yes")
    ctx, cont = ours.encode_pair("", " yes")
    assert ctx == [3] and cont == ours.encode(" yes")


@pytest.mark.parametrize("n_tokens", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("stride", [16, 5, 1])
def test_rolling_windows_are_lm_evals(n_tokens, stride):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(10, 10 + n_tokens))
    theirs = [
        make_disjoint_window(w)
        for w in get_rolling_token_windows(tokens, prefix_token=3, max_seq_len=16, context_len=16 - stride + 1)
    ]
    ours = rolling_windows(tokens, 3, 16, stride)
    assert [(window, scored) for window, scored in ours] == [(ctx + cont, len(cont)) for ctx, cont in theirs]
    assert sum(scored for _, scored in ours) == n_tokens  # every token predicted exactly once


def test_rolling_loglikelihood_and_generation_match_lm_eval(ours, harness, documents):
    from lm_eval.api.instance import Instance

    texts = [text for _, text in documents[:6]]  # real abstracts, several longer than the 256-token context
    assert max(len(ours.encode(t)) for t in texts) > 2 * ours.max_length
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    theirs = harness.loglikelihood_rolling(requests, disable_tqdm=True)
    assert ours.rolling_loglikelihoods([ours.encode(t) for t in texts]) == pytest.approx(theirs, abs=1e-3)

    prompt = doc_to_text(benchmark_records(load_records(), "pubmedqa")[0][0])
    gen_kwargs = {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": False}
    (expected,) = harness.generate_until([Instance("generate_until", {}, (prompt, gen_kwargs), 0)], disable_tqdm=True)
    assert ours.generate(prompt, 16, until=("\n\n",)) == expected
