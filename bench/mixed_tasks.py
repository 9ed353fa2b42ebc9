"""Mixed-task batches (S-LoRA style): one batch whose rows belong to different tasks, through moa's grouped kernels,
against a loop over tasks and against PEFT's ``adapter_names`` mixed batch; same adapters, same rows.

    python bench/mixed_tasks.py                      # MiniLM (pretrained), T = 8 task adapters, r = 8, 64 rows x 32 tokens
    python bench/mixed_tasks.py --tasks 4 --rows 32 --reps 5

T PEFT LoRA adapters (random, non-zero B) on query/value of all-MiniLM-L6-v2 are saved as PEFT folders and loaded
into moa with ``moa.from_peft`` (static router keyed on ``task_ids``): the same weights in both libraries. Each row
of the batch gets a task (round robin, shuffled). Timed in one run, interleaved, best of ``--reps`` (thread CPU
time with ``--cpu-time``), inference mode:

* ``moa mixed``: the whole batch in one forward, each row routed by its task id;
* ``moa loop``: one forward per task over that task's rows (what a server without per-row routing does);
* ``PEFT adapter_names``: the whole batch with ``adapter_names=[...]`` (PEFT's mixed-batch inference).

The outputs of the three are checked to agree first (max abs difference printed).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch


def build(tasks: int, rank: int, folder: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    import moa
    from moa.pretrained import minilm_dir

    base = AutoModel.from_pretrained(str(minilm_dir())).eval()
    names = [f"task{t}" for t in range(tasks)]
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["query", "value"], lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(folder))  # PEFT writes each named adapter to folder/<name>
    folders = {name: next(p.parent for p in folder.rglob("adapter_config.json") if p.parent.name == name)
               for name in names}
    moa_model = moa.from_peft(copy.deepcopy(base), {n: str(p) for n, p in folders.items()},
                              router_options={"key": "task_ids"}).eval()
    return peft_model.eval(), moa_model, names


def timer(cpu: bool):
    return time.thread_time if cpu else time.perf_counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpu-time", action="store_true", help="thread CPU time instead of wall time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model, moa_model, names = build(args.tasks, args.rank, Path(tmp))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (args.rows, args.tokens), generator=g)
    mask = torch.ones_like(ids)
    task_ids = torch.arange(args.rows) % args.tasks
    task_ids = task_ids[torch.randperm(args.rows, generator=g)]
    adapter_names = [names[t] for t in task_ids.tolist()]

    def moa_mixed():
        return moa_model(input_ids=ids, attention_mask=mask, task_ids=task_ids).last_hidden_state

    def moa_loop():
        out = torch.empty(args.rows, args.tokens, moa_model.model.config.hidden_size)
        for t in range(args.tasks):
            rows = (task_ids == t).nonzero().squeeze(1)
            out[rows] = moa_model(input_ids=ids[rows], attention_mask=mask[rows], task_ids=task_ids[rows]).last_hidden_state
        return out

    def peft_mixed():
        return peft_model(input_ids=ids, attention_mask=mask, adapter_names=adapter_names).last_hidden_state

    runs = {"moa mixed": moa_mixed, "moa loop over tasks": moa_loop, "PEFT adapter_names": peft_mixed}
    with torch.inference_mode():
        reference = peft_mixed()
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
        print(f"{'adapters off':22s} max |out - PEFT| = {(plain - reference).abs().max().item():.2e}  (what the adapters add)")
        for name, fn in runs.items():
            print(f"{name:22s} max |out - PEFT| = {(fn() - reference).abs().max().item():.2e}")
        clock = timer(args.cpu_time)
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.reps):
            for name, fn in runs.items():
                start = clock()
                fn()
                best[name] = min(best[name], clock() - start)
    unit = "CPU ms" if args.cpu_time else "ms"
    print(f"\nMiniLM, T={args.tasks} adapters r={args.rank} on query/value, {args.rows} rows x {args.tokens} tokens, "
          f"{args.threads} thread(s), best of {args.reps} ({unit}):")
    for name, seconds in best.items():
        print(f"  {name:22s} {seconds * 1e3:8.1f} {unit}   {args.rows / seconds:8.0f} rows/s   "
              f"{seconds / best['moa mixed']:.2f}x moa mixed")


if __name__ == "__main__":
    main()
