"""Multiple-choice scoring and bits per byte against lm-evaluation-harness 0.4.13, greedy
generation against transformers' ``generate``.

    python -m benchmarks.evaluate [--steps 300] [--vocab 4096 32000] [--repeats 3] [--harness-batch-sizes 1 8] [--threads N]
                                  [--generation-items 40] [--max-new-tokens 32] [--hf-batch-sizes 1 8]

Model: the ``tiny`` preset (4 layers, d_model 128, 256-token context), trained for --steps on the
repository's two 1,500-article PubMed samples through the real stages (parse, corpus, tokenizer,
encode_corpus, train), then exported with model/export_hf.py. Everything is cached under --work, so a
rerun only measures. Each --vocab is its own tokenizer and model: the vocabulary sets the size
of the output layer, the largest share of a tiny model's work, and so the ratio between scorers.

Items: every bundled row (tests/data/eval/): 40 each of PubMedQA (test), MedMCQA (validation),
MedQA 4 and 5 options (test), zero-shot, through the local task YAMLs (tests/data/lm_eval_tasks/),
letters and cloze styles: 7 tasks, 280 items.

Both sides score the same items in the same process (same threads), interleaved, --repeats times:

- ours: ``tasks.evaluate.multiple_choice`` end to end (prompts, tokenisation, scoring, metrics)
  with ``TransformerLM`` on the checkpoint;
- lm-eval: ``HFLM.loglikelihood`` on the requests its task built (prompt building and dataset
  loading left out, to its advantage) on the exported folder, at each --harness-batch-sizes
  (HFLM's default is 1); its accuracies come from its own ``process_results``.

Agreement: the largest |log-likelihood difference| over every option of every item, how many
options differ by more than 1e-5 and by how many float32 steps (a sum of 30 log-probabilities
near -150 is only held to 1.5e-5 by float32), and whether acc and acc_norm are equal item by
item. Speed: items per second, median over repeats, with every repeat beside it; the target is
ours >= 5x the faster lm-eval setting. Bits per byte on the shards' test.bin is compared too
(ours ``shards_perplexity`` against HFLM ``loglikelihood_rolling`` on the decoded documents).

Generation: greedy answers of --max-new-tokens to the first --generation-items PubMedQA test
prompts (left-truncated to leave room for them; no stop string, EOS stops), ours
(``CausalLM.greedy``: the prompts batched, each token from the key/value cache) on the checkpoint
against transformers' ``generate`` (greedy, its cache) on the exported folder, one prompt at a
time and in left-padded batches (--hf-batch-sizes), interleaved; the tokens must be the same. The
target is ours >= 3x the faster ``generate``.

Writes benchmarks/results/evaluate.json, with the load average before and after.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from benchmarks.common import REPO, write_result
from benchmarks.tokenize import SAMPLES, prepare
from model.export_hf import export_hf
from model.scoring import HFCausalLM, TransformerLM
from model.checkpoint import latest_checkpoint, load_checkpoint_config
from model.train import TrainConfig, train
from storage import Store
from storage.formats import load_tokenizer
from tasks.shards import encode_corpus
from model.prompts import doc_to_text
from tasks.evaluate import benchmark_records, multiple_choice, shard_documents, shards_perplexity
from tests.eval_records import LOCAL_TASKS, load_records


def build_model(work: Path, vocab: int, steps: int) -> tuple[Path, Path, Path, dict]:
    """(checkpoint, tokenizer folder, shards folder, training summary), built once under work."""
    store = Store(work / "store")
    corpus, tokenizer = prepare(SAMPLES, store, vocab)
    shards = work / "shards"
    if not (shards / "meta.json").is_file():
        encode_corpus(corpus.path, tokenizer.file("tokenizer.json"), shards, val_fraction=0.05, test_fraction=0.05)
    config = TrainConfig.of(preset="tiny", max_steps=steps, batch_size=8, lr=2e-3, min_lr=2e-4, warmup_steps=20,
                            eval_every=steps, checkpoint_every=steps, eval_windows=16, device="cpu")
    summary = train(config, shards, work / "run")
    return latest_checkpoint(work / "run"), tokenizer.path, shards, summary


def harness_requests(task_name: str):
    """The task object and its built requests, as simple_evaluate would make them (zero-shot)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(REPO / "tests" / "data" / "lm_eval_tasks"), include_defaults=False)
    (task,) = manager.load([task_name])["tasks"].values()
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(rank=0, world_size=1)
    return task, task.instances


