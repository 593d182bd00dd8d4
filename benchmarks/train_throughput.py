"""Training throughput: our Transformer vs transformers' LlamaForCausalLM with the same config.

    python -m benchmarks.train_throughput --preset tiny --batch 8 --steps 10
    python -m benchmarks.train_throughput --preset base --batch 16 --compile --device cuda

For each model: tokens/s, step time, MFU (6·N + attention FLOPs per token, against --peak-flops;
989e12 by default on CUDA: H100 SXM dense bf16; "n/a" on CPU unless given), and peak memory
(CUDA max_memory_allocated, or the process's peak RSS on CPU). Each model runs in its own
process, so the peaks do not mix; the two alternate, ``--repeats`` rounds, and each figure is the
median round with every round beside it. Same batch, precision (bf16 autocast on CUDA, fp32 on
CPU), optimizer (AdamW) and random tokens for both. Writes benchmarks/results/train_throughput_<device>.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import resource
import time
from pathlib import Path

from benchmarks.common import write_result

H100_BF16_PEAK = 989e12


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return platform.processor() or "cpu"


def measure(which: str, args: argparse.Namespace) -> dict:
    """Train ``which`` ("medlm" or "hf_llama") for args.steps timed steps; runs in a fresh process."""
    import torch

    from model.export_hf import hf_config
    from model.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset, **({"context_length": args.context} if args.context else {}))
    device = torch.device(args.device)
    ours = Transformer(cfg)
    flops_per_token = ours.flops_per_token(cfg.context_length)
    if which == "medlm":
        model = ours
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(hf_config(cfg), attn_implementation="sdpa")
    del ours
    model = model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    step_model = torch.compile(model) if args.compile else model
    x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.context_length), device=device)
    y = torch.roll(x, -1, dims=1)
    bf16 = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if which == "medlm":
                _, loss = step_model(x, y)
            else:  # labels are shifted inside the model, so pass the inputs
                loss = step_model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    tokens_per_s = args.batch * cfg.context_length * args.steps / elapsed
    peak = args.peak_flops
    if device.type == "cuda":
        memory = {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "memory_kind": "cuda max_memory_allocated"}
    else:  # ru_maxrss is in KiB on Linux
        memory = {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "memory_kind": "process peak RSS"}
    return {
        "params": params,
        "flops_per_token": flops_per_token,
        "tokens_per_s": round(tokens_per_s, 1),
        "step_s": round(elapsed / args.steps, 4),
        "mfu": round(tokens_per_s * flops_per_token / peak, 4) if peak else "n/a",
        **memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=None, help="default: the preset's context_length")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, the two models alternating")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--peak-flops", type=float, default=None, help="for MFU; default 989e12 on CUDA, none on CPU")
    args = parser.parse_args()

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA GPU is visible")
    if args.peak_flops is None and args.device == "cuda":
        args.peak_flops = H100_BF16_PEAK

    spawn = multiprocessing.get_context("spawn")
    rounds: dict[str, list[dict]] = {"medlm": [], "hf_llama": []}
    for round_ in range(args.repeats):  # alternating, so the machine's load falls on both
        for which, done in rounds.items():
            with spawn.Pool(1) as pool:
                done.append(pool.apply(measure, (which, args)))
            print(f"round {round_ + 1} {which:9s} " + " ".join(f"{k}={v}" for k, v in done[-1].items()), flush=True)
    results = {}
    for which, done in rounds.items():
        every = [r["tokens_per_s"] for r in done]
        results[which] = sorted(done, key=lambda r: r["tokens_per_s"])[len(done) // 2] | {"tokens_per_s_every_round": every}
    ours, theirs = results["medlm"], results["hf_llama"]
    ratio = {
        "tokens_per_s": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
        "peak_memory": round(ours["peak_memory_bytes"] / theirs["peak_memory_bytes"], 3),
    }
    print(f"medlm / hf_llama: tokens/s x{ratio['tokens_per_s']}, peak memory x{ratio['peak_memory']}")

    import transformers

    record = {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "precision": "bf16 autocast" if args.device == "cuda" else "fp32",
        "peak_flops": args.peak_flops,
        "settings": vars(args),
        "results": results,
        "ratio_medlm_over_hf": ratio,
    }
    print(f"wrote {write_result(f'train_throughput_{args.device}', record)}")


if __name__ == "__main__":
    main()
