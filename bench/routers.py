"""Routers side by side on one seeded task: FlyLoRA vs LoRA, ReMix (RLOO) vs top-k softmax routing.

    python bench/routers.py                          # about 6-10 minutes on the shared 2-core CPU
    python bench/routers.py --steps 100 --merge-methods   # a quick look, no merging table

Task (synthetic, seeded, the same data for every method): binary classification of 16-token sequences over a
401-token vocabulary. Each sequence belongs to one of 4 domains: 8 of its tokens come from the domain's own
40-token range, 5 are polarity tokens from the domain's own positive or negative set (5 tokens each; the label is
the majority), and 3 are distractors from other domains' polarity sets. A linear head on mean-pooled features is
misled by the distractors; an adapter has to condition polarity on the domain. The encoder is a frozen, randomly
initialised tiny BERT (hidden 64, 2 layers, 4 heads); adapters go on query, value and the two FFN linears; a
linear head (``moa.lightning.ClassificationHead``, mean pooling) trains with them. Every method trains the same
steps and batch with AdamW at one learning rate through its module's own ``training_step`` (``MoAModule``;
``RLOOModule`` for ReMix, which sees each example M = 4 times per step).

Printed, per method: held-out accuracy (eval mode: deterministic top-k routing), trainable and per-token activated
adapter parameters, the effective support size (``exp(entropy)`` of each token's normalised routing weights,
mean over held-out tokens and layers), the router's own support (``exp(entropy(softmax(gate x)))`` over all
experts), and the median training step time relative to LoRA r=2's. Then the RLOO step is timed against a plain
top-k step, interleaved, at the same examples (M times the rows) and at the same rows (B / M examples x M draws).

Last, multi-task merging: task A uses domains 0-1, task B domains 2-3 (disjoint inputs, same rule). Each method
trains one adapter and head per task; the two adapters are averaged (FlyLoRA: B and d over the shared frozen A,
:func:`moa.routers.flylora.average_flylora`; LoRA: the exact mean of the delta weights as one rank-2r LoRA, and the
element-wise mean of A and B, what FlyLoRA's merge script does) and each task is evaluated with its own head:
without adapters, with its own adapter, with the merged one; "gain kept" = (merged - none) / (own - none).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch
from torch import nn
from transformers import BertConfig, BertModel

import moa
from moa.lightning import ClassificationHead, MoAModule
from moa.rloo import RLOOModule
from moa.routers.flylora import average_flylora
from moa.routers.remix import effective_support_size

warnings.filterwarnings("ignore")
DOMAINS, DOMAIN_SPAN, N_DOMAIN, POLAR, N_OWN, N_DISTRACT = 4, 40, 8, 5, 5, 3
LENGTH = N_DOMAIN + N_OWN + N_DISTRACT
VOCAB = DOMAINS * (DOMAIN_SPAN + 2 * POLAR)
TARGETS = ["query", "value", "intermediate.dense", "output.dense"]
HIDDEN = 64


def make_data(n: int, seed: int, domains=tuple(range(DOMAINS))) -> dict[str, torch.Tensor]:
    """Token 0 is unused; domain d owns tokens [1 + d*40, 1 + d*40 + 40) and, after all domain ranges, a positive
    and a negative set of 5 tokens each. The examples come from ``domains``."""
    g = torch.Generator().manual_seed(seed)
    domain = torch.tensor(domains)[torch.randint(0, len(domains), (n,), generator=g)]
    words = 1 + domain[:, None] * DOMAIN_SPAN + torch.randint(0, DOMAIN_SPAN, (n, N_DOMAIN), generator=g)
    polar_start = 1 + DOMAINS * DOMAIN_SPAN

    def polar_tokens(dom: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        sign = torch.randint(0, 2, (n, count), generator=g)  # 1 = from the positive set
        token = polar_start + dom[:, None] * 2 * POLAR + (1 - sign) * POLAR + torch.randint(0, POLAR, (n, count), generator=g)
        return token, sign

    own, own_sign = polar_tokens(domain, N_OWN)
    other = (domain[:, None] + torch.randint(1, DOMAINS, (n, N_DISTRACT), generator=g)) % DOMAINS
    distract = polar_start + other * 2 * POLAR + torch.randint(0, 2 * POLAR, (n, N_DISTRACT), generator=g)
    tokens = torch.cat([words, own, distract], 1)
    tokens = tokens.gather(1, torch.rand(n, LENGTH, generator=g).argsort(1))
    label = (own_sign.sum(1) > N_OWN // 2).long()
    return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": label}


def batches(data: dict, batch_size: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = data["labels"].shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g)
        yield {k: v[idx] for k, v in data.items()}


def base_model() -> BertModel:
    torch.manual_seed(1234)  # one frozen encoder for every method and seed
    return BertModel(BertConfig(vocab_size=VOCAB + 1, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=2 * HIDDEN, max_position_embeddings=LENGTH,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


# name -> (MoAConfig kwargs, module kind); LoRA is the static router on a single expert.
METHODS = {
    "head only": None,
    "LoRA r=2": (dict(n_experts=1, r=2, alpha=4, router="static"), "plain"),
    "LoRA r=16": (dict(n_experts=1, r=16, alpha=32, router="static"), "plain"),
    "FlyLoRA R=16 k=4": (dict(n_experts=16, r=16, alpha=32, top_k=4, router="flylora"), "plain"),
    "top-k n=8 r=4 k=2": (dict(n_experts=8, r=4, alpha=8, top_k=2, router="topk"), "plain"),
    "ReMix n=8 r=4 k=2 M=4": (dict(n_experts=8, r=4, top_k=2, alpha=8, router="remix"), "rloo"),
    "ReMix seq n=8 r=4 k=2 M=4": (dict(n_experts=8, r=4, top_k=2, alpha=8, router="remix",
                                       router_options={"granularity": "sequence"}), "rloo"),
}
M_SAMPLES = 4


def build(method: str, seed: int, lr: float):
    torch.manual_seed(seed)
    spec = METHODS[method]
    model = base_model()
    head = ClassificationHead(HIDDEN, 2, pooling="mean")
    if spec is None:
        return None, head, _HeadOnly(model, head, lr)
    config, kind = spec
    moa_model = moa.attach(model, moa.MoAConfig(target_modules=TARGETS, **config))
    if kind == "rloo":
        module = RLOOModule(moa_model, n_samples=M_SAMPLES, head=head, lr=lr, router_lr=lr)
    else:
        module = MoAModule(moa_model, head=head, lr=lr, router_lr=lr)
    return moa_model, head, module


class _HeadOnly(nn.Module):
    """The floor: the frozen encoder with only the head trained."""

    def __init__(self, model, head, lr):
        super().__init__()
        self.model, self.head, self.lr = model, head, lr
        for p in model.parameters():
            p.requires_grad_(False)

    def training_step(self, batch, _):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return nn.functional.cross_entropy(self.head(out.last_hidden_state, batch["attention_mask"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.head.parameters(), lr=self.lr)


def with_routing(batch: dict, moa_model) -> dict:
    if moa_model is not None and moa_model.config.router == "static":
        return {**batch, "expert_ids": torch.zeros(batch["labels"].shape[0], dtype=torch.long)}
    return batch


def train(method: str, seed: int, data: dict, steps: int, batch_size: int, lr: float):
    moa_model, head, module = build(method, seed, lr)
    optimizer = module.configure_optimizers()
    if moa_model is not None:  # FlyLoRA's bias update follows this loop's optimizer steps
        moa.follow_optimizer(moa_model, optimizer)
    (moa_model or module.model).train()
    times = []
    for batch in batches(data, batch_size, steps, seed):
        t0 = time.perf_counter()
        loss = module.training_step(with_routing(batch, moa_model), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return moa_model, head, module, statistics.median(times[steps // 5 :])


@torch.no_grad()
def evaluate(moa_model, head, module, data: dict) -> dict[str, float]:
    """Accuracy, and the routing statistics of the same pass (eval mode)."""
    encoder = moa_model if moa_model is not None else module.model
    encoder.eval()
    records = {"ess": [], "router": []}
    hooks = []
    if moa_model is not None:
        for layer in moa_model.moa_layers().values():
            hooks.append(layer.router.register_forward_hook(_support_hook(records)))
    batch = with_routing(data, moa_model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = encoder(**inputs)
    accuracy = (head(out.last_hidden_state, batch["attention_mask"]).argmax(-1) == batch["labels"]).float().mean()
    for h in hooks:
        h.remove()
    encoder.train()
    mean = lambda xs: float(torch.stack(xs).mean()) if xs else float("nan")  # noqa: E731
    return {"accuracy": float(accuracy), "ess": mean(records["ess"]), "router": mean(records["router"])}


def _support_hook(records):
    def hook(router, args, routing):
        x = args[0]
        records["ess"].append(effective_support_size(routing.weights))
        gate = getattr(router, "gate", None)
        if gate is not None:
            q = gate(x.reshape(-1, x.shape[-1])).float().softmax(-1)
            records["router"].append((-(q * q.clamp_min(1e-30).log()).sum(-1)).exp().mean())
    return hook


def adapter_params(moa_model) -> tuple[int, int]:
    """(trainable adapter and router parameters, adapter parameters a token activates)."""
    if moa_model is None:
        return 0, 0
    total = sum(p.numel() for group in moa_model.param_groups().values() for p in group)
    active = 0
    config = moa_model.config
    for layer in moa_model.moa_layers().values():
        d_in, d_out = layer.in_features, layer.out_features
        if config.router == "flylora":
            active += d_out * config.top_k  # only B's selected columns train; A is frozen
        else:
            k = 1 if config.router == "static" else config.top_k
            active += k * config.r * (d_in + d_out) + (d_in * config.n_experts if config.router != "static" else 0)
    return total, active


def time_rloo(data: dict, batch_size: int, lr: float, reps: int) -> dict[str, float]:
    """Median step times, interleaved: plain top-k step on B examples, RLOO step on B examples (M x B rows),
    RLOO step on B / M examples (B rows)."""
    plain = build("top-k n=8 r=4 k=2", 0, lr)
    rloo = build("ReMix n=8 r=4 k=2 M=4", 0, lr)
    runs = {
        "plain": (plain, batch_size),
        "rloo_same_examples": (rloo, batch_size),
        "rloo_same_rows": (rloo, batch_size // M_SAMPLES),
    }
    optimizers = {name: spec[2].configure_optimizers() for name, (spec, _) in runs.items()}
    times = {name: [] for name in runs}
    stream = batches(data, batch_size, 3 * (reps + 2), 99)
    for rep in range(reps + 2):
        for name, ((moa_model, _, module), size) in runs.items():
            batch = {k: v[:size] for k, v in next(stream).items()}
            t0 = time.perf_counter()
            loss = module.training_step(batch, 0)
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


MERGE_TASKS = {"A": (0, 1), "B": (2, 3)}  # the domains each task's data comes from


def merging(methods: list[str], steps: int, batch_size: int, lr: float, seed: int) -> list[tuple]:
    """Per method and merge: (name, {task: (no adapter, own adapter, merged adapters)}), each task with its own head."""
    tasks = {name: (make_data(4000, 10 + i, domains=doms), make_data(2000, 20 + i, domains=doms))
             for i, (name, doms) in enumerate(MERGE_TASKS.items())}
    rows = []
    for method in methods:
        trained = {task: train(method, seed, tasks[task][0], steps, batch_size, lr) for task in tasks}
        own, bare = {}, {}
        for task, (moa_model, head, module, _) in trained.items():
            own[task] = evaluate(moa_model, head, module, tasks[task][1])["accuracy"]
            with moa_model.disable_adapters():
                bare[task] = evaluate(moa_model, head, module, tasks[task][1])["accuracy"]
        sources = [trained[t][0] for t in tasks]
        for merge_kind in (("mean of B, d",) if "FlyLoRA" in method else ("mean of BA", "mean of A, B")):
            result = {}
            for task, (moa_model, head, module, _) in trained.items():
                target = copy.deepcopy(moa_model)
                if merge_kind == "mean of B, d":
                    average_flylora(target, sources)
                else:
                    _merge_lora(target, sources, exact=merge_kind == "mean of BA")
                result[task] = (bare[task], own[task], evaluate(target, head, module, tasks[task][1])["accuracy"])
            rows.append((f"{method} ({merge_kind})", result))
    return rows


@torch.no_grad()
def _merge_lora(target, sources, exact: bool) -> None:
    """LoRA merge into ``target``: ``exact`` = the mean delta weight as one LoRA of rank T*r (A stacked, B/T
    stacked), else the element-wise mean of A and of B (what FlyLoRA's merge script does for every tensor)."""
    for name, layer in target.moa_layers().items():
        parts = [s.moa_layers()[name].pool for s in sources]
        a = [p.lora_A for p in parts]
        b = [p.lora_B for p in parts]
        if exact:
            pool = type(layer.pool)(layer.in_features, layer.out_features, 1, layer.pool.r * len(parts),
                                    alpha=layer.pool.scaling * layer.pool.r * len(parts))
            pool.lora_A.copy_(torch.cat(a, 0))
            pool.lora_B.copy_(torch.cat(b, 1) / len(parts))
            layer.pool = pool
        else:
            layer.pool.lora_A.copy_(torch.stack(a).mean(0))
            layer.pool.lora_B.copy_(torch.stack(b).mean(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--timing-reps", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--merge-methods", nargs="*", default=["LoRA r=2", "FlyLoRA R=16 k=4"],
                        help="methods of the merging table (none: skip it)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(1)  # a tiny model: one thread is faster than two on a shared 2-core CPU
    start = time.time()
    train_data, val_data = make_data(8000, 1), make_data(2000, 2)
    print(f"task: {DOMAINS} domains, train 8000 / held-out 2000, {args.steps} steps x batch "
          f"{args.batch_size}, AdamW lr {args.lr}, seeds {args.seeds}, torch threads {torch.get_num_threads()}\n")

    results = {}
    for method in args.methods:
        accs, ess, router, step = [], [], [], []
        for seed in args.seeds:
            moa_model, head, module, step_time = train(method, seed, train_data, args.steps, args.batch_size, args.lr)
            stats = evaluate(moa_model, head, module, val_data)
            accs.append(stats["accuracy"]), ess.append(stats["ess"]), router.append(stats["router"]), step.append(step_time)
        results[method] = (accs, statistics.mean(ess), statistics.mean(router), statistics.median(step), adapter_params(moa_model))
    lora_step = results.get("LoRA r=2", next(iter(results.values())))[3]
    header = "| method | held-out accuracy (per seed) | trainable | activated / token | ESS weights | ESS router q | step ms | step / LoRA r=2 |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for method, (accs, ess, router, step, (total, active)) in results.items():
        per_seed = ", ".join(f"{a:.3f}" for a in accs)
        fmt = lambda v: "-" if v != v else f"{v:.2f}"  # noqa: E731
        print(f"| {method} | {statistics.mean(accs):.3f} ({per_seed}) | {total} | {active} | {fmt(ess)} | {fmt(router)} | "
              f"{step * 1e3:.1f} | {step / lora_step:.2f} |")

    timing = time_rloo(train_data, args.batch_size, args.lr, args.timing_reps)
    print(f"\nRLOO step cost (M={M_SAMPLES}, interleaved medians over {args.timing_reps} steps):")
    print("| step | ms | / plain top-k step |\n|---|---|---|")
    for name, label in (("plain", f"top-k, {args.batch_size} examples"),
                        ("rloo_same_examples", f"ReMix RLOO, {args.batch_size} examples x {M_SAMPLES} draws"),
                        ("rloo_same_rows", f"ReMix RLOO, {args.batch_size // M_SAMPLES} examples x {M_SAMPLES} draws")):
        print(f"| {label} | {timing[name] * 1e3:.1f} | {timing[name] / timing['plain']:.2f} |")

    if args.merge_methods:
        print(f"\nMulti-task merging (task A: domains {MERGE_TASKS['A']}, task B: domains {MERGE_TASKS['B']}; "
              f"seed {args.seeds[0]}; accuracy with the task's own head):")
        print("| adapters (merge) | A: none / own / merged | B: none / own / merged | gain kept A | gain kept B |")
        print("|---|---|---|---|---|")
        for name, result in merging(args.merge_methods, args.steps, args.batch_size, args.lr, args.seeds[0]):
            cells = [" / ".join(f"{v:.3f}" for v in result[t]) for t in MERGE_TASKS]
            kept = [(m - b) / (o - b) if o > b else float("nan") for b, o, m in (result[t] for t in MERGE_TASKS)]
            print(f"| {name} | {cells[0]} | {cells[1]} | {kept[0]:.2f} | {kept[1]:.2f} |")
    print(f"\ntotal time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