def harness_accuracy(task, instances, scores) -> dict[str, dict]:
    """Per doc id: lm-eval's own process_results on its log-likelihoods."""
    by_doc: dict[int, list] = {}
    for inst, score in zip(instances, scores):
        by_doc.setdefault(inst.doc_id, []).append((inst.idx, inst.doc, score))
    out = {}
    for entries in by_doc.values():
        entries.sort(key=lambda e: e[0])
        doc = entries[0][1]
        out[doc["id"]] = {"logprobs": [e[2][0] for e in entries], **task.process_results(doc, [e[2] for e in entries])}
    return out


def agreement(mine: dict[str, dict], theirs: dict[str, dict]) -> dict:
    """How close our per-option log-likelihoods are to lm-eval's, in absolute terms and in float32
    steps of lm-eval's value (np.spacing: 1.5e-5 near -150, where a long option's sum lies)."""
    pairs = [(a, b) for i in mine for a, b in zip(mine[i]["logprobs"], theirs[i]["logprobs"])]
    diffs = np.array([abs(a - b) for a, b in pairs])
    steps = diffs / np.array([np.spacing(np.float32(abs(b))) for _, b in pairs])
    return {
        "max_abs_logprob_diff": float(diffs.max()),
        "options_over_1e-5": int((diffs > 1e-5).sum()),
        "options": len(pairs),
        "max_diff_in_float32_steps": float(steps.max()),
    }


