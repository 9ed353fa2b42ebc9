"""Every router against PEFT LoRA on real multi-domain text (MiniLM classifier), each tuned on validation; and the
settings where routing might pay.

    python bench/routers_real.py            # the full run (resumes: finished cells in the .json are kept)
    python bench/routers_real.py --quick    # a smoke run (about 3 min): tiny slices, 2 seeds, 10 steps

Data (``outputs/corpora``, written by ``python -m moa.pipelines.data.corpora outputs/corpora``): the tweets (task =
the domain, 6 domains of very uneven size, 3-class sentiment) and BBC News topics (one task, 5 topics), as
``TextData`` files written per setting under ``--work`` (the same rows for every method and seed; seeds change the
initialisation and the batch order). Validation: a fixed ``--val-rows`` rows per task; test: at most
``--test-rows`` fixed rows per task. Backbone: the pretrained all-MiniLM-L6-v2, frozen; one label head per task
(mean pooling); adapters on the top ``--layers`` layers' query and value (setting ``tweets-ffn``: their
feed-forward dense layers too). Methods and active ranks: ``method_spec`` in ``bench/router_harness.py`` (pools of
4 experts; static: one expert per task), plus ``peft-lora-params``: PEFT LoRA of rank 4 x ``--rank``, the trainable
size of a 4-expert pool of rank ``--rank``.

Fair tuning, in the first setting (``tweets``), seed 0: every method's lr from ``--lrs`` (router lr = lr), then for
methods with router parameters the other ``--router-mults`` at the best of those lrs (a coordinate search: 4 runs,
not 6, per routed method); the rates with the best mean validation accuracy over tasks win (ties: the first run).
Then every seed at the chosen rates; the test split is read once per (method, seed) (seed 0: the tuning run's
model). The other settings reuse those rates and run PEFT LoRA (same active rank), static and the ``--variation-routers``
router(s) with the best tuned validation accuracy. Transfer: MHR trained on every tweet domain but ``--heldout``,
then MHR-z and MHR-mu on ``--shots`` training rows per label of it; a fresh PEFT LoRA on the same rows and steps.
Every fit is one run of the MLflow experiment ``moa-routers-real``. Writes ``bench/results/routers_real[_quick].{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import router_harness as harness  # noqa: E402
from moa.atomic import write_text  # noqa: E402
from moa.transfer import prepare_transfer  # noqa: E402

EXPERIMENT = "moa-routers-real"
METHODS = ["peft-lora", "peft-lora-params", "topk", "static", "poly", "mhr", "flylora", "remix", "hyper"]
BASELINES = ["peft-lora", "static"]  # always in the variation settings (peft-lora-params: the tuned setting only)
# setting -> (parts: (corpus, fraction of training rows per task, tasks or None for all or "conflicting"), adapt ffn)
SETTINGS = {
    "tweets": ([("tweets", 1.0, None)], False),
    "tweets-10pct": ([("tweets", 0.1, None)], False),
    "tweets-1pct": ([("tweets", 0.01, None)], False),  # few rows per task, several epochs within the step budget
    "tweets-2dom": ([("tweets", 1.0, "conflicting")], False),
    "tweets-ffn": ([("tweets", 1.0, None)], True),
    "bbc-topic": ([("bbc-topic", 1.0, None)], False),
    "tweets10pct+bbc": ([("tweets", 0.1, None), ("bbc-topic", 1.0, None)], False),
}
ROOT = Path(__file__).resolve().parent


# -- data ---------------------------------------------------------------------------------------------------------
def read(corpora: Path, corpus: str, split: str) -> pd.DataFrame:
    path = corpora / corpus / f"{split}.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `python -m moa.pipelines.data.corpora outputs/corpora` first")
    return pd.read_json(path, lines=True, dtype=False)[["text", "label", "task"]]


def conflicting_pair(train: pd.DataFrame) -> list[str]:
    """The two tasks whose training label distributions differ most (total variation)."""
    shares = pd.crosstab(train["task"], train["label"], normalize="index")
    pairs = itertools.combinations(sorted(shares.index), 2)
    return list(max(pairs, key=lambda p: ((shares.loc[p[0]] - shares.loc[p[1]]).abs().sum(), p)))


def write_setting(args, setting: str) -> Path:
    """The setting's train / val / test files under ``--work/data/<setting>`` (the same rows for every seed)."""
    folder = args.work / "data" / setting
    if (folder / "test.jsonl").is_file():
        return folder
    frames = {s: [] for s in ("train", "val", "test")}
    for corpus, fraction, tasks in SETTINGS[setting][0]:
        train = read(args.corpora, corpus, "train")
        if tasks == "conflicting":
            tasks = conflicting_pair(train)
        for split in frames:
            part = train if split == "train" else read(args.corpora, corpus, split)
            part = part[part["task"].isin(tasks)] if tasks else part
            part = part.sample(frac=1.0, random_state=0)  # the same rows for every seed and method
            cap = {"train": args.train_rows, "val": args.val_rows, "test": args.test_rows}[split]
            for _, rows in part.groupby("task", sort=True):
                n = round(len(rows) * fraction) if split == "train" else len(rows)
                kept = rows.head(min(n, cap or n))
                if split == "train":  # every label of the task at least once (a 1% slice can miss one)
                    missing = rows[~rows["label"].isin(kept["label"])].drop_duplicates("label")
                    kept = pd.concat([kept, missing])
                frames[split].append(kept)
    folder.mkdir(parents=True, exist_ok=True)
    for split, parts in frames.items():
        pd.concat(parts).to_json(folder / f"{split}.jsonl", orient="records", lines=True, force_ascii=False)
    return folder


