"""Fine-tuning: real QA rows rendered and tokenized by the real tokenizer, masked and packed
batches, full and LoRA (PEFT) fine-tuning of our checkpoint and of a tiny Hugging Face Llama,
resume after SIGKILL, TRL's SFTTrainer as the peer, the stage and the curriculum flow (CPU, tiny)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import kill_once_written
from eval_records import DATA, load_records

from model.checkpoint import load_model
from model.export_hf import export_hf, to_hf_model
from model.base import HFTrainable, load_base
from model.finetune import MODEL_DIR, FinetuneConfig, finetune
from model.lora import ADAPTER_DIR, add_lora
from model.model import IGNORE_INDEX
from model.sft import (
    AllMaskedBatch,
    Example,
    SFTBatches,
    alpaca_prompt,
    collate,
    encode_examples,
    instruction_parts,
    pack,
    render,
)
from model.train import OptimConfig, RunConfig, TrainConfig, adamw, lr_at
from storage import ArtifactError, ArtifactSpec
from storage.formats import EOS_ID, PAD_ID, read_records
from tasks.qa import QAConfig, convert_qa

RECORDS = load_records()


def instruction_records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("instructions") / "qa"
    convert_qa(QAConfig(source=str(DATA / "instructions")), out)
    return read_records(out)


def as_train(records: list[dict]) -> list[dict]:
    """Rows of an evaluation split, relabelled for training in a test (the stage never does this)."""
    return [dict(r, split="train") for r in records]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def small(**overrides) -> tuple[OptimConfig, RunConfig]:
    """A fine-tuning's optim and run tables: a few steps."""
    config = TrainConfig.of(**(dict(max_steps=4, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=1, eval_every=100, checkpoint_every=100) | overrides))
    return config.optim, config.run


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    """The base every fine-tuning here starts from: conftest's tiny pretrained checkpoint."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def hf_llama(base, tmp_path_factory) -> Path:
    """A tiny randomly initialised LlamaForCausalLM saved to a folder, with our tokenizer's files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = json.loads(base.file("config.json").read_text())["model"]["vocab_size"]
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=256, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(base.file(name), folder / name)
    return folder


# -- data ------------------------------------------------------------------------------------------


def test_rendering_of_real_records_in_both_templates():
    medqa = next(r for r in RECORDS if r["source"] == "medqa" and len(r["options"]) == 5)
    prompt, completion = render(medqa, "eval", "letter")
    letter = "ABCDE"[medqa["answer_idx"]]
    assert prompt.endswith("\nE. " + medqa["options"][4] + "\nAnswer:") and completion == " " + letter
    assert render(medqa, "eval", "letter+text")[1] == f" {letter}. {medqa['options'][medqa['answer_idx']]}"
    medmcqa = next(r for r in RECORDS if r["source"] == "medmcqa" and r["explanation"])
    assert render(medmcqa, "eval", "letter+text+explanation")[1].endswith("\nExplanation: " + medmcqa["explanation"].strip())
    pubmedqa = next(r for r in RECORDS if r["source"] == "pubmedqa" and r["split"] == "train")
    assert render(pubmedqa, "eval", "letter")[1] == " " + pubmedqa["answer_text"]  # yes / no / maybe
    assert pubmedqa["explanation"] not in render(pubmedqa, "eval", "letter+text+explanation")[0]  # never in a prompt
    prompt, completion = render(medqa, "instruction", "letter")
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert f"### Instruction:\n{medqa['question']}\n\n### Input:\nA. {medqa['options'][0]}\n" in prompt
    assert prompt.endswith("\n\n### Response:\n") and completion == letter
    assert alpaca_prompt("Name a beta blocker.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a beta blocker.\n\n### Response:\n"
    )


def test_prompt_tokens_are_a_prefix_and_eos_ends_every_completion(base, tmp_path_factory):
    encoder = load_base(base.path).encoder
    records = as_train(RECORDS) + instruction_records(tmp_path_factory)
    for template in ("eval", "instruction"):
        examples, report = encode_examples(records, encoder, template, "letter+text+explanation", 256)
        assert report["prefix_mismatches"] == 0 and report["examples"] + report["dropped_too_long"] == len(records)
        for example in examples:
            assert example.completion[-1] == EOS_ID and len(example.prompt) + len(example.completion) <= 257
    # PubMedQA abstracts are longer than 256 tokens: cut from the left, the question and "Answer:" kept.
    pubmedqa = [r for r in records if r["source"] == "pubmedqa"]
    examples, report = encode_examples(pubmedqa, encoder, "eval", "letter", 256)
    assert report["prompts_cut"] > 0 and all(e.length <= 256 for e in examples)
    assert encoder.tokenizer.decode(examples[0].prompt[-6:]).endswith("Answer:")


