"""Routed generation on the real SmolLM2-135M: prefill time and per-token decode latency against the base model.

    python bench/generation.py            # batch 1 and 16, 32 new tokens, 5 rounds (~15 minutes, loaded 2-core CPU)
    python bench/generation.py --quick    # shorter prompts, 8 new tokens, 1 round: for iterating (< 2 minutes)

Setup: SmolLM2-135M-Instruct (fp32, ``moa.pretrained.resolve_pretrained("smollm2-135m")``), ``generate`` with the
KV cache, greedy, ``min_new_tokens = max_new_tokens`` (every method generates the same number of tokens), the same
left-padded prompts of mixed lengths (16 prompts of 20-120 tokens; batch 1: the median-length one). Adapters: E=4
LoRA experts, r=8, alpha=8 on q_proj and v_proj of all 30 layers (PEFT's default targets for Llama), with random
non-zero A and B so the work is real; the batch of 16 mixes the four tasks (row i: task i % 4).

Methods: ``base``; ``merged LoRA`` (PEFT ``merge_and_unload``: must cost what the base costs); ``PEFT LoRA`` (one
adapter, unmerged); ``PEFT adapter_names`` (mixed batch); ``moa per-row`` (``from_peft`` router static, ``task_ids``);
``moa top-2`` (router topk, 2 of 4); ``moa arrow`` (router arrow, top-2 of 4, when it is registered); ``PEFT loop``
(one ``set_adapter`` + ``generate`` per task group). A logits processor stamps the clock at every generated token:
prefill = call start to the first token, decode = the mean gap between later tokens. Every round runs every method
once (interleaved, so a loaded machine hits them alike); medians over rounds, ratios to the base of the same run.
With one thread (the default) the clock is the thread's CPU time (``--wall`` for wall time).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

N_TASKS, RANK, TARGETS = 4, 8, ["q_proj", "v_proj"]
LAST_TOKENS: dict = {}  # (model, keyword names) -> the tokens its last generate returned
CLOCK = time.thread_time  # one thread: the calling thread's CPU time, steadier than wall time on a loaded machine


class Stamps:
    """A logits processor that records when each token's logits arrive (it changes nothing)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(CLOCK())
        return scores


def load_base(folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)