def majority(folder: Path) -> dict[str, float]:
    """Test accuracy of always predicting each task's most frequent training label."""
    train, test = (pd.read_json(folder / f"{s}.jsonl", lines=True, dtype=False) for s in ("train", "test"))
    return {task: float((rows["label"] == train[train["task"] == task]["label"].value_counts().idxmax()).mean())
            for task, rows in test.groupby("task")}


# -- cells --------------------------------------------------------------------------------------------------------
class Bench:
    """The runs of one invocation: cached data modules, the JSON store of finished cells, MLflow logging."""

    def __init__(self, args, store: dict):
        self.args, self.store, self._data = args, store, {}
        self.kept = {}  # tuning cell key -> trained module, until the method's seed-0 test is read

    def data(self, setting: str, seed: int):
        """The setting's data module (tokenized once), its training batch order set by ``seed``."""
        if setting not in self._data:
            self._data = {setting: harness.text_data(write_setting(self.args, setting), seed, self.args.max_length,
                                                     self.args.batch_size)}  # one setting's tokens at a time
        data = self._data[setting]
        data.split_seed = seed  # read when the training loader is built
        return data

    def save(self) -> None:
        """The store, and the report of the cells done so far (a stop keeps both)."""
        harness.save_json(self.args.out.with_suffix(".json"), self.store)
        report(self.args, self.store, echo=False)

    def rates(self, method: str, lr: float, mult: float) -> dict:
        return {"lr": lr, "router_lr": lr * mult if method in harness.ROUTED else lr}

    def train(self, setting: str, method: str, seed: int, rates: dict, name: str, data=None, steps=None):
        """Fit one module, read its validation accuracy and routing usage; MLflow run ``name``."""
        a, data = self.args, data or self.data(setting, seed)
        t0 = time.perf_counter()
        module = harness.build(method, data, seed, rank=a.rank, target=harness.targets(a.layers, SETTINGS[setting][1]),
                               rloo_samples=a.rloo_samples, peft_rank=4 * a.rank if method == "peft-lora-params" else None,
                               **rates)
        logger = harness.make_logger(EXPERIMENT, name, a.tracking_uri)
        probe = harness.fit(module, data, steps or a.steps, logger)
        val = harness.evaluate(module, data, "val")
        usage = harness.routing_usage(module, data, "val")
        record = {**rates, "val": val, "usage": usage, "trainable": harness.trainable_params(module),
                  "active": harness.active_params(method, module, a.rank), "step_s": probe.median_step(),
                  "memory": probe.saved_bytes + harness.state_bytes(module), "saved_bytes": probe.saved_bytes,
                  "mlflow_run": logger.run_id, "seconds": round(time.perf_counter() - t0, 1)}
        params = {"setting": setting, "method": method, "seed": seed, "steps": steps or a.steps,
                  "batch_size": a.batch_size, "max_length": a.max_length, "active_rank": a.rank,
                  "threads": torch.get_num_threads(), **rates}
        metrics = {f"val/{t}/accuracy": v for t, v in val.items()}
        metrics.update({"val/mean_accuracy": statistics.mean(val.values()), "trainable_params": record["trainable"],
                        "step_time_ms": 1e3 * record["step_s"], "train_memory_bytes": record["memory"],
                        **{f"routing/{k}": v for k, v in harness.usage_summary(usage).items()}})
        harness.finish(logger, params, metrics)
        print(f"  {name}: val {statistics.mean(val.values()):.3f} ({record['seconds']:.0f} s)", flush=True)
        return module, record, logger

    def test(self, module, record: dict, setting: str, seed: int) -> dict:
        """Read the test split once, log it to the cell's MLflow run."""
        test = harness.evaluate(module, self.data(setting, seed), "test")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.args.tracking_uri)
        for t, v in {**{f"test/{t}/accuracy": v for t, v in test.items()},
                     "test/mean_accuracy": statistics.mean(test.values())}.items():
            client.log_metric(record["mlflow_run"], t, v)
        return {**record, "test": test}

    def cell(self, key: str, make) -> dict:
        """The stored cell ``key``, or ``make()``'s record stored now."""
        cells = self.store["cells"]
        if key not in cells:
            cells[key] = make()
            self.save()
        return cells[key]

    def tune(self, setting: str, method: str) -> dict:
        """Seed 0 over the lr grid at router lr = lr, then for routed methods the other router-lr multipliers at the
        best of those lrs; the best rates by validation accuracy."""
        a = self.args
        records = {}

        def tuned(lr: float, mult: float) -> None:
            key = f"{setting}/{method}/lr={lr:g}/rx={mult:g}/seed=0"

            def make():
                module, record, _ = self.train(setting, method, 0, self.rates(method, lr, mult), key)
                self.kept[key] = module
                return record
            records[key] = self.cell(key, make)

        routed = method in harness.ROUTED
        for lr in a.lrs:
            tuned(lr, a.router_mults[0] if routed else 1.0)
        best_lr = max(records.values(), key=lambda r: statistics.mean(r["val"].values()))["lr"]
        for mult in a.router_mults[1:] if routed else []:
            tuned(best_lr, mult)
        best = max(records, key=lambda k: statistics.mean(records[k]["val"].values()))  # the first of equals
        self.store["selected"].setdefault(setting, {})[method] = {"cell": best, "lr": records[best]["lr"],
                                                                  "router_lr": records[best]["router_lr"]}
        self.save()

        def seed0():
            module = self.kept.get(best)
            if module is None:  # a resumed run: the tuning model is gone, train it again (same seed, same batches)
                module, record, _ = self.train(setting, method, 0, self.rates_of(setting, method), best + "/again")
            else:
                record = records[best]
            return self.test(module, record, setting, 0)
        self.cell(f"{setting}/{method}/seed=0", seed0)
        self.kept.clear()
        return self.store["selected"][setting][method]

    def rates_of(self, setting: str, method: str) -> dict:
        chosen = self.store["selected"][setting][method]
        return {"lr": chosen["lr"], "router_lr": chosen["router_lr"]}

    def final(self, setting: str, method: str, seed: int, rates: dict) -> dict:
        key = f"{setting}/{method}/seed={seed}"

        def make():
            module, record, _ = self.train(setting, method, seed, rates, key)
            return self.test(module, record, setting, seed)
        return self.cell(key, make)

    def transfer(self, setting: str, seed: int) -> dict:
        """MHR on the seen domains, then MHR-z / MHR-mu on the held-out domain's shots; a fresh PEFT LoRA on them."""
        a = self.args
        key = f"transfer/{a.heldout}/seed={seed}"
        if key in self.store["cells"]:
            return self.store["cells"][key]
        work = a.work / "data" / f"transfer-{a.heldout}-{a.shots}-s{seed}"
        harness.fewshot_files(write_setting(a, setting), work, a.heldout, a.shots, seed)
        seen = harness.text_data(work / "seen", seed, a.max_length, a.batch_size)
        shots = harness.text_data(work / "shots", seed, a.max_length, min(a.batch_size, 16))
        source, record, _ = self.train(setting, "mhr", seed, self.rates_of(setting, "mhr"), key + "/mhr-seen", seen)
        trained, out = copy.deepcopy(source.model), {"seen_val": statistics.mean(record["val"].values())}
        for mode in ("z", "mu"):
            source.model = prepare_transfer(copy.deepcopy(trained), mode, n_tasks=1)
            source.head, source.names = None, None  # MoAClassifier.configure_model builds the new task's head
            logger = harness.make_logger(EXPERIMENT, f"{key}/mhr-{mode}", a.tracking_uri)
            harness.fit(source, shots, a.transfer_steps, logger)
            out[f"MHR-{mode}"] = harness.evaluate(source, shots)[a.heldout]
            out[f"MHR-{mode} params"] = harness.trainable_params(source)
            harness.finish(logger, {"mode": mode, "heldout": a.heldout, "shots_per_label": a.shots, "seed": seed,
                                    "transfer_steps": a.transfer_steps}, {f"test/{a.heldout}/accuracy": out[f"MHR-{mode}"]})
        fresh, record, _ = self.train(setting, "peft-lora", seed, self.rates_of(setting, "peft-lora"),
                                      key + "/peft-lora-shots", shots, a.transfer_steps)
        out["PEFT LoRA"], out["PEFT LoRA params"] = harness.evaluate(fresh, shots)[a.heldout], record["trainable"]
        print(f"  {key}: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items() if "params" not in k), flush=True)
        return self.cell(key, lambda: out)

    def timing(self, setting: str, methods: list[str]) -> dict:
        a = self.args
        if setting not in self.store["timing"] and a.timing_steps > 0:
            data = self.data(setting, 0)
            builders = {m: (lambda m=m: harness.build(
                m, data, 0, rank=a.rank, target=harness.targets(a.layers, SETTINGS[setting][1]), rloo_samples=a.rloo_samples,
                peft_rank=4 * a.rank if m == "peft-lora-params" else None, **self.rates_of(setting, m))) for m in methods}
            self.store["timing"][setting] = harness.time_interleaved(builders, data, a.timing_steps)
            self.save()
        return self.store["timing"].get(setting)


def variation_methods(store: dict, main: str, methods: list[str], routers: int) -> list[str]:
    """PEFT LoRA, static and the ``routers`` routers with the best tuned validation accuracy in ``main``."""
    cells, chosen = store["cells"], store["selected"].get(main, {})
    candidates = [m for m in methods if m not in BASELINES and not m.startswith("peft-lora") and m in chosen]
    best = sorted(candidates, key=lambda m: -statistics.mean(cells[chosen[m]["cell"]]["val"].values()))[:routers]
    return [m for m in methods if m in BASELINES or m in best]


def run(args, command: str) -> dict:
    path = args.out.with_suffix(".json")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k in ("steps", "batch_size", "max_length", "layers", "rank", "lrs", "router_mults", "val_rows",
                       "test_rows", "train_rows", "rloo_samples", "heldout", "shots", "transfer_steps", "variation_routers")}
    store = json.loads(path.read_text()) if path.is_file() else {}
    if store and store.get("config") != config:
        raise SystemExit(f"{path} holds results of other settings {store.get('config')}: move it away or pass --out")
    store = {"config": config, "cells": {}, "selected": {}, "timing": {}, "seconds": {}, **store, "command": command}
    bench = Bench(args, store)
    main, started = args.settings[0], time.perf_counter()
    for method in args.methods:
        bench.tune(main, method)
    for seed in args.seeds[1:]:
        for method in args.methods:
            bench.final(main, method, seed, bench.rates_of(main, method))
    bench.timing(main, args.methods)
    if not args.no_transfer and "mhr" in args.methods:
        for seed in args.seeds:
            bench.transfer(main, seed)
    for setting in args.settings[1:]:
        for seed in args.seeds:
            for method in variation_methods(store, main, args.methods, args.variation_routers):
                bench.final(setting, method, seed, bench.rates_of(main, method))
    store["seconds"][str(len(store["seconds"]))] = round(time.perf_counter() - started)  # this invocation's wall
    bench.save()
    report(args, store)
    return store


