"""Experts from different runs, composed without being told the domain: the tweets on SmolLM2-135M-Instruct.

Per seed: one LoRA expert per domain, each trained in its own `moa fit` run (configs/smollm2-lora.yaml, the real
CLI), exported as a PEFT adapter (`moa.to_peft`), registered in a throw-away MLflow store (`moa expert register`'s
`register_expert`) and read back from its registry URI (`resolve_experts`); one multi-task LoRA on the union of
the experts' rows with as many steps as all the experts together. Then greedy generation on held-out mixed-domain
test rows, scored as `MoACausalLM` scores them (the generated text equals the target word), by:

  oracle      the right expert, given (router static on task_ids): the only method told the domain
  arrow-k1/k2 Arrow (training-free, token-wise top-k over the experts' prototypes), when moa has the router
  learned     a topk (k=2) router over the frozen experts, only its gates trained on a small mixed-domain set
              (MoLE / X-LoRA style), batches from moa's own TextData (the pre-processing serving runs)
  uniform     every expert at weight 1/E on every row (a uniform merge)
  multitask   one LoRA trained on all the domains
  base        SmolLM2 alone

    python bench/expert_library.py            # 3 domains x 3 seeds (resumes: cells in the .json are kept)
    python bench/expert_library.py --quick    # 2 domains, a few steps, 1 seed: the harness end to end (~1.5 min)

Writes bench/results/expert_library.{json,txt} (the table and the command). The experts' runs, adapters and the
MLflow store live under outputs/expert-library/ (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from unittest import mock
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from moa.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-lora.yaml"
DOMAINS = ("airline", "coachella", "self_driving")  # mostly negative / positive / neutral: the expert matters


@dataclasses.dataclass
class Settings:
    corpus: Path = ROOT / "outputs" / "corpora" / "tweets"
    work: Path = ROOT / "outputs" / "expert-library"
    out: Path = ROOT / "bench" / "results" / "expert_library"
    domains: tuple[str, ...] = DOMAINS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 20            # per expert (batches of 8); the multi-task LoRA gets len(domains) * steps
    router_steps: int = 20     # the learned router's, on as many mixed-domain rows, disjoint from the experts'
    test_rows: int = 32        # per domain, the same held-out rows for every seed
    batch_size: int = 8
    lr: float = 0.01           # the fits' (the config's 0.002 is for its 200 steps)
    router_lr: float = 0.01
    backbone: str = "smollm2-135m"
    fit_args: tuple[str, ...] = ()  # more `moa fit` overrides (the smoke test's tiny backbone)

    def key(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k in
                ("domains", "steps", "router_steps", "test_rows", "batch_size", "lr", "router_lr", "backbone", "fit_args")}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def split_rows(s: Settings, seed: int) -> dict[str, Path]:
    """Files of one seed: each domain's expert rows (steps x batch, sampled by the seed), the router's mixed rows
    (disjoint from them) and the mixed test rows (the first test_rows of each domain: the same for every seed)."""
    folder = s.work / f"seed{seed}" / "data"
    rng = np.random.default_rng(seed)
    train, test = read_jsonl(s.corpus / "train.jsonl"), read_jsonl(s.corpus / "test.jsonl")
    files, router_rows = {}, []
    per_domain_router = -(-s.router_steps * s.batch_size // len(s.domains))
    for domain in s.domains:
        rows = [r for r in train if r["domain"] == domain]
        order = rng.permutation(len(rows))
        n = s.steps * s.batch_size
        if len(rows) < n + per_domain_router:
            raise SystemExit(f"{domain}: {len(rows)} training rows, fewer than the {n} + {per_domain_router} needed")
        files[domain] = write_jsonl(folder / f"{domain}.jsonl", [rows[i] for i in order[:n]])
        router_rows += [rows[i] for i in order[n:n + per_domain_router]]
    files["union"] = write_jsonl(folder / "union.jsonl", [r for d in s.domains for r in read_jsonl(files[d])])
    files["router"] = write_jsonl(folder / "router.jsonl", [router_rows[i] for i in rng.permutation(len(router_rows))])
    files["test"] = write_jsonl(folder / "test.jsonl",
                                [r for d in s.domains for r in [t for t in test if t["domain"] == d][:s.test_rows]])
    return files


def fit(s: Settings, name: str, seed: int, train: Path, steps: int) -> Path:
    """One `moa fit` run (the CLI, in this process) in its own folder, no validation (its val/test files: the
    training rows); returns its bundle's adapter folder."""
    from moa.pipelines.cli.command import main as moa

    folder = s.work / f"seed{seed}" / f"fit-{name}"
    adapter = folder / "runs" / "bundle" / "adapter"
    if adapter.is_dir():
        return adapter
    folder.mkdir(parents=True, exist_ok=True)
    argv = ["fit", "-c", str(CONFIG), f"--seed_everything={seed}", f"--model.init_args.seed={seed}",
            f"--model.init_args.backbone={s.backbone}", f"--data.init_args.train={train}",
            f"--data.init_args.val={train}", f"--data.init_args.test={train}", f"--data.init_args.split_seed={seed}",
            f"--data.init_args.batch_size={s.batch_size}", f"--model.init_args.lr={s.lr}",
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", *s.fit_args]
    with contextlib.chdir(folder), mock.patch.object(sys, "argv", sys.argv[:1]):
        code = moa(argv)
    if code or not adapter.is_dir():
        raise RuntimeError(f"moa {' '.join(argv)} failed ({code}); see {folder}")
    return adapter


def train_experts(s: Settings, seed: int, files: dict[str, Path]) -> tuple[list[dict], Path]:
    """The experts (registered, then resolved from their URIs) and the multi-task LoRA's adapter of one seed."""
    import moa
    from moa.pipelines.tracking.expert_library import register_expert, resolve_experts

    tracking = f"sqlite:///{s.work / 'mlflow.db'}"
    uris_file = s.work / f"seed{seed}" / "uris.json"
    uris = json.loads(uris_file.read_text()) if uris_file.is_file() else {}
    for domain in s.domains:
        if domain in uris:
            continue
        adapter = fit(s, domain, seed, files[domain], s.steps)
        peft = moa.to_peft(moa.load(adapter), adapter.parents[2] / "peft", overwrite=True)
        version = register_expert(peft, f"tweets-{domain}", tracking_uri=tracking)
        uris[domain] = f"models:/tweets-{domain}/{version.version}"
        uris_file.write_text(json.dumps(uris, indent=1))
    experts = resolve_experts([uris[d] for d in s.domains], tracking_uri=tracking,
                              directory=s.work / f"seed{seed}" / "resolved")
    multitask = fit(s, "multitask", seed, files["union"], s.steps * len(s.domains))
    return experts, multitask


def text_data(s: Settings, train: Path, seed: int, bucket: bool):
    from moa.pipelines.data.text import TextData

    data = TextData(train=str(train), test=str(train), text_column="text", target_column="target",
                    task_column="task", target="text", prompt_template=_fit_option(s, "prompt_template", "chat"),
                    max_length=112, target_max_length=4, batch_size=s.batch_size, val_fraction=0.0,
                    split_seed=seed, bucket=bucket)
    data.use_backbone(s.backbone)
    return data


def _fit_option(s: Settings, name: str, default: str) -> str:
    prefix = f"--data.init_args.{name}="
    return next((a[len(prefix):] for a in s.fit_args if a.startswith(prefix)), default)


def train_router(s: Settings, model, data, seed: int) -> None:
    """Only the routers' parameters train (the experts and the base stay frozen), on TextData's batches: what
    `moa expert pool --router learned` runs (moa.pipelines.tracking.expert_library.train_pool_router)."""
    from moa.pipelines.tracking.expert_library import train_pool_router

    train_pool_router(model, data, steps=s.router_steps, lr=s.router_lr, seed=seed)


@torch.no_grad()
def accuracy(s: Settings, model, data, context) -> dict[str, float]:
    """Greedy generation of the test rows (as MoACausalLM.generate_texts) scored as MoACausalLM scores it: the
    generation equals the target as the tokenizer round-trips it. ``context(batch)``: the routing keywords."""
    from moa.pipelines.data.text import decode_generation
    from moa.pipelines.kinds.causal_lm.module import stop_ids

    tok, names = data.tokenizer, data.task_names
    eos = stop_ids(data.eos_token_id, getattr(model.generation_config, "eos_token_id", None))
    hits: dict[str, list[float]] = {d: [] for d in names}
    model.eval()
    for batch in data.test_dataloader():
        prompts = batch["prompt_input_ids"]
        out = model.generate(input_ids=prompts, attention_mask=batch["prompt_attention_mask"], do_sample=False,
                             num_beams=1, max_new_tokens=data.target_max_length, eos_token_id=eos,
                             pad_token_id=data.pad_token_id, **context(batch))
        for ids, target, task in zip(out[:, prompts.shape[1]:].tolist(), batch["target_text"], batch["task_ids"]):
            reference = tok.decode(tok(target, add_special_tokens=False)["input_ids"]).strip()
            hits[names[int(task)]].append(float(decode_generation(tok, ids, eos) == reference))
    return {d: float(np.mean(v)) for d, v in hits.items()}


def methods(s: Settings) -> list[str]:
    from moa.routers import ROUTERS

    arrow = ["arrow-k1", "arrow-k2"] if "arrow" in ROUTERS else []
    return ["oracle", *arrow, "learned", "uniform", "multitask", "base"]


def run_method(s: Settings, method: str, seed: int, experts: list[dict], multitask: Path, files) -> dict[str, float]:
    import moa
    from moa.pipelines.kinds.causal_lm.module import build_causal_lm
    from moa.pipelines.tracking.expert_library import assemble_pool

    base = build_causal_lm(s.backbone, None, seed).eval()  # a preset is seeded as the fits' was
    adapters = {e["name"]: str(e["folder"]) for e in experts}
    data = text_data(s, files["test"], seed, bucket=True)
    none = lambda batch: {}  # noqa: E731 - the router is not told the domain
    if method == "base":
        return accuracy(s, base, data, none)
    if method in ("oracle", "uniform"):
        pool = assemble_pool(base, experts)  # static on task_ids; expert i = domain i (both sorted)
        if [e["name"] for e in experts] != [f"tweets-{d}" for d in data.task_names]:
            raise RuntimeError(f"expert order {list(adapters)} is not the test tasks' {data.task_names}")
        if method == "oracle":
            return accuracy(s, pool, data, lambda batch: {"task_ids": batch["task_ids"]})
        return accuracy(s, pool, data, lambda b: {"expert_weights": torch.full((len(b["task_ids"]), len(experts)),
                                                                               1 / len(experts))})
    if method.startswith("arrow"):
        pool = moa.from_peft(base, adapters, router="arrow", top_k=int(method[-1]),
                             router_options={"temperature": 1.0})
        return accuracy(s, pool, data, none)
    if method == "learned":
        pool = moa.from_peft(base, adapters, router="topk", top_k=2)
        train_router(s, pool, text_data(s, files["router"], seed, bucket=False), seed)
        return accuracy(s, pool, data, none)
    if method == "multitask":
        return accuracy(s, moa.load(multitask, base), data, none)
    raise ValueError(method)


def load_results(s: Settings) -> dict:
    path, key = s.out.with_suffix(".json"), json.loads(json.dumps(s.key()))
    results = json.loads(path.read_text()) if path.is_file() else {"settings": key, "cells": {}}
    if results["settings"] != key:
        raise SystemExit(f"{path} holds results of other settings {results['settings']}: move it away or pass --out")
    return results


def table(s: Settings, results: dict) -> str:
    cells = results["cells"]
    header = ["method", *s.domains, "mean", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods(s):
        runs = [cells[f"{method}/seed{seed}"] for seed in s.seeds if f"{method}/seed{seed}" in cells]
        if not runs:
            continue
        def cell(values):
            return f"{statistics.mean(values):.3f}" + (f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else "")
        row = [cell([r[d] for r in runs]) for d in s.domains]
        row.append(cell([statistics.mean(r[d] for d in s.domains) for r in runs]))
        lines.append(f"| {method} | " + " | ".join(row) + f" | {len(runs)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 domains, 3 steps, 6 test rows each, seed 0")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--test-rows", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path, help="where the fits, adapters and MLflow store go (another folder "
                        "for other --steps: finished fits are reused by name)")
    args = parser.parse_args(argv)
    s = Settings()
    if args.quick:
        s = dataclasses.replace(s, domains=("coachella", "self_driving"), seeds=(0,), steps=3, router_steps=3,
                                test_rows=6, work=s.work / "quick", out=s.work / "quick" / "expert_library")
    s = dataclasses.replace(s, **{k: v for k, v in {"seeds": tuple(args.seeds or ()), "steps": args.steps,
                                                     "test_rows": args.test_rows, "out": args.out and args.out.resolve(),
                                                     "work": args.work and args.work.resolve()}.items() if v})
    torch.set_num_threads(args.threads)
    command = "python bench/expert_library.py " + " ".join(sys.argv[1:] if argv is None else argv)
    run(s, command)
    return 0


def run(s: Settings, command: str) -> dict:
    if not (s.corpus / "train.jsonl").is_file():
        raise SystemExit(f"{s.corpus}/train.jsonl is missing: run `moa data prepare outputs/corpora` first")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{s.work / 'mlflow.db'}"  # the fits' runs: a throw-away store
    s.work.mkdir(parents=True, exist_ok=True)
    results = load_results(s)
    start = time.time()
    for seed in s.seeds:
        todo = [m for m in methods(s) if f"{m}/seed{seed}" not in results["cells"]]
        if not todo:
            continue
        files = split_rows(s, seed)
        began = time.time()
        experts, multitask = train_experts(s, seed, files)
        results.setdefault("train_seconds", {}).setdefault(f"seed{seed}", round(time.time() - began, 1))
        for method in todo:
            began = time.time()
            scores = run_method(s, method, seed, experts, multitask, files)
            results["cells"][f"{method}/seed{seed}"] = {**scores, "seconds": round(time.time() - began, 1)}
            write_text(s.out.with_suffix(".json"), json.dumps(results, indent=1))
            print(f"seed {seed} {method}: {scores}", flush=True)
            report(s, results, command, start)  # a stop keeps the table of the cells done
    return report(s, results, command, start, echo=True)


def report(s: Settings, results: dict, command: str, start: float, echo: bool = False) -> dict:
    text = (f"$ {command}\n# {len(s.domains)} tweet domains, SmolLM2-135M-Instruct ({s.backbone}), LoRA r=8 on q/v of "
            f"the top 2 layers; {s.steps} steps of {s.batch_size} per expert (lr {s.lr}), "
            f"multitask {s.steps * len(s.domains)}, "
            f"learned router {s.router_steps} (lr {s.router_lr}); {s.test_rows} held-out test rows per domain; "
            f"accuracy of the generated sentiment word, mean +- sd over seeds\n"
            f"# this invocation's wall time: {time.time() - start:.0f} s\n\n{table(s, results)}\n")
    write_text(s.out.with_suffix(".txt"), text)
    if echo:
        print(text)
    return results


if __name__ == "__main__":
    sys.exit(main())