def sharing_copy(model: nn.Module) -> nn.Module:
    """A new module tree over the same weight tensors (adapters replace modules, never the base weights)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def build_peft(base: nn.Module, folder: Path, seed: int = 0):
    """A PEFT model with adapters t0..t3 (random non-zero factors), each also saved to ``folder/t{i}``."""
    from peft import LoraConfig, get_peft_model

    gen = torch.Generator().manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(sharing_copy(base), config, adapter_name="t0")
    for t in range(1, N_TASKS):
        model.add_adapter(f"t{t}", config)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    model.save_pretrained(str(folder))  # adapter t in folder/t
    model.eval()
    return model


def adapter_folders(folder: Path) -> dict[str, str]:
    return {f"t{t}": str(folder / f"t{t}") for t in range(N_TASKS)}


def prompts(tokenizer, n: int, lo: int, hi: int) -> list[list[int]]:
    text = (
        "The committee met on Tuesday to review the quarterly results of the regional rail network, which carried "
        "more passengers than in any quarter since records began, although delays on the coastal line rose sharply "
        "after the storms in March. Engineers proposed replacing the signalling on the busiest section, and the "
        "finance director warned that ticket revenue would not cover the cost without a grant from the ministry. "
    ) * 4
    ids = tokenizer(text)["input_ids"]
    lengths = [round(lo + (hi - lo) * i / max(n - 1, 1)) for i in range(n)]
    return [ids[i * 3 : i * 3 + length] for i, length in enumerate(lengths)]  # distinct starts, mixed lengths


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def timed_generate(model, ids, mask, new_tokens: int, **kwargs) -> tuple[float, float]:
    """``(prefill seconds, decode seconds in total)`` of one greedy ``generate``."""
    from transformers import LogitsProcessorList

    stamps = Stamps()
    t0 = CLOCK()
    LAST_TOKENS[id(model), tuple(kwargs)] = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        use_cache=True, logits_processor=LogitsProcessorList([stamps]), pad_token_id=0, **kwargs,
    )
    return stamps.times[0] - t0, stamps.times[-1] - stamps.times[0]


def methods(models: dict, tasks: list[int]) -> dict:
    """name -> callable(ids, mask, new_tokens) -> (prefill s, decode s over new_tokens - 1 steps)."""
    peft = models["peft"]
    names = [f"t{t}" for t in tasks]

    def peft_one(ids, mask, n):
        peft.set_adapter("t0")
        return timed_generate(peft, ids, mask, n)

    def peft_loop(ids, mask, n):
        prefill = decode = 0.0
        for t in sorted(set(tasks)):
            rows = torch.tensor([i for i, task in enumerate(tasks) if task == t])
            sub_mask = mask[rows]
            keep = sub_mask.any(0).nonzero().min()  # drop the group's all-padding columns
            peft.set_adapter(f"t{t}")
            p, d = timed_generate(peft, ids[rows][:, keep:], sub_mask[:, keep:], n)
            prefill, decode = prefill + p, decode + d
        return prefill, decode

    task_ids = torch.tensor(tasks)
    runs = {
        "base": lambda ids, mask, n: timed_generate(models["base"], ids, mask, n),
        "merged LoRA": lambda ids, mask, n: timed_generate(models["merged"], ids, mask, n),
        "PEFT LoRA (1 adapter)": peft_one,
        "PEFT adapter_names": lambda ids, mask, n: timed_generate(peft, ids, mask, n, adapter_names=names),
        "moa per-row (static)": lambda ids, mask, n: timed_generate(models["static"], ids, mask, n, task_ids=task_ids),
        "moa top-2 of 4": lambda ids, mask, n: timed_generate(models["topk"], ids, mask, n),
    }
    if "arrow" in models:
        runs["moa arrow top-2 of 4"] = lambda ids, mask, n: timed_generate(models["arrow"], ids, mask, n)
    runs["PEFT loop over tasks"] = peft_loop
    return runs


def measure(runs: dict, ids, mask, new_tokens: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Median ``(prefill s, decode s per token)`` of each method over interleaved rounds (one warm-up round)."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for round_ in range(rounds + 1):
        for name, run in runs.items():
            prefill, decode = run(ids, mask, new_tokens)
            if round_:
                samples[name].append((prefill, decode / (new_tokens - 1)))
    return {name: (statistics.median(p for p, _ in s), statistics.median(d for _, d in s)) for name, s in samples.items()}


def table(results: dict[str, tuple[float, float]], batch: int) -> list[str]:
    base_prefill, base_decode = results["base"]
    lines = [f"{'method':24s} {'prefill':>10s} {'x base':>7s} {'decode/token':>13s} {'x base':>7s} {'tokens/s':>9s}"]
    for name, (prefill, decode) in results.items():
        lines.append(
            f"{name:24s} {prefill * 1e3:8.1f}ms {prefill / base_prefill:7.2f} {decode * 1e3:11.2f}ms "
            f"{decode / base_decode:7.2f} {batch / decode:9.1f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="prompts of 20-40 tokens, 8 new tokens, 1 round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wall", action="store_true", help="wall time (the default with one thread: its CPU time)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; --quick 1)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated (default 32; --quick 8)")
    parser.add_argument("--batches", default="1,16", help="batch sizes, comma-separated")
    parser.add_argument("--only", default=None, help="comma-separated substrings: time only the methods whose name "
                        "contains one (the base always runs)")
    parser.add_argument("--out", default=None, help="also write the report here (default: bench/results/"
                        "generation.txt for a full run, nothing for --quick)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.threads > 1 or args.wall:
        global CLOCK
        CLOCK = time.perf_counter
    torch.manual_seed(0)
    rounds = args.rounds or (1 if args.quick else 5)
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    lo, hi = (20, 40) if args.quick else (20, 120)

    import moa
    from moa.pretrained import resolve_pretrained
    from moa.routers import ROUTERS
    from transformers import AutoTokenizer

    folder = resolve_pretrained("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = load_base(folder)
    with tempfile.TemporaryDirectory() as tmp:
        peft = build_peft(base, Path(tmp) / "adapters")
        adapters = adapter_folders(Path(tmp) / "adapters")
        models = {"base": base, "peft": peft}
        from peft import PeftModel

        merged = PeftModel.from_pretrained(load_base(folder), adapters["t0"]).merge_and_unload()
        models["merged"] = merged.eval()
        models["static"] = moa.from_peft(sharing_copy(base), adapters, router="static",
                                         router_options={"key": "task_ids"}).eval()
        models["topk"] = moa.from_peft(sharing_copy(base), adapters, router="topk", top_k=2).eval()
        arrow_note = "arrow: router 'arrow' is not registered in moa.routers.ROUTERS: skipped"
        if "arrow" in ROUTERS:
            models["arrow"] = moa.from_peft(sharing_copy(base), adapters, router="arrow", top_k=2).eval()
            arrow_note = "arrow: moa.from_peft(..., router='arrow', top_k=2)"
    for model in models.values():
        model.requires_grad_(False)

    rows = prompts(tokenizer, 16, lo, hi)
    command = "python bench/generation.py " + " ".join(sys.argv[1:])
    report = [
        f"$ {command}".rstrip(),
        f"torch {torch.__version__}, {args.threads} thread(s) ({'wall' if CLOCK is time.perf_counter else 'thread CPU'} time), SmolLM2-135M fp32, KV cache, greedy, {new_tokens} new "
        f"tokens, E={N_TASKS} LoRA r={RANK} on {'/'.join(TARGETS)} x 30 layers, median of {rounds} interleaved rounds",
        arrow_note,
    ]
    print("\n".join(report), flush=True)
    for batch in [int(b) for b in args.batches.split(",")]:
        chosen = [rows[len(rows) // 2]] if batch == 1 else [rows[i % len(rows)] for i in range(batch)]
        tasks = [0] if batch == 1 else [i % N_TASKS for i in range(batch)]
        ids, mask = left_pad(chosen, tokenizer.pad_token_id or 0)
        runs = methods(models, tasks)
        if args.only:
            keep = args.only.split(",")
            runs = {name: run for name, run in runs.items() if name == "base" or any(k in name for k in keep)}
        with torch.inference_mode():
            results = measure(runs, ids, mask, new_tokens, rounds)
        lengths = sorted(len(r) for r in chosen)
        section = ["", f"## batch {batch} (prompt tokens {lengths[0]}-{lengths[-1]}; tasks {sorted(set(tasks))})",
                   *table(results, batch)]
        moa_rows = LAST_TOKENS.get((id(models["static"]), ("task_ids",)))
        peft_rows = LAST_TOKENS.get((id(models["peft"]), ("adapter_names",)))
        if moa_rows is not None and peft_rows is not None:
            same = (moa_rows == peft_rows).all(1).sum().item()
            section.append(f"moa per-row generated the same tokens as PEFT adapter_names in {same}/{batch} rows")
        print("\n".join(section), flush=True)
        report += section
    out = args.out or (None if args.quick else "bench/results/generation.txt")
    if out:
        Path(out).write_text("\n".join(report) + "\n")
        print(f"written to {out}")


if __name__ == "__main__":
    main()