# -- the report ---------------------------------------------------------------------------------------------------
def summary(runs: list[dict], base: list[dict]) -> dict:
    """Mean ± sd of the mean test accuracy over tasks, and its difference to ``base``'s (beyond 2 sd: |delta| >
    2 x the larger of the two sds over seeds)."""
    means = [statistics.mean(r["test"].values()) for r in runs]
    base_means = [statistics.mean(r["test"].values()) for r in base]
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    delta = statistics.mean(means) - statistics.mean(base_means)
    return {"mean": statistics.mean(means), "sd": sd(means), "delta": delta,
            "beyond_2sd": abs(delta) > 2 * max(sd(means), sd(base_means)) and len(runs) > 1}


def setting_table(args, store: dict, setting: str) -> list[str]:
    cells, main = store["cells"], args.settings[0]
    methods = [m for m in args.methods if f"{setting}/{m}/seed={args.seeds[0]}" in cells]
    if "peft-lora" not in methods:
        return []
    runs = {m: [cells[k] for s in args.seeds if (k := f"{setting}/{m}/seed={s}") in cells] for m in methods}
    tasks = sorted(runs["peft-lora"][0]["test"])
    timing = store["timing"].get(setting)
    step = {m: (timing[m] if timing else statistics.median(r["step_s"] for r in runs[m])) for m in methods}
    memory = {m: statistics.median(r["memory"] for r in runs[m]) for m in methods}
    lines = ["| method | lr (router lr) | " + " | ".join(tasks) + " | mean ± sd | Δ vs peft-lora | beyond 2 sd? | "
             "seeds | trainable | step / PEFT | memory / PEFT | balance | specialisation |",
             "|---" * (len(tasks) + 11) + "|"]
    for m in methods:
        rs, s = runs[m], summary(runs[m], runs["peft-lora"])
        rate = f"{rs[0]['lr']:g}" + (f" ({rs[0]['router_lr']:g})" if m in harness.ROUTED else "")
        use = [harness.usage_summary(r["usage"]) for r in rs if r["usage"]]
        routing = [f"{statistics.mean(u[k] for u in use):.2f}" if use else "-" for k in ("balance", "specialisation")]
        lines.append(f"| {m} | {rate} | " + " | ".join(harness.mean_sd([r["test"][t] for r in rs]) for t in tasks)
                     + f" | {s['mean']:.3f} ± {s['sd']:.3f} | {s['delta']:+.3f} | {'yes' if s['beyond_2sd'] else 'no'} | "
                     f"{len(rs)} | {rs[0]['trainable']:,} | {step[m] / step['peft-lora']:.2f} | "
                     f"{memory[m] / memory['peft-lora']:.2f} | " + " | ".join(routing) + " |")
    floor = majority(args.work / "data" / setting)
    lines.append("| majority label (reference) | - | " + " | ".join(f"{floor[t]:.3f}" for t in tasks)
                 + f" | {statistics.mean(floor.values()):.3f} | | | | | | | | |")
    how = ("interleaved step by step on the same batches" if timing else "medians inside each fit")
    rates = "tuned here" if setting == main else f"the rates tuned in `{main}`"
    return [f"### {setting}: {describe(setting)}", "", f"lrs: {rates}; step time: {how}.", "", *lines, ""]