def test_a_prompt_that_is_not_a_token_prefix_is_an_error_naming_the_fix(base, monkeypatch):
    import model.sft as sft

    encoder = load_base(base.path).encoder
    record = as_train(RECORDS)[0]
    monkeypatch.setattr(sft, "render", lambda r, t, c: ("Which drug helps pati", "ents most?"))  # " patients" is one token
    with pytest.raises(ValueError, match=r"1 of 1 examples: the prompt's tokens are not a prefix .* end prompts on a delimiter"):
        encode_examples([record], encoder)


def test_eos_is_a_target_and_padding_is_masked_by_position_even_when_pad_is_eos():
    short, long = Example("a", [10, 11, 12], [20, EOS_ID]), Example("b", [10, 11, 12, 13, 14], [21, 22, EOS_ID])
    for pad in (PAD_ID, EOS_ID):  # a tokenizer whose pad token is [EOS] must not lose [EOS] as a target
        x, y, inputs = collate([[short], [long]], pad, packed=False, device="cpu")
        assert inputs == {} and x.shape == (2, 7)
        assert y[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 20, EOS_ID, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
        assert y[1].tolist() == [IGNORE_INDEX] * 4 + [21, 22, EOS_ID]
        assert x[0].tolist() == [10, 11, 12, 20, pad, pad, pad]


def test_a_micro_batch_without_a_target_is_an_error_not_a_no_op():
    empty = Example("empty", [10, 11, 12], [])
    with pytest.raises(AllMaskedBatch, match="no completion token to learn"):
        collate([[empty]], PAD_ID, packed=False, device="cpu")
    batches = SFTBatches([empty, Example("ok", [10, 11], [20, EOS_ID])], batch_size=1, seed=0)
    with pytest.raises(AllMaskedBatch):
        for _ in range(4):
            batches.next()


def test_batches_are_a_function_of_seed_and_step_across_epochs():
    examples = [Example(str(i), [10] * (3 + i % 5), [20 + i, EOS_ID]) for i in range(11)]
    for packing in (False, True):
        first = SFTBatches(examples, batch_size=2, grad_accum=2, seed=5, packing=packing, max_length=16)
        steps = [first.next() for _ in range(9)]  # past the end of the first epoch
        resumed = SFTBatches(examples, batch_size=2, grad_accum=2, seed=5, packing=packing, max_length=16)
        resumed.load_state_dict({"seed": 5, "step": 6})
        for a, b in zip(steps[6:], [resumed.next() for _ in range(3)]):
            assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    rows = SFTBatches(examples, batch_size=2, packing=True, max_length=16).epoch_rows(0)
    assert sorted(i for row in rows for i in row) == list(range(11)) and all(sum(examples[i].length for i in row) <= 16 for row in rows)


@pytest.mark.parametrize("backend", ["ours", "hf-llama"])
def test_packing_keeps_examples_apart_and_gives_padding_s_per_example_losses(backend, base, hf_llama):
    base_model = load_base(base.path if backend == "ours" else hf_llama)

    model = (base_model.network() if backend == "ours" else HFTrainable(base_model.network())).eval()
    examples, _ = encode_examples(as_train([r for r in RECORDS if r["source"] == "medmcqa"]), base_model.encoder, "eval", "letter+text", 256)
    row = max(pack(examples, range(len(examples)), 256), key=len)
    assert len(row) >= 2
    packed = [examples[i] for i in row]
    x, y, inputs = collate([packed], PAD_ID, packed=True, device="cpu")
    with torch.no_grad():
        logits, _ = model(x, y, **inputs)
        # Change a token of the first example: the logits of every other example stay the same.
        changed = x.clone()
        changed[0, 1] = (changed[0, 1] + 1) % 1000
        logits_changed, _ = model(changed, y, **inputs)
        first = packed[0].length
        assert not torch.equal(logits[0, :first], logits_changed[0, :first])
        assert torch.equal(logits[0, first:], logits_changed[0, first:])
        # Each example's loss in the packed row equals its loss alone (padding's rows).
        at = 0
        for example in packed:
            xs, ys, _ = collate([[example]], PAD_ID, packed=False, device="cpu")
            alone_logits, alone = model(xs, ys)
            seg = slice(at, at + example.length)
            together = torch.nn.functional.cross_entropy(logits[0, seg], y[0, seg], ignore_index=IGNORE_INDEX)
            assert together.item() == pytest.approx(alone.item(), abs=1e-5)
            torch.testing.assert_close(logits[0, seg], alone_logits[0], atol=1e-5, rtol=1e-5)
            at += example.length


def test_a_step_s_loss_is_the_mean_over_all_its_targets_however_it_is_accumulated(base, tmp_path):
    """Completions of different lengths: one micro-batch of 4 == 4 micro-batches of 1 (loss and weights)."""
    records = as_train([r for r in RECORDS if r["source"] == "medmcqa"][:12])
    cfg = FinetuneConfig(method="full", packing=False, completion="letter+text+explanation", max_length=256)
    one = finetune(cfg, *small(max_steps=2, batch_size=4, weight_decay=0.0), base.path, records, tmp_path / "one")
    four = finetune(replace(cfg, grad_accum=4), *small(max_steps=2, batch_size=1, weight_decay=0.0), base.path, records, tmp_path / "four")
    assert one["completion_tokens"] == four["completion_tokens"]
    for step, loss in losses(tmp_path / "one").items():
        assert losses(tmp_path / "four")[step] == pytest.approx(loss, rel=1e-5)
    a, b = load_model(tmp_path / "one" / "ckpt_0000002"), load_model(tmp_path / "four" / "ckpt_0000002")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


# -- full fine-tuning: resume after SIGKILL ---------------------------------------------------------


def test_full_finetune_resumes_after_sigkill_with_the_same_losses(base, tmp_path):
    records = as_train([r for r in RECORDS if r["source"] in ("medmcqa", "medqa")])
    optim, run = small(max_steps=60, batch_size=2, checkpoint_every=5, eval_every=30)
    tables = {"finetune": {"method": "full", "max_length": 128}, "optim": asdict(optim), "run": asdict(run)}
    (tmp_path / "run.json").write_text(json.dumps(tables))
    data = tmp_path / "records"
    data.mkdir()
    from storage.formats import qa_schema
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records, schema=qa_schema()), data / "records.parquet")
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "model.finetune", "--base", str(base.path), "--data", str(data), "--out", str(killed), "--config", str(tmp_path / "run.json")]
    kill_once_written(command, killed / "ckpt_0000010")
    assert not (killed / "ckpt_0000060").exists()

    cfg = FinetuneConfig(**tables["finetune"])
    summary = finetune(cfg, optim, run, base.path, records, killed)
    finetune(cfg, optim, run, base.path, records, tmp_path / "straight")
    assert summary["resumed_from_step"] >= 10
    resumed, straight = losses(killed), losses(tmp_path / "straight")
    assert sorted(resumed) == list(range(1, 61))
    for step in range(summary["resumed_from_step"] + 1, 61):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7)
    for (name, p), q in zip(load_model(killed / MODEL_DIR).named_parameters(), load_model(tmp_path / "straight" / MODEL_DIR).parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)

    # Killed while the model was being written: the rerun resumes at the last step and writes it again.
    written = (killed / MODEL_DIR / "model.safetensors").read_bytes()
    (killed / MODEL_DIR / "model.safetensors").write_bytes(written[: len(written) // 2])
    again = finetune(cfg, optim, run, base.path, records, killed)
    assert again["resumed_from_step"] == 60 and (killed / MODEL_DIR / "model.safetensors").read_bytes() == written


# -- LoRA ------------------------------------------------------------------------------------------


def test_a_zero_initialised_adapter_changes_no_logit_and_only_adapters_train(base):
    model = load_model(base.path).eval()
    ids = torch.randint(4, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)[0]
    peft_model = add_lora(model, FinetuneConfig().lora, hf=False, seed=0).eval()
    with torch.no_grad():
        assert torch.equal(peft_model(ids)[0], before)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_merged_equals_base_plus_adapter_and_the_adapter_loads_with_peft_on_the_exported_base(base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = as_train([r for r in RECORDS if r["source"] == "medmcqa"])
    cfg = FinetuneConfig(method="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_targets=("q", "v", "down"), max_length=128)
    optim, run = small(max_steps=3, lr=5e-2)
    summary = finetune(cfg, optim, run, base.path, records, tmp_path / "run")
    assert summary["trainable_params"] < summary["params"] / 5
    out = tmp_path / "run" / MODEL_DIR  # the model as the stage publishes it, written from memory
    assert summary["adapter"] == ADAPTER_DIR
    assert sorted(p.name for p in (out / ADAPTER_DIR).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    ids = torch.randint(4, 1000, (2, 50), generator=torch.Generator().manual_seed(1))
    merged = load_model(out).eval()  # a plain checkpoint: the base's shape, the adapter merged in
    with torch.no_grad():
        assert (merged(ids)[0] - load_model(base.path)(ids)[0]).abs().max() > 1e-3  # the adapter learned something
        export_hf(base.path, tmp_path / "hf-base", base.path)
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf-base"), out / ADAPTER_DIR).eval()
        torch.testing.assert_close(with_adapter(ids).logits, merged(ids)[0], atol=1e-4, rtol=1e-4)
        exported = export_hf(out, tmp_path / "hf-merged", out)  # the artifact's own tokenizer files, chat template included
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(exported)(ids).logits, merged(ids)[0], atol=1e-4, rtol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    item = next(r for r in RECORDS if r["source"] == "medqa")
    messages = [{"role": "user", "content": item["question"]}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == render(dict(item, source="instructions", options=[]), "eval")[0]


def test_the_instruction_chat_template_renders_the_training_prompt(base, tmp_path):
    from transformers import AutoTokenizer

    from model.sft import write_chat_template

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(base.file(name), tmp_path / name)
    write_chat_template(tmp_path / "tokenizer_config.json", "instruction")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    medqa = next(r for r in RECORDS if r["source"] == "medqa")
    instruction, context = instruction_parts(medqa)
    prompt, completion = render(medqa, "instruction", "letter")
    for given in ([{"role": "user", "content": instruction, "input": context}], [{"role": "user", "content": instruction}]):
        expected = alpaca_prompt(instruction, given[0].get("input", ""))
        assert tokenizer.apply_chat_template(given, tokenize=False, add_generation_prompt=True) == expected
    assert expected != prompt and alpaca_prompt(instruction, context) == prompt
    answered = [{"role": "user", "content": instruction, "input": context}, {"role": "assistant", "content": completion}]
    assert tokenizer.apply_chat_template(answered, tokenize=False) == prompt + completion + "[EOS]"


# -- a Hugging Face base --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_tiny_hf_llama_fine_tunes_full_and_lora_and_is_published_as_a_hf_folder(method, hf_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = as_train([r for r in RECORDS if r["source"] == "medmcqa"])
    cfg = FinetuneConfig(method=method, lora_dropout=0.0, max_length=128, packing=True)
    optim, run = small(max_steps=3, lr=1e-2)
    summary = finetune(cfg, optim, run, hf_llama, records, tmp_path / "run")
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3] and summary["format"] == "hf"
    out = tmp_path / "run" / MODEL_DIR
    tuned = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(4, 1000, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (tuned(ids).logits - AutoModelForCausalLM.from_pretrained(hf_llama)(ids).logits).abs().max() > 1e-4
    if method == "lora":
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_llama), out / ADAPTER_DIR).eval()
        with torch.no_grad():
            torch.testing.assert_close(adapted(ids).logits, tuned(ids).logits, atol=1e-4, rtol=1e-4)
        assert "base_model_name_or_path\": null" in (out / ADAPTER_DIR / "adapter_config.json").read_text()
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert AutoTokenizer.from_pretrained(out).apply_chat_template([{"role": "user", "content": "Why?"}], tokenize=False, add_generation_prompt=True) == "Question: Why?\nAnswer:"
    # A second stage starts from the first's Hugging Face folder.
    again = finetune(cfg, *small(max_steps=1), out, records, tmp_path / "run2")
    assert again["format"] == "hf"


# -- the peer: TRL's SFTTrainer --------------------------------------------------------------------

PEER_STEPS = 8
PEER_TOLERANCE = 1e-6  # relative; measured at most 7e-8 (float32 rounding of two implementations of the same sums)


def test_the_first_losses_equal_trl_sft_trainer_s(base, tmp_path):
    """Same model (ours, exported to LlamaForCausalLM for TRL), data in the same order (TRL's
    sampler sequential), prompt/completion with completion-only loss, [EOS] appended, batch 2 x
    gradient accumulation 2 with completions of different lengths, the same AdamW groups,
    warmup + cosine, clipping, seed; no dropout."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cfg = FinetuneConfig(method="full", packing=False, max_length=256, completion="letter+text", grad_accum=2)
    encoder = load_base(base.path).encoder
    records = as_train([r for r in RECORDS if r["source"] == "medmcqa"])
    uncut, _ = encode_examples(records, encoder, cfg.template, cfg.completion, max_length=10_000)
    fits = {e.id for e in uncut if e.length <= cfg.max_length}  # TRL would not cut a long prompt as we do: leave those out
    records = [r for r in records if r["id"] in fits]
    optim, run = small(max_steps=PEER_STEPS, batch_size=2, warmup_steps=2, weight_decay=0.1, seed=7)
    finetune(cfg, optim, run, base.path, records, tmp_path / "ours")
    ours = losses(tmp_path / "ours")

    examples, report = encode_examples(records, encoder, cfg.template, cfg.completion, cfg.max_length)
    assert report["prompts_cut"] == 0
    order = [i for row in SFTBatches(examples, 2, 2, seed=optim.seed).epoch_rows(0) for i in row]
    assert len(order) >= PEER_STEPS * 4  # all of the compared steps in the first epoch
    by_id = {r["id"]: r for r in records}
    rows = [dict(zip(("prompt", "completion"), render(by_id[examples[i].id], cfg.template, cfg.completion))) for i in order]
    model = to_hf_model(load_model(base.path), {"pad_id": 0, "eos_id": 3, "bos_id": 2}).train()
    optimizer = adamw(model, optim, "cpu")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, optim) / optim.lr)
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=PEER_STEPS,
        learning_rate=optim.lr, max_grad_norm=optim.grad_clip, seed=optim.seed, train_sampling_strategy="sequential",
        max_length=None, gradient_checkpointing=False, bf16=False, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True,  # TRL's default is bf16 autocast, on CPU too: ours is fp32 on CPU
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(base.path),
                         optimizers=(optimizer, schedule))
    trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(theirs) == PEER_STEPS
    for step, loss in enumerate(theirs, 1):
        assert ours[step] == pytest.approx(loss, rel=PEER_TOLERANCE), f"step {step}"


# -- bad input ------------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors_naming_the_fix(base, hf_llama, session_store, tmp_path):
    from transformers import BertConfig, BertModel

    from tasks.finetune import FINETUNE, FinetuneRun
    from tasks.qa import QA

    medqa = QA.run(session_store, {}, QAConfig(source=str(DATA / "medqa")))  # test rows only
    with pytest.raises(ValueError, match=r"no training examples: the QA data medqa has no train split \(90 test\)") as error:
        FINETUNE.run(session_store, {"base": base, "data": [medqa]}, FinetuneRun())
    assert "\n" not in str(error.value)

    BertModel(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"bert is not a causal LM \(BertModel\); give a folder saved from a \.\.\.ForCausalLM"):
        load_base(tmp_path / "bert")
    with pytest.raises(ValueError, match="is not a Hugging Face model folder"):
        load_base(tmp_path)

    small_vocab = tmp_path / "small-vocab"
    shutil.copytree(hf_llama, small_vocab)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig.from_pretrained(hf_llama, vocab_size=500)).save_pretrained(small_vocab)
    with pytest.raises(ValueError, match=r"the tokenizer has 1000 tokens but the model's vocabulary is 500; use the tokenizer the model was trained with"):
        load_base(small_vocab)
    ours = tmp_path / "ours"
    shutil.copytree(base.path, ours, copy_function=shutil.copyfile)
    ours.chmod(0o755)
    saved = json.loads((ours / "config.json").read_text())
    saved["model"]["vocab_size"] = 1200
    (ours / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="the tokenizer has 1000 tokens but the model's vocabulary is 1200"):
        load_base(ours)
    with pytest.raises(ArtifactError, match=r"stage finetune reads \['base', 'data'\]"):
        FINETUNE.run(session_store, {"data": [medqa]}, FinetuneRun())


# -- the stage and the flow ------------------------------------------------------------------------


def test_the_stage_publishes_a_checkpoint_the_evaluate_stage_reads_and_an_hf_model_is_keyed_by_its_bytes(base, hf_llama, session_store, tmp_path):
    from tasks.evaluate import EVALUATE, EvaluationConfig
    from tasks.finetune import FINETUNE, FinetuneRun
    from tasks.hf_model import HF_MODEL, HFModelConfig
    from tasks.qa import QA

    pubmedqa = QA.run(session_store, {}, QAConfig(source=str(DATA / "pubmedqa")))
    config = FinetuneRun(FinetuneConfig(max_length=256), *small(max_steps=2, batch_size=4))
    tuned = FINETUNE.run(session_store, {"base": base, "data": [pubmedqa]}, config)
    names = {p.name for p in tuned.path.iterdir()}
    assert {"model.safetensors", "config.json", "state.json", "tokenizer.json", "tokenizer_config.json", "metrics.jsonl", "adapter"} <= names
    assert "run" not in names and tuned.parents == [base.ref, pubmedqa.ref] and tuned.summary["examples"] == 26
    assert FINETUNE.run(session_store, {"base": base, "data": [pubmedqa]}, replace(config, run=replace(config.run, log_every=2))).reused  # how, not what
    few = EvaluationConfig(benchmarks=("pubmedqa",), shots=(0,), max_items=3, generation_items=0)
    assert EVALUATE.run(session_store, {"model": tuned, "qa": [pubmedqa]}, few).summary["pubmedqa_cloze_0shot_acc"] >= 0

    copy = tmp_path / "llama-copy"
    shutil.copytree(hf_llama, copy)
    taken = HF_MODEL.run(session_store, {}, HFModelConfig(folder=str(hf_llama)))
    assert taken.label == hf_llama.name and taken.summary["architectures"] == ["LlamaForCausalLM"]
    assert sorted(p.name for p in taken.path.iterdir() if p.name != "manifest.json") == sorted(p.name for p in hf_llama.iterdir())
    assert HF_MODEL.run(session_store, {}, HFModelConfig(folder=str(copy))).ref == taken.ref  # bytes, not path
    snapshot, blobs = tmp_path / "snapshot", tmp_path / "blobs"  # as a Hugging Face cache holds a model: links into its blobs
    snapshot.mkdir(), blobs.mkdir()
    for f in hf_llama.iterdir():
        shutil.copyfile(f, blobs / f.name)
        (snapshot / f.name).symlink_to(blobs / f.name)
    assert HF_MODEL.run(session_store, {}, HFModelConfig(folder=str(snapshot))).ref == taken.ref
    (copy / "README.md").write_text("changed")
    assert HF_MODEL.run(session_store, {}, HFModelConfig(folder=str(copy))).ref != taken.ref  # a file more: another model
    from_hf = FINETUNE.run(session_store, {"base": taken, "data": [pubmedqa]}, config)
    assert from_hf.parents == [taken.ref, pubmedqa.ref]
    assert from_hf.summary["format"] == "hf" and "finetune.json" in {p.name for p in from_hf.path.iterdir()}
    assert EVALUATE.run(session_store, {"model": from_hf, "qa": [pubmedqa]}, few).summary["pubmedqa_cloze_0shot_acc"] >= 0


@pytest.mark.usefixtures("prefect_server")
def test_the_finetune_flow_runs_a_curriculum_of_two_sources_evaluated_after_each(base, store, tmp_path):
    from flows.finetune import Curriculum, comparison, finetune as finetune_flow
    from tasks.evaluate import EvaluationConfig
    from tasks.qa import QASources

    # The base checkpoint, as a pretrain artifact of this flow's store.
    pretrained = store.get_or_build(ArtifactSpec("pretrain", "test"), lambda work: [shutil.copy2(p, work) for p in base.path.iterdir() if p.name != "manifest.json"] and None)
    qa = QASources(pubmedqa=str(DATA / "pubmedqa"), medqa=str(DATA / "medqa"), instructions=(str(DATA / "instructions"),))
    evaluation = EvaluationConfig(benchmarks=("pubmedqa", "medqa_4options"), shots=(0,), max_items=4, generation_items=0)
    optim, run = small(max_steps=2)
    refs = finetune_flow(finetune=FinetuneConfig(max_length=256), finetune_optim=optim, finetune_run=run, curriculum=Curriculum(sources=("pubmedqa", "instructions")), qa=qa,
                         evaluation=evaluation, base_ref=pretrained.ref)

    assert len(refs) == 3
    evaluated = [store.require(ref).parents[0] for ref in refs]
    assert evaluated[0] == pretrained.ref
    first, second = store.require(evaluated[1]), store.require(evaluated[2])
    assert first.kind == second.kind == "finetune" and first.parents[0] == pretrained.ref and second.parents[0] == first.ref
    trainset = store.require(second.parents[1])  # the instruction files' train split, cleaned against the evaluated QA data
    assert trainset.kind == "trainset" and len(trainset.parents) == 3 and trainset.summary["train"] == {"before": 8, "after": 8}
    rows = comparison(store, refs)
    assert list(rows[0]) == ["benchmark", "how", "metric", "base", "1. pubmedqa", "2. instructions", "baseline"]
    assert {r["benchmark"] for r in rows} == {"pubmedqa", "medqa_4options"} and "majority class 'yes'" in rows[0]["baseline"]
    with pytest.raises(ValueError, match=r"curriculum source 'medmcqa' has no data: set qa.medmcqa"):
        finetune_flow(finetune_optim=optim, finetune_run=run, curriculum=Curriculum(sources=("medmcqa",)), qa=qa, evaluation=evaluation, base_ref=pretrained.ref)
    # Instruction data that is nothing but MedQA test questions: nothing left to train on, said before any training.
    exam = [json.loads(line) for line in (DATA / "medqa" / "US_test.jsonl").read_text().splitlines()[:3]]
    (tmp_path / "exam.json").write_text(json.dumps([{"instruction": r["question"], "output": r["answer"]} for r in exam]))
    leaky = QASources(medqa=str(DATA / "medqa"), instructions=(str(tmp_path / "exam.json"),))
    with pytest.raises(ValueError, match=r"curriculum source 'instructions': the trainset stage removed all 3 train records \(evaluation 13-gram 3\); see trainset/"):
        finetune_flow(finetune_optim=optim, finetune_run=run, curriculum=Curriculum(sources=("instructions",)), qa=leaky, evaluation=evaluation, base_ref=pretrained.ref)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fine_tuning_under_torchrun_equals_one_process_with_the_same_global_batch(method, base, session_store):
    """The stage with devices=2 (torchrun, gloo, DDP) against one process accumulating the same
    rows: each rank takes its share of a step's rows, and the loss stays the mean over every
    completion token of the step."""
    from tasks.finetune import FINETUNE, FinetuneRun
    from tasks.qa import QA

    pubmedqa = QA.run(session_store, {}, QAConfig(source=str(DATA / "pubmedqa")))
    one = FinetuneRun(FinetuneConfig(method=method, max_length=256, grad_accum=2), *small(max_steps=4, batch_size=2, eval_every=4))
    two = FinetuneRun(replace(one.finetune, grad_accum=1), one.optim, replace(one.run, devices=2))
    single = FINETUNE.run(session_store, {"base": base, "data": [pubmedqa]}, one)
    double = FINETUNE.run(session_store, {"base": base, "data": [pubmedqa]}, two)
    assert double.summary["world_size"] == 2 and single.summary["world_size"] == 1
    assert double.summary["tokens_per_step"] == single.summary["tokens_per_step"]
    first, second = losses(single.path), losses(double.path)
    assert sorted(first) == sorted(second) == [1, 2, 3, 4]
    for step in first:
        assert second[step] == pytest.approx(first[step], rel=1e-4)
    assert double.summary["val_loss"] == pytest.approx(single.summary["val_loss"], rel=1e-4)



# -- chat ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(base, session_store):
    """conftest's tiny checkpoint (a 256-token context) fine-tuned on PubMedQA with the eval chat
    template, long enough to answer " yes" or " no" after "Answer:", as it was trained to."""
    from tasks.finetune import FINETUNE, FinetuneRun
    from tasks.qa import QA

    pubmedqa = QA.run(session_store, {}, QAConfig(source=str(DATA / "pubmedqa")))
    return FINETUNE.run(session_store, {"base": base, "data": [pubmedqa]},
                        FinetuneRun(FinetuneConfig(method="full", max_length=256), *small(max_steps=30, batch_size=8, lr=3e-3)))


def chat_command(model: str, session_store, cwd, *args, input=None):
    """`medlm chat MODEL ARGS` run in ``cwd`` on the session's store."""
    env = {**os.environ, "MEDLM_STORE": str(session_store.root)}
    return subprocess.run([str(Path(sys.executable).parent / "medlm"), "chat", model, *args], input=input, env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_medlm_chat_keeps_the_whole_prompt_and_caps_the_answer_at_what_the_context_leaves(chat_model, session_store, tmp_path):
    """The default --max-tokens 256 on a 256-token model: the answer is the greedy continuation of
    the whole prompt, as long as the context leaves (was: of the prompt's last token, 255 long)."""
    from model.chat import DISCLAIMER
    from model.scoring import load_causal_lm
    from transformers import AutoTokenizer

    question = "Does aspirin lower the risk of stroke?"
    prompt = AutoTokenizer.from_pretrained(chat_model.path).apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    assert prompt == f"Question: {question}\nAnswer:"  # the eval template fine-tuning trained on
    lm = load_causal_lm(chat_model.path)
    used = len(lm.encode(prompt))
    one = chat_command(chat_model.ref, session_store, tmp_path, "--message", question)
    assert one.returncode == 0, one.stderr
    answer = lm.generate(prompt, 256 - used, until=())
    assert one.stdout == answer.strip() + "\n" and answer != lm.generate(prompt, 255, until=())  # that one reads the prompt's last token only
    assert DISCLAIMER in one.stderr and f"note: the answer is capped at {256 - used} tokens: the prompt takes {used} of the model's 256" in one.stderr

    empty = chat_command(chat_model.ref, session_store, tmp_path, "--message", "  ")
    assert empty.returncode == 2 and empty.stderr.splitlines()[-1] == "error: the message is empty: ask something (in a conversation, an empty line ends it)"


def test_medlm_chat_streams_the_answer_and_keeps_the_conversation_as_the_model_wrote_it(base, hf_llama, chat_model, session_store, tmp_path):
    from model.chat import Chat
    from model.scoring import load_causal_lm
    from tasks.finetune import FINETUNE, FinetuneRun
    from tasks.hf_model import HF_MODEL, HFModelConfig
    from tasks.qa import QA

    question, follow_up = "Does aspirin lower the risk of stroke?", "And of a heart attack?"
    prompt = f"Question: {question}\nAnswer:"
    greedy = load_causal_lm(chat_model.path).generate(prompt, 12, until=())
    assert greedy.startswith(" ")  # the model writes the space after "Answer:" itself

    chat = Chat(chat_model.path, max_tokens=12)
    first, second = list(chat.reply(question)), list(chat.reply(follow_up))
    assert "".join(first) == greedy[1:] and len(first) > 1  # streamed: a piece per token that completes text
    assert chat.messages[1] == {"role": "assistant", "content": greedy[1:]} and len(chat.messages) == 4  # the answer is the next turn's context
    # The second turn's prompt holds the first exactly as the model read and wrote it (one space after "Answer:", not two).
    assert chat.render(chat.messages[:3]) == prompt + greedy + "[EOS]" + f"Question: {follow_up}\nAnswer:"
    talk = chat_command(chat_model.ref, session_store, tmp_path, "--max-tokens", "12", input=f"{question}\n{follow_up}\n")
    assert talk.returncode == 0 and talk.stdout == "".join(first) + "\n" + "".join(second) + "\n"

    sampled = [list(Chat(chat_model.path, max_tokens=12, temperature=1.0, seed=seed).reply(question)) for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]  # a seed decides a sampled answer

    pubmedqa = QA.run(session_store, {}, QAConfig(source=str(DATA / "pubmedqa")))
    config = FinetuneRun(FinetuneConfig(max_length=256), *small(max_steps=2, batch_size=4))
    from_hf = FINETUNE.run(session_store, {"base": HF_MODEL.run(session_store, {}, HFModelConfig(folder=str(hf_llama))), "data": [pubmedqa]}, config)
    hf_chat = Chat(from_hf.path, max_tokens=8)
    assert "".join(hf_chat.reply(question)) == load_causal_lm(from_hf.path).generate(prompt, 8, until=()).removeprefix(hf_chat.lead)

    plain = chat_command(base.ref, session_store, tmp_path, "--message", question)
    assert plain.returncode == 2 and plain.stderr.splitlines()[-1] == f"error: {base.ref} is a pretrain, not a model to chat with: give a finetune or dpo ref (medlm ls finetune)"


@pytest.mark.parametrize("model, args, error", [
    ("qa", [], "{ref} is a qa, not a model to chat with"),
    ("../../etc", [], "../../etc: not a model folder with a chat template"),
    ("nowhere/at/all", [], "invalid artifact ref nowhere/at/all: expected KIND/HEXKEY"),
    ("./missing", [], "./missing: no such folder or artifact"),
    ("finetune/0", ["--temperature", "nan"], "argument --temperature: nan is not a finite number >= 0"),
    ("finetune/0", ["--top-p", "0"], "argument --top-p: 0 is not a finite number in (0, 1]"),
])
def test_medlm_chat_refuses_what_is_not_a_model_or_a_setting_in_one_line_before_loading_anything(model, args, error, session_store, tmp_path):
    from tasks.qa import QA

    qa = QA.run(session_store, {}, QAConfig(source=str(DATA / "pubmedqa")))
    model = qa.ref if model == "qa" else model
    (tmp_path / "etc").mkdir()
    (here := tmp_path / "a" / "b").mkdir(parents=True)  # ../../etc is a folder, not a model's
    refused = chat_command(model, session_store, here, *args, "--message", "Why?")
    assert refused.returncode == 2 and error.format(ref=qa.ref) in refused.stderr.splitlines()[-1] and "Traceback" not in refused.stderr


def test_a_message_too_long_for_the_context_is_cut_at_a_token_boundary_and_earlier_turns_make_room(chat_model):
    """The prompt may take 256 - min(max_tokens, 256 // 4) tokens: the longest run of the message's
    first tokens that fits is kept, the rest dropped and counted; the next turn leaves the first out."""
    from model.chat import Chat

    records = [r for r in RECORDS if r["source"] == "pubmedqa"]
    message = " ".join(" ".join(r["context"]) for r in records[:3])
    notes: list[str] = []
    chat = Chat(chat_model.path, max_tokens=16, notify=notes.append)
    ids = chat.lm.encode(message, add_special_tokens=False)
    assert len(ids) > 256
    list(chat.reply(message))
    kept = chat.messages[0]["content"]
    kept_ids = chat.lm.encode(kept, add_special_tokens=False)
    assert kept == chat.lm.decode(ids[: len(kept_ids)]) and message.startswith(kept)  # the message's own first tokens
    fits = 256 - 16
    assert chat.tokens(chat.render([{"role": "user", "content": kept}])) <= fits
    assert chat.tokens(chat.render([{"role": "user", "content": chat.lm.decode(ids[: len(kept_ids) + 1])}])) > fits  # one more would not fit
    assert notes == [  # the answer keeps its 16 tokens: no note of a cap
        f"note: the message is {len(ids):,} tokens, more than the model's 256-token context holds with room for an answer: "
        f"cut after its first {len(kept_ids):,} tokens ({len(ids) - len(kept_ids):,} tokens, {len(message) - len(kept):,} characters dropped)"
    ]
    notes.clear()
    list(chat.reply("And of a heart attack?"))
    assert notes == ["note: 1 earlier turn(s) left out of the model's 256-token context, to leave room for this message and an answer (0 kept)"]
    with pytest.raises(ValueError, match="the message is empty"):
        list(chat.reply(" \n"))
