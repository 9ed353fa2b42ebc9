"""Step-time cost of drawing Poly / MHR's relaxed-Bernoulli training noise per example instead of per task.

    python bench/poly_noise.py            # ~5 minutes on the shared 2-core CPU (1 thread)
    python bench/poly_noise.py --quick    # a smoke run

Per example (what moa does, as mttl and HF PEFT) the router mixes one adapter per example: the grouped kernel runs B
adapters of T tokens each. Per task (moa before issue 15) it mixes one adapter per task present in the batch. Same
model, same batch, same weights; one training step = forward + backward of the whole model (frozen base, adapters
on every layer's query, value, attention output and FFN output). The per-task variant is the old grouping,
patched in here (it is not an option of the router). Modes are interleaved round robin; medians of ``--reps``, of
wall time and of this process's CPU time (with ``--threads 1`` the CPU time is the work done, and it holds up
when other jobs share the cores, which wall time does not).

Backbone: a randomly initialised BERT with all-MiniLM-L6-v2's shape (6 layers, hidden 384, FFN 1536; nothing is
downloaded), as in ``bench/multitask.py``. Batches: one task for all examples (the largest difference: 1 adapter vs
B) and ``--mixed-tasks`` tasks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import BertConfig, BertModel

import moa
from moa.transfer import task_routers

TARGETS = r"encoder\.layer\.\d+\.(attention\.self\.(query|value)|attention\.output\.dense|output\.dense)"


def per_task_noise(model: moa.MoAModel) -> None:
    """Patch the old behaviour in: one draw (and one adapter) per task present, even in training."""
    for router in task_routers(model).values():
        router._example_plan = lambda ctx, lead, device, r=router: (*r._task_plan(ctx, lead, device), ("tasks", lead))


def build(args, router: str, per_task: bool, impl: str) -> moa.MoAModel:
    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                intermediate_size=1536, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0))
    options = {"n_tasks": args.tasks, **({"n_heads": args.heads} if router == "mhr" else {})}
    model = moa.attach(base, moa.MoAConfig(n_experts=args.skills, r=args.rank, router=router, impl=impl,
                                           target_modules=TARGETS, router_options=options)).train()
    if per_task:
        per_task_noise(model)
    return model


def step(model, ids, tasks) -> None:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, task_ids=tasks).last_hidden_state
    out.pow(2).mean().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=32, help="examples per batch")
    parser.add_argument("--seq", type=int, default=8, help="tokens per example (bench/multitask.py: 7)")
    parser.add_argument("--skills", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8, help="MHR heads")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--mixed-tasks", type=int, default=8, help="tasks in the mixed batch")
    parser.add_argument("--impls", default="auto,grouped", help="kernel implementations to time, comma-separated")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.reps, args.impls = 8, 2, "auto"
    torch.set_num_threads(args.threads)
    print("command: python " + " ".join(sys.argv))
    print(f"batch {args.batch} x {args.seq} tokens, K={args.skills} skills, r={args.rank}, MHR h={args.heads}, "
          f"{args.threads} threads, fp32 CPU, medians of {args.reps} forward+backward steps\n")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=g)
    batches = {"1 task": torch.full((args.batch,), 3),
               f"{args.mixed_tasks} tasks": torch.arange(args.batch) % args.mixed_tasks}
    print("| router | batch | impl | wall: per task / per example (ms) | ratio | CPU: per task / per example (ms) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for router in ("poly", "mhr"):
        for impl in args.impls.split(","):
            models = {"task": build(args, router, True, impl), "example": build(args, router, False, impl)}
            for batch_name, tasks in batches.items():
                wall, cpu = {mode: [] for mode in models}, {mode: [] for mode in models}
                for mode, model in models.items():  # warm-up
                    step(model, ids, tasks)
                for _ in range(args.reps):
                    for mode, model in models.items():
                        start, start_cpu = time.perf_counter(), time.process_time()
                        step(model, ids, tasks)
                        wall[mode].append(time.perf_counter() - start)
                        cpu[mode].append(time.process_time() - start_cpu)
                t, e = (statistics.median(wall[m]) * 1e3 for m in ("task", "example"))
                tc, ec = (statistics.median(cpu[m]) * 1e3 for m in ("task", "example"))
                print(f"| {router} | {batch_name} | {impl} | {t:.0f} / {e:.0f} | {e / t:.2f} | {tc:.0f} / {ec:.0f} | "
                      f"{ec / tc:.2f} |", flush=True)


if __name__ == "__main__":
    main()