def describe(setting: str) -> str:
    parts, ffn = SETTINGS[setting]
    text = " + ".join(f"{c}" + (" (6 domains)" if c == "tweets" and not t else "")
                      + (f" ({f:.0%} of each task's training rows)" if f < 1 else "")
                      + (" (the 2 domains whose label distributions differ most)" if t else "")
                      for c, f, t in parts)
    return text + (", adapters on query, value and the feed-forward dense layers" if ffn else "")


def tuning_table(args, store: dict, setting: str) -> list[str]:
    lines = ["| method | " + " | ".join(f"lr {lr:g} × {m:g}" for lr in args.lrs for m in args.router_mults) + " |",
             "|---" * (1 + len(args.lrs) * len(args.router_mults)) + "|"]
    for method in args.methods:
        row = []
        for lr in args.lrs:
            for m in args.router_mults:
                key = f"{setting}/{method}/lr={lr:g}/rx={(m if method in harness.ROUTED else 1.0):g}/seed=0"
                cell = store["cells"].get(key)
                row.append("" if cell is None or (m != args.router_mults[0] and method not in harness.ROUTED)
                           else f"{statistics.mean(cell['val'].values()):.3f}")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines


def transfer_table(args, store: dict) -> list[str]:
    runs = [c for s in args.seeds if (c := store["cells"].get(f"transfer/{args.heldout}/seed={s}"))]
    if not runs:
        return []
    lines = [f"### Few-shot transfer to the held-out domain `{args.heldout}`", "",
             f"MHR trained on the other tweet domains ({args.steps} steps; mean validation accuracy "
             f"{harness.mean_sd([r['seen_val'] for r in runs])}), then {args.shots} training rows per label of "
             f"`{args.heldout}`, {args.transfer_steps} steps; test accuracy on `{args.heldout}`:", "",
             "| method | accuracy | trainable |", "|---|---|---|"]
    for name in ("MHR-z", "MHR-mu", "PEFT LoRA"):
        label = "PEFT LoRA (fresh, on the shots only)" if name == "PEFT LoRA" else name
        lines.append(f"| {label} | {harness.mean_sd([r[name] for r in runs])} | {runs[0][name + ' params']:,} |")
    return lines + [""]