def timed(fn):
    """fn's value, wall seconds and this process's CPU seconds (all threads): on a machine shared
    with other work the wall time swings with the neighbours' load, the CPU time much less."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def measure(args, work: Path, vocab: int) -> dict:
    """Agreement and speed of both scorers on a model with a ``vocab``-token vocabulary."""
    import lm_eval
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    checkpoint, tokenizer_dir, shards, summary = build_model(work, vocab, args.steps)
    hf_dir = work / "hf"
    if not (hf_dir / "config.json").is_file():
        export_hf(checkpoint, hf_dir, tokenizer_dir)
    ours = TransformerLM.from_checkpoint(checkpoint, load_tokenizer(tokenizer_dir / "tokenizer.json"))
    # prefix_token_id=3 ([EOS]): what our model was trained to start documents after (see model/scoring.py).
    ours_hf = HFCausalLM.from_folder(hf_dir, prefix_token_id=3)  # our scorer on the very folder lm-eval reads
    harnesses = {b: HFLM(pretrained=str(hf_dir), device="cpu", batch_size=b, prefix_token_id=3) for b in args.harness_batch_sizes}
    records = load_records()

    os.chdir(REPO)  # the task YAMLs name their data files relative to the repository root
    built = {name: harness_requests(name) for name in LOCAL_TASKS}
    scorers = {"ours": ours, "ours_hf_folder": ours_hf}
    times: dict[str, dict[str, list[tuple[float, float]]]] = {name: {} for name in LOCAL_TASKS}  # (wall, cpu) seconds
    results: dict[str, dict[str, dict]] = {name: {} for name in LOCAL_TASKS}  # task -> side -> per-item results
    for _ in range(args.repeats):
        for name, (benchmark, style) in LOCAL_TASKS.items():
            for side, scorer in scorers.items():
                result, wall, cpu = timed(lambda: multiple_choice(scorer, records, benchmark, style))
                results[name][side] = {i["id"]: i for i in result["per_item"]}
                times[name].setdefault(side, []).append((wall, cpu))
            task, instances = built[name]
            for b, harness in harnesses.items():
                scores, wall, cpu = timed(lambda: harness.loglikelihood(instances, disable_tqdm=True))
                results[name]["lm_eval"] = harness_accuracy(task, instances, scores)
                times[name].setdefault(f"lm_eval_batch{b}", []).append((wall, cpu))

    per_task, totals = {}, {"wall": {}, "cpu": {}}
    for name in LOCAL_TASKS:
        theirs = results[name]["lm_eval"]
        n = len(theirs)
        median = {
            clock: {side: statistics.median(t[k] for t in runs) for side, runs in times[name].items()}
            for k, clock in enumerate(("wall", "cpu"))
        }
        for clock, sides in median.items():
            for side, seconds in sides.items():
                totals[clock][side] = totals[clock].get(side, 0.0) + seconds
        per_task[name] = {"items": n, "lm_eval": {m: sum(t[m] for t in theirs.values()) / n for m in ("acc", "acc_norm")}}
        for side in scorers:
            mine = results[name][side]
            assert sorted(mine) == sorted(theirs), f"{name}: {side} and lm-eval scored different items"
            per_task[name][side] = {
                "acc": sum(i["pred"] == i["gold"] for i in mine.values()) / n,
                "acc_norm": sum(i["pred_norm"] == i["gold"] for i in mine.values()) / n,
                **agreement(mine, theirs),
                "acc_and_acc_norm_equal_per_item": all(
                    float(mine[i]["pred"] == mine[i]["gold"]) == theirs[i]["acc"] and float(mine[i]["pred_norm"] == mine[i]["gold"]) == theirs[i]["acc_norm"]
                    for i in mine
                ),
            }
        per_task[name]["items_per_s"] = {side: round(n / s, 2) for side, s in median["wall"].items()}
        per_task[name]["items_per_cpu_s"] = {side: round(n / s, 2) for side, s in median["cpu"].items()}
        print(f"{name:28s} n={n} max|Δ|={per_task[name]['ours']['max_abs_logprob_diff']:.1e} "
              + " ".join(f"{k}={v}/s" for k, v in per_task[name]["items_per_s"].items()))

    n_items = sum(t["items"] for t in per_task.values())
    rates = {clock: {side: round(n_items / s, 2) for side, s in sides.items()} for clock, sides in totals.items()}
    every_repeat = {side: [round(n_items / sum(times[name][side][r][0] for name in LOCAL_TASKS), 2) for r in range(args.repeats)] for side in times[next(iter(LOCAL_TASKS))]}
    speedup = {
        clock: {side: round(r[side] / max(v for k, v in r.items() if k.startswith("lm_eval")), 2) for side in scorers}
        for clock, r in rates.items()
    }

    # Bits per byte on the test split: ours from the shards, lm-eval from the decoded documents.
    lm_ours, ours_s, _ = timed(lambda: shards_perplexity(ours, shards))
    texts = [ours.decode(d) for d in shard_documents(shards)]
    harness = harnesses[max(harnesses)]
    nll, theirs_s, _ = timed(lambda: harness.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)], disable_tqdm=True))
    harness_bpb = -sum(nll) / math.log(2) / sum(len(t.encode()) for t in texts)

    cfg = load_checkpoint_config(checkpoint)
    result = {
        "model": {
            "description": f"tiny preset, vocabulary {vocab:,}, trained {args.steps} steps (batch 8 x 256 tokens) on the two PubMed sample files",
            "config": cfg["model"],
            "params": sum(p.numel() for p in ours.model.parameters()),
            "train_loss": summary["final_loss"],
            "val_loss": summary["val_loss"],
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "lm_eval": lm_eval.__version__},
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "timing": (
            "median wall and CPU seconds over repeats, summed over tasks; ours = multiple_choice() end to end on TransformerLM (checkpoint) and on "
            "HFCausalLM (the exported folder); lm_eval = HFLM.loglikelihood on the requests its task built"
        ),
        "tasks": per_task,
        "all_tasks": {
            "items": n_items,
            "max_abs_logprob_diff": {side: max(t[side]["max_abs_logprob_diff"] for t in per_task.values()) for side in scorers},
            "options_over_1e-5": {side: f"{sum(t[side]['options_over_1e-5'] for t in per_task.values())} of {sum(t[side]['options'] for t in per_task.values())}" for side in scorers},
            "max_diff_in_float32_steps": {side: max(t[side]["max_diff_in_float32_steps"] for t in per_task.values()) for side in scorers},
            "acc_and_acc_norm_equal_per_item": {side: all(t[side]["acc_and_acc_norm_equal_per_item"] for t in per_task.values()) for side in scorers},
            "items_per_s": rates["wall"],
            "items_per_s_every_repeat": every_repeat,
            "items_per_cpu_s": rates["cpu"],
            "speedup_over_faster_lm_eval": speedup,
            "target": "ours >= 5x lm-eval items/s",
            "target_met": speedup["wall"]["ours"] >= 5 and speedup["cpu"]["ours"] >= 5,
        },
        "bits_per_byte_test_bin": {
            "documents": len(texts),
            "ours": lm_ours["metrics"]["bits_per_byte"]["value"],
            "lm_eval": harness_bpb,
            "abs_diff": abs(lm_ours["metrics"]["bits_per_byte"]["value"] - harness_bpb),
            "seconds": {"ours": round(ours_s, 3), f"lm_eval_batch{max(harnesses)}": round(theirs_s, 3)},
        },
        "generation": measure_generation(args, ours, hf_dir, records),
    }
    print(f"vocabulary {vocab:,}: {n_items} items, max|Δ| {result['all_tasks']['max_abs_logprob_diff']}, items/s {rates['wall']}, per CPU-s {rates['cpu']}, speedup {speedup}")
    print(f"items/s every repeat: {every_repeat}")
    print(f"bits per byte on test.bin: ours {result['bits_per_byte_test_bin']['ours']:.4f}, lm-eval {harness_bpb:.4f}")
    return result


def measure_generation(args, ours: TransformerLM, hf_dir: Path, records: list[dict]) -> dict:
    """Greedy tokens, ours batched against transformers' generate, interleaved (see the module doc)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    prompts = [doc_to_text(r) for r in benchmark_records(records, "pubmedqa")[0][: args.generation_items]]
    n_new = args.max_new_tokens
    kept = [ours.encode(p)[-(ours.max_length - n_new) :] for p in prompts]  # what ours keeps of each prompt

    def until_eos(tokens: list[int]) -> list[int]:
        return tokens[: tokens.index(ours.eos_token_id)] if ours.eos_token_id in tokens else tokens

    @torch.no_grad()
    def hf_generate(batch_size: int) -> list[list[int]]:
        new = []
        for start in range(0, len(kept), batch_size):
            rows = kept[start : start + batch_size]
            width = max(map(len, rows))
            ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left padding, as transformers wants
            attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            out = hf.generate(ids, attention_mask=attention, max_new_tokens=n_new, do_sample=False, num_beams=1,
                              eos_token_id=ours.eos_token_id, pad_token_id=0)
            new += [until_eos(row[width:].tolist()) for row in out]
        return new

    sides = {"ours": lambda: ours.greedy(prompts, n_new)} | {f"hf_generate_batch{b}": (lambda b=b: hf_generate(b)) for b in args.hf_batch_sizes}
    tokens: dict[str, list] = {}
    times: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side, run in sides.items():
            tokens[side], wall, cpu = timed(run)
            times[side].append((wall, cpu))
    generated = sum(len(t) for t in tokens["ours"])
    rate = {clock: {side: round(generated / statistics.median(t[k] for t in runs), 1) for side, runs in times.items()} for k, clock in enumerate(("wall", "cpu"))}
    speedup = {clock: round(r["ours"] / max(v for side, v in r.items() if side != "ours"), 2) for clock, r in rate.items()}
    result = {
        "prompts": len(prompts),
        "max_new_tokens": n_new,
        "tokens_generated": generated,
        "same_tokens_as_ours": {side: tokens[side] == tokens["ours"] for side in sides if side != "ours"},
        "tokens_per_s": rate["wall"],
        "tokens_per_s_every_repeat": {side: [round(generated / w, 1) for w, _ in runs] for side, runs in times.items()},
        "tokens_per_cpu_s": rate["cpu"],
        "speedup_over_faster_hf_generate": speedup,
        "target": "ours >= 3x transformers generate, the same tokens",
        "target_met": speedup["wall"] >= 3 and speedup["cpu"] >= 3 and all(tokens[side] == tokens["ours"] for side in sides),
    }
    print(f"generation: {generated} tokens, same tokens {result['same_tokens_as_ours']}, tokens/s {rate['wall']}, per CPU-s {rate['cpu']}, speedup {speedup}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / ".medlm" / "bench-evaluate")
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 32000], help="one model per vocabulary size")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--harness-batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's choice)")
    parser.add_argument("--generation-items", type=int, default=40, help="PubMedQA test prompts answered")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer (the demo's)")
    parser.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[1, 8], help="transformers generate: prompts per call")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_CACHE", str(args.work / "datasets-cache"))
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # one truncation warning per long request otherwise

    load_before = os.getloadavg()
    by_vocab = {f"vocab={vocab}": measure(args, args.work / f"vocab-{vocab}", vocab) for vocab in args.vocab}
    load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    print(write_result("evaluate", {"load_average_1_5_15min": load, "by_vocabulary": by_vocab}))


if __name__ == "__main__":
    main()