def goal_table(args, store: dict) -> list[str]:
    """Per setting: the best method other than PEFT LoRA by mean test accuracy, its delta to peft-lora, and whether it
    reaches the goal (>= 2 points, beyond 2 sd)."""
    lines = ["| setting | best router | Δ vs peft-lora (same active rank) | beyond 2 sd? | ≥ +0.02 and beyond 2 sd? |",
             "|---|---|---|---|---|"]
    for setting in args.settings:
        runs = {m: [c for s in args.seeds if (c := store["cells"].get(f"{setting}/{m}/seed={s}"))] for m in args.methods}
        routers = [m for m in args.methods if runs[m] and not m.startswith("peft-lora")]
        if not runs["peft-lora"] or not routers:
            continue
        best = max(routers, key=lambda m: summary(runs[m], runs["peft-lora"])["mean"])
        s = summary(runs[best], runs["peft-lora"])
        lines.append(f"| {setting} | {best} | {s['delta']:+.3f} | {'yes' if s['beyond_2sd'] else 'no'} | "
                     f"{'yes' if s['beyond_2sd'] and s['delta'] >= 0.02 else 'no'} |")
    return lines


def report(args, store: dict, echo: bool = True) -> None:
    a, main = args, args.settings[0]
    body = [f"```\n{store['command']}\n```", "",
            f"MiniLM-L6 (frozen), adapters on the top {a.layers} layers, active rank {a.rank}, {a.steps} steps × batch "
            f"{a.batch_size}, max_length {a.max_length}, AdamW constant lr; seeds {a.seeds}; validation "
            f"{a.val_rows} rows per task, test " + (f"≤ {a.test_rows} rows per task" if a.test_rows else "the whole split")
            + f" (fixed rows, the same for every method and seed). Tuning: lrs {a.lrs} (router lr = lr × "
            f"{a.router_mults[0]:g}), then router-lr multipliers {a.router_mults[1:]} at the best lr (methods with router parameters: "
            f"{', '.join(harness.ROUTED)}), seed 0, by mean validation accuracy over tasks; the other settings reuse "
            f"those rates and run peft-lora, static and the {a.variation_routers} best-validated other router(s). "
            f"Wall time per invocation (s): {store['seconds']} (the sum of a run's cells: "
            f"{sum(c.get('seconds', 0) for c in store['cells'].values() if isinstance(c, dict)):.0f} s), "
            f"{torch.get_num_threads()} torch thread(s) on a 2-core machine shared with 3 other jobs (load 4-8; "
            "2 threads there ran a step 7x slower than 1).", "",
            "Columns: test accuracy per task (mean ± sd over seeds); mean over tasks; Δ = its difference to "
            "peft-lora (PEFT LoRA of the same active rank; peft-lora-params: the trainable size of a 4-expert pool); "
            "beyond 2 sd: |Δ| > 2 × the larger seed sd of the two; trainable: adapter + router parameters; step / "
            "memory: ratios to peft-lora (see bench/router_harness.py); balance: entropy of the mean expert usage "
            "on validation / log(experts) (0 = collapsed on one expert); specialisation: mean total-variation "
            "distance of each task's usage from the mean (0 = every task routed alike).", ""]
    body += ["Where routing pays: the best router per setting against PEFT LoRA of the same active rank.", "",
             *goal_table(args, store), ""]
    for setting in args.settings:
        body += setting_table(args, store, setting)
        if setting == main:
            body += [f"Validation accuracy of the tuning runs in `{main}` (seed 0; lr × router-lr multiplier):", "",
                     *tuning_table(args, store, main), ""]
            body += transfer_table(args, store)
    text = "\n".join(body) + "\n"
    write_text(args.out, text)
    if echo:
        print(text + f"written to {args.out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 10 steps, small slices, 2 lrs, router lr x 10")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="the first is tuned; the others reuse its rates")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8, help="active rank per token (and peft-lora's r)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--router-mults", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--rloo-samples", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--val-rows", type=int, default=100, help="validation rows per task")
    parser.add_argument("--test-rows", type=int, default=400, help="test rows per task at most (0: all)")
    parser.add_argument("--train-rows", type=int, default=0, help="training rows per task at most (0: all)")
    parser.add_argument("--heldout", default="claritin")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--transfer-steps", type=int, default=40)
    parser.add_argument("--no-transfer", action="store_true")
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (2 threads on the shared 2-core machine ran 7x slower than 1)")
    parser.add_argument("--variation-routers", type=int, default=1,
                        help="routers (best tuned validation accuracy) the other settings run besides the baselines")
    parser.add_argument("--corpora", type=Path, default=ROOT.parent / "outputs" / "corpora")
    parser.add_argument("--work", type=Path, default=None, help="data files (default outputs/routers_real[_quick])")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/routers_real[_quick].md")
    args = parser.parse_args(argv)
    if "peft-lora" not in args.methods:
        args.methods = ["peft-lora", *args.methods]
    if args.quick:
        args.seeds, args.steps, args.lrs, args.router_mults = args.seeds[:2], min(args.steps, 10), args.lrs[1:], [10.0]
        args.val_rows, args.test_rows, args.train_rows = 16, min(args.test_rows or 32, 32), args.train_rows or 200
        args.transfer_steps, args.timing_steps, args.settings = 5, min(args.timing_steps, 3), args.settings[:2]
    suffix = "_quick" if args.quick else ""
    args.out = args.out or ROOT / "results" / f"routers_real{suffix}.md"
    args.work = args.work or ROOT.parent / "outputs" / f"routers_real{suffix}"
    torch.set_num_threads(args.threads)
    command = "python bench/routers_real.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    run(args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
