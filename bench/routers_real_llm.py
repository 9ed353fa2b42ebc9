"""Routers against PEFT LoRA on real text with the real LLM: SmolLM2-135M-Instruct, tweets and BBC headlines.

    python bench/routers_real_llm.py            # the full run (resumes: finished cells in the .json are kept)
    python bench/routers_real_llm.py --quick    # the harness end to end on a few rows (numbers meaningless)
    python bench/routers_real_llm.py --settings tweets --methods static poly --steps 120 \
        --out bench/results/routers_real_llm_steps120    # a variation (also: --mlp, --methods flylora, --seeds)

Writes ``--out`` .json (every cell; the table is rebuilt from it) and .md (the command, one table per setting).
One torch thread by default: on a shared 2-core machine two spin-waiting threads ran ~3x slower than one.

Settings (every method sees the same rows, steps, batches and seeds):

* ``tweets``: the sentiment word of a tweet (chat template, target = ``negative|neutral|positive`` + eos), task =
  its domain (6); 80 training rows per domain (the first of each domain in the seeded file order), validation 20
  and test 80 per domain (``default_settings``). Metric: exact match, teacher-forced
  (= greedy generation gives target + eos, see ``routers_real_llm_trunc``).
* ``tweets-10pct``: the same with 10% of those training rows per domain (same steps: more epochs); the learning
  rates selected on ``tweets`` (no grid of its own: the budget).
* ``tweets-domain`` (only with ``--settings``: a control): ``tweets`` with ``Domain: <domain>\n`` before each tweet,
  for every method, so PEFT sees what static's ``task_ids`` tell it; peft-r8 and static (``--methods`` adds no
  other), the lrs selected on ``tweets``. Its prompts are other token ids, so other cache keys and adapter folders.
* ``headlines``: BBC article lead -> headline, task = the article's topic (5); ROUGE-L of greedy generations of the
  full model (at most 20 new tokens) on 6 test rows per topic (64 training, 12 validation); lr selected on the
  teacher-forced validation loss (generation is too slow for the grid).

Model: adapters on q_proj/v_proj (``--mlp``: and the MLP) of the top 2 decoder layers only; layers below run once per row and
are cached (``routers_real_llm_trunc``: the truncated model's logits equal the full model's, checked on the real
model at the start of each setting and recorded). Methods (pools of 4 experts, active rank 8 per token,
alpha = the expert rank: scale 1): ``peft-r8`` (PEFT ``LoraConfig(r=8)``: the same active rank), ``peft-r32`` (r =
4 x 8: the trainable-parameter count of the 4 x r8 pools), ``topk`` (4 x r4, top-2, load balancing), ``static``
(one r8 expert per task on ``task_ids``), ``poly``, ``mhr`` (4 r8 skills, per-task mixtures; MHR 4 heads),
``flylora`` (rank 32 = 32 rank-1 experts, top 8; only with ``--methods``: the budget), ``lora`` (moa's one-expert
LoRA, router ``lora``: PEFT r8's parameters and outputs through moa's code and optimiser groups, no routing; only with
``--methods``: the control separating moa's parameterisation from routing). Headlines: peft-r8, topk, static.

Fairness: lr from {1e-3, 3e-3, 1e-2} chosen on validation with seed 0 (router-lr multiplier {1, 10} tried at the
best lr for methods with router parameters); then every seed at the selected lr; the test split is read once per
selected (method, seed). Step time and memory: the methods take turns step by step on the same batches after the
runs (median; memory = bytes autograd saves for backward + trainable parameters, gradients, AdamW moments).
Routing statistics: expert usage per task on the test rows (summed over adapted layers), its entropy and the
mutual information between task and expert. Every cell is one run of the MLflow experiment ``moa-routers-real-llm``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moa.atomic import write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from router_harness import SavedBytes  # noqa: E402
from routers_real_llm_trunc import cached_batch, frozen_states, pad_right, target_scores, truncated  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "moa-routers-real-llm"
METHODS = ("peft-r8", "peft-r32", "topk", "static", "poly", "mhr", "flylora", "lora")
ON_REQUEST = ("flylora", "lora")  # only with --methods: the budget


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    corpus: str                 # folder under Config.corpora
    task_column: str
    metric: str                 # "exact" (teacher-forced) or "rougeL" (generation)
    train_per_task: int
    fraction: float = 1.0       # of train_per_task
    val_per_task: int = 30
    test_per_task: int = 80
    max_length: int = 112
    target_max_length: int = 4
    methods: tuple[str, ...] = METHODS
    select_from: str | None = None  # reuse that setting's selected learning rates
    domain_in_prompt: bool = False  # "Domain: <task>\n" before each row's text, for every method (a control)


@dataclasses.dataclass
class Config:
    settings: tuple[Setting, ...]
    backbone: str = "smollm2-135m"
    corpora: Path = ROOT / "outputs" / "corpora"
    prompt_template: str = "chat"
    top_layers: int = 2
    mlp: bool = False           # adapt the MLP of those layers too
    rank: int = 8
    steps: int = 60
    batch_size: int = 8
    seeds: tuple[int, ...] = (0, 1, 2)
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    router_mults: tuple[float, ...] = (1.0, 10.0)
    max_new_tokens: int = 20
    timing_rounds: int = 8
    out: Path = ROOT / "bench" / "results" / "routers_real_llm"
    work: Path = ROOT / "outputs" / "routers-real-llm"
    tracking_uri: str | None = None  # "none": no MLflow

    def key(self) -> dict:
        skip = {"out", "work", "tracking_uri", "corpora", *(() if self.mlp else ("mlp",))}  # q/v only: as before --mlp
        return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k not in skip}, default=str))


def setting_key(setting: dict) -> dict:
    """What a setting's cells depend on (not its method list; no flag: as before the flag existed)."""
    return {k: v for k, v in setting.items() if k != "methods" and not (k == "domain_in_prompt" and not v)}


def merged_key(stored: dict | None, current: dict) -> dict | None:
    """The results' configuration after adding ``current``'s settings and methods to ``stored``'s, or None when they
    disagree (another --steps, or a setting of the same name defined otherwise): cells keep their meaning."""
    if not stored:
        return current
    rest = lambda key: {k: v for k, v in key.items() if k != "settings"}  # noqa: E731
    if rest(stored) != rest(current) or "settings" not in stored:
        return None
    settings = {s["name"]: s for s in stored["settings"]}
    for s in current["settings"]:
        old = settings.get(s["name"])
        if old is not None and setting_key(old) != setting_key(s):
            return None
        methods = list(dict.fromkeys([*(old or {}).get("methods", []), *s["methods"]]))
        settings[s["name"]] = {**s, "methods": methods}
    return {**rest(current), "settings": list(settings.values())}


def default_settings(train_per_task: int = 80, val: int = 20, test: int = 80, headline_train: int = 64,
                     headline_val: int = 12, headline_test: int = 6,
                     methods: Sequence[str] = tuple(m for m in METHODS if m not in ON_REQUEST),
                     headline_methods: Sequence[str] = ("peft-r8", "topk", "static")) -> tuple[Setting, ...]:
    """tweets, tweets-10pct (its lrs from tweets) and headlines; FlyLoRA and moa's LoRA only on request
    (``--methods``: budget)."""
    tweets = Setting("tweets", "tweets", "task", "exact", train_per_task, val_per_task=val, test_per_task=test,
                     methods=tuple(methods))
    return (tweets, dataclasses.replace(tweets, name="tweets-10pct", fraction=0.1, select_from="tweets"),
            Setting("headlines", "bbc-headline", "label", "rougeL", headline_train, val_per_task=headline_val,
                    test_per_task=headline_test, max_length=192, target_max_length=24, methods=tuple(headline_methods)))


def domain_control(tweets: Setting) -> Setting:
    """``tweets-domain`` (only on request): the domain written in every prompt, so PEFT sees what static's
    ``task_ids`` tell it; peft-r8 and static only, the lrs selected on tweets."""
    return dataclasses.replace(tweets, name="tweets-domain", domain_in_prompt=True, select_from=tweets.name,
                               methods=("peft-r8", "static"))


# -- data ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    prompt: list[int]
    target: list[int]          # with eos
    task: int
    target_text: str

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.target

    @property
    def labels(self) -> list[int]:
        return [-100] * len(self.prompt) + self.target


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_per_task(rows: list[dict], column: str, n: int) -> list[dict]:
    """The first ``n`` rows of each task in file order (the corpus files list rows in a seeded random order)."""
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        if seen.get(row[column], 0) < n:
            seen[row[column]] = seen.get(row[column], 0) + 1
            out.append(row)
    return out


def prepare(cfg: Config, setting: Setting, encoder) -> dict:
    """The setting's rows, encoded as ``TextData`` encodes causal-LM rows: ``{"train", "val", "test", "tasks"}``."""
    folder = cfg.corpora / setting.corpus
    if not (folder / "train.jsonl").is_file():
        raise SystemExit(f"{folder}/train.jsonl is missing: run `moa data prepare outputs/corpora` (docs/real-data.md)")
    raw = {split: read_jsonl(folder / f"{split}.jsonl") for split in ("train", "val", "test")}
    train = first_per_task(raw["train"], setting.task_column, setting.train_per_task)
    train = first_per_task(train, setting.task_column, max(1, round(setting.fraction * setting.train_per_task)))
    chosen = {"train": train, "val": first_per_task(raw["val"], setting.task_column, setting.val_per_task),
              "test": first_per_task(raw["test"], setting.task_column, setting.test_per_task)}
    tasks = sorted({r[setting.task_column] for r in train})
    out: dict = {"tasks": tasks}
    for split, rows in chosen.items():
        texts = [f"Domain: {r[setting.task_column]}\n{r['text']}" if setting.domain_in_prompt else r["text"] for r in rows]
        prompts = [encoder.prompt(t, r[setting.task_column], r.get("domain", "")) for t, r in zip(texts, rows)]
        prompt_ids, target_ids, _, _ = encoder.pair_ids(prompts, [r["target"] for r in rows], setting.target_max_length)
        out[split] = [Row(p, y, tasks.index(r[setting.task_column]), r["target"])
                      for p, y, r in zip(prompt_ids, target_ids, rows)]
    return out


def train_batches(lengths: Sequence[int], steps: int, batch_size: int, seed: int, pool: int = 16) -> list[list[int]]:
    """``steps`` batches of row indices: seeded epochs of the rows, rows of similar length together within pools of
    ``pool`` batches (less padding), the batches of a pool in seeded order."""
    rng, need, order = np.random.default_rng(seed), steps * batch_size, []
    while len(order) < need:
        order += rng.permutation(len(lengths)).tolist()
    out = []
    for at in range(0, need, batch_size * pool):
        chunk = sorted(order[at:at + batch_size * pool], key=lambda i: lengths[i])
        group = [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        out += [group[k] for k in rng.permutation(len(group))]
    return out[:steps]


def eval_batches(rows: Sequence[Row], size: int = 16) -> list[list[int]]:
    """One task per batch (routing statistics per task), rows sorted by length."""
    out = []
    for task in sorted({r.task for r in rows}):
        own = sorted((i for i, r in enumerate(rows) if r.task == task), key=lambda i: len(rows[i].ids))
        out += [own[j:j + size] for j in range(0, len(own), size)]
    return out


# -- models -------------------------------------------------------------------------------------------------------
def sharing_copy(model: nn.Module) -> nn.Module:
    """A new module tree over the same base weights (adapters replace modules, never the weights)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def targets(n_layers: int, top: int, mlp: bool = False) -> str:
    """q_proj/v_proj (and with ``mlp`` gate/up/down_proj) of the top ``top`` layers, one regex for MoA and PEFT."""
    ids = "|".join(str(i) for i in range(n_layers - top, n_layers))
    mlp_part = r"|mlp\.(gate_proj|up_proj|down_proj)" if mlp else ""
    return rf"model\.layers\.({ids})\.(self_attn\.(q_proj|v_proj){mlp_part})"


def method_spec(method: str, rank: int, n_tasks: int) -> dict:
    half = rank // 2
    return {
        "topk": dict(n_experts=4, r=half, alpha=half, router="topk", top_k=2),
        "static": dict(n_experts=n_tasks, r=rank, alpha=rank, router="static", router_options={"key": "task_ids"}),
        "poly": dict(n_experts=4, r=rank, alpha=rank, router="poly", router_options={"n_tasks": n_tasks}),
        "mhr": dict(n_experts=4, r=rank, alpha=rank, router="mhr", router_options={"n_tasks": n_tasks, "n_heads": 4}),
        "lora": dict(n_experts=1, r=rank, alpha=rank, router="lora"),  # PEFT LoRA's parameters, moa's code path
        "flylora": dict(n_experts=4 * rank, r=4 * rank, alpha=4 * rank, router="flylora", top_k=rank,
                        router_options={"bias_u": 0.001}),
    }[method]


def peft_rank(method: str, rank: int) -> int | None:
    return {"peft-r8": rank, "peft-r32": 4 * rank}.get(method)


def build(cfg: Config, base: nn.Module, method: str, n_tasks: int, seed: int) -> nn.Module:
    """The method's model over a sharing copy of the frozen base (MoA built as ``MoACausalLM`` builds it)."""
    import moa

    target = targets(base.config.num_hidden_layers, cfg.top_layers, cfg.mlp)
    torch.manual_seed(seed)
    r = peft_rank(method, cfg.rank)
    if r is not None:
        from peft import LoraConfig, get_peft_model

        return get_peft_model(sharing_copy(base), LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=target))
    return moa.attach(sharing_copy(base), moa.MoAConfig(target_modules=target, **method_spec(method, cfg.rank, n_tasks)))


def is_moa(model: nn.Module) -> bool:
    return hasattr(model, "moa_layers")


def optimizer(model: nn.Module, lr: float, router_mult: float) -> torch.optim.Optimizer:
    """AdamW, constant lr, no weight decay (``MoAModule.configure_optimizers``' groups: routers at lr x mult)."""
    if not is_moa(model):
        groups = {"experts": [p for p in model.parameters() if p.requires_grad]}
    else:
        groups = model.param_groups()
    lrs = {"experts": lr, "router": lr * router_mult}
    unknown = set(groups) - set(lrs)
    if unknown:
        raise ValueError(f"parameter groups {sorted(unknown)} have no learning rate here")
    return torch.optim.AdamW([{"params": p, "lr": lrs[g], "weight_decay": 0.0} for g, p in groups.items()])


def n_params(model: nn.Module, group: str | None = None) -> int:
    if group is not None:
        return sum(p.numel() for p in (model.param_groups().get(group, []) if is_moa(model) else []))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    if is_moa(model):
        return {k: v.detach().clone().contiguous() for k, v in model.moa_state_dict().items()}
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    if is_moa(model):
        from moa.model import load_moa_state

        load_moa_state(model, state)
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)


# -- steps and evaluation -----------------------------------------------------------------------------------------
class Run:
    """One model on one setting's cached rows: training steps and evaluation."""

    def __init__(self, cfg: Config, model: nn.Module, cache: dict, start: int):
        self.cfg, self.model, self.cache, self.start = cfg, model, cache, start

    def scores(self, rows: Sequence[Row]) -> dict[str, Tensor]:
        batch = cached_batch([self.cache[tuple(r.ids)] for r in rows], [r.labels for r in rows])
        context = {"task_ids": torch.tensor([r.task for r in rows])} if is_moa(self.model) else {}
        with truncated(self.model, self.start):
            return target_scores(self.model, batch, **context)

    def step(self, rows: Sequence[Row], opt: torch.optim.Optimizer) -> float:
        s = self.scores(rows)
        loss = s["loss_sum"].sum() / s["tokens"].sum()
        if is_moa(self.model):
            loss = loss + self.model.aux_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, rows: Sequence[Row], tasks: list[str], usage: bool = False) -> dict:
        """Per task: teacher-forced exact match and token-weighted loss; with ``usage``, the share of routing each
        expert received (summed over the adapted layers and the batch's tokens)."""
        self.model.eval()
        sums = {t: {"exact": 0.0, "rows": 0, "loss": 0.0, "tokens": 0.0} for t in tasks}
        use: dict[str, Tensor] = {}
        for idx in eval_batches(rows):
            batch = [rows[i] for i in idx]
            s, task = self.scores(batch), tasks[batch[0].task]
            sums[task]["exact"] += float(s["exact"].sum())
            sums[task]["rows"] += len(batch)
            sums[task]["loss"] += float(s["loss_sum"].sum())
            sums[task]["tokens"] += float(s["tokens"].sum())
            if usage and is_moa(self.model) and self.model.routing_stats():
                layers = torch.stack(list(self.model.routing_stats().values())).sum(0)
                use[task] = use.get(task, 0) + layers * len(batch)
        self.model.train()
        out = {"exact": {t: v["exact"] / v["rows"] for t, v in sums.items() if v["rows"]},
               "loss": {t: v["loss"] / v["tokens"] for t, v in sums.items() if v["tokens"]}}
        if use:
            out["usage"] = {t: (u / u.sum()).tolist() for t, u in use.items()}
        return out

    @torch.no_grad()
    def rouge(self, rows: Sequence[Row], tasks: list[str], encoder, eos, size: int = 8) -> dict[str, float]:
        """ROUGE-L per task of greedy generations of the FULL model (left-padded prompts, ``max_new_tokens``)."""
        from moa.pipelines.data.text import decode_generation, pad_prompts
        from moa.pipelines.kinds.causal_lm.module import rouge_l

        self.model.eval()
        scores: dict[str, list[float]] = {}
        tokenizer = encoder.tokenizer
        for idx in eval_batches(rows, size):
            batch = [rows[i] for i in idx]
            ids, mask = pad_prompts([r.prompt for r in batch], encoder.pad_token_id)
            context = {"task_ids": torch.tensor([r.task for r in batch])} if is_moa(self.model) else {}
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.cfg.max_new_tokens,
                                      do_sample=False, num_beams=1, eos_token_id=eos,
                                      pad_token_id=encoder.pad_token_id, **context)
            for r, new in zip(batch, out[:, ids.shape[1]:].tolist()):
                reference = tokenizer.decode(tokenizer(r.target_text, add_special_tokens=False)["input_ids"]).strip()
                scores.setdefault(tasks[r.task], []).append(rouge_l(decode_generation(tokenizer, new, eos), reference))
        self.model.train()
        return {t: statistics.mean(v) for t, v in scores.items()}


def train(cfg: Config, run: Run, data: dict, lr: float, mult: float, seed: int) -> list[float]:
    """``cfg.steps`` AdamW steps on the seed's batches; returns the step wall times."""
    from moa.training_hooks import follow_optimizer

    opt = optimizer(run.model, lr, mult)
    follower = follow_optimizer(run.model, opt, cfg.steps) if is_moa(run.model) else contextlib.nullcontext()
    rows, times = data["train"], []
    run.model.train()
    with follower:
        for idx in train_batches([len(r.ids) for r in rows], cfg.steps, cfg.batch_size, seed):
            began = time.perf_counter()
            run.step([rows[i] for i in idx], opt)
            times.append(time.perf_counter() - began)
    return times


# -- the cells ----------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, cfg: Config, command: str):
        from moa.pipelines.data.text import load_tokenizer, tokenizer_source
        from moa.pipelines.kinds.causal_lm.module import build_causal_lm, stop_ids

        self.cfg, self.command, self.began = cfg, command, time.time()
        self.base = build_causal_lm(cfg.backbone, None, 0).eval().requires_grad_(False)
        self.start = self.base.config.num_hidden_layers - cfg.top_layers
        self.tokenizer = load_tokenizer(tokenizer_source(cfg.backbone))
        self.stop_ids = stop_ids
        self.cache: dict[tuple, Tensor] = {}
        self.path = cfg.out.with_suffix(".json")
        self.results = json.loads(self.path.read_text()) if self.path.is_file() else {}
        config = merged_key(self.results.get("config"), cfg.key())
        if config is None:
            raise SystemExit(f"{self.path} holds results of other settings: move it away or pass --out")
        self.results = {"cells": {}, "selected": {}, "timing": {}, "check": {}, **self.results, "config": config}
        self.earlier_wall = self.results.get("wall_s", 0.0)  # of the invocations before this one
        self.results["threads"] = torch.get_num_threads()

    def encoder(self, setting: Setting):
        from moa.pipelines.data.text import TextEncoder

        return TextEncoder(self.tokenizer, self.cfg.prompt_template, setting.max_length)

    def save(self) -> None:
        write_text(self.path, json.dumps({**self.results, "wall_s": self.earlier_wall + time.time() - self.began},
                                         indent=1))
        write_report(self.cfg, self.results, self.command)  # a stop keeps the table of the cells done

    def ready(self, data: dict) -> dict:
        """``data`` with every row's frozen states in the cache (computed on first need: a resumed run whose cells
        are all done computes none)."""
        rows = [r.ids for split in ("train", "val", "test") for r in data[split] if tuple(r.ids) not in self.cache]
        if rows:
            began = time.perf_counter()
            unique = list(dict.fromkeys(map(tuple, rows)))
            for ids, state in zip(unique, frozen_states(self.base, unique, self.start)):
                self.cache[ids] = state
            data["cache_s"] = data.get("cache_s", 0.0) + time.perf_counter() - began
            print(f"{len(unique)} rows' frozen layers cached in {data['cache_s']:.0f} s", flush=True)
        return data

    def check(self, setting: Setting, data: dict) -> dict:
        """The truncated path against the full model on validation rows of different lengths (top-k adapters with
        random non-zero factors, so the adapted layers matter): the largest logit difference at target positions."""
        gen = torch.Generator().manual_seed(0)
        model = build(self.cfg, self.base, "topk", len(data["tasks"]), 0)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        rows = sorted(data["val"], key=lambda r: len(r.ids))
        rows = [rows[0], rows[len(rows) // 2], rows[-1], *data["val"][:3]]
        run = Run(self.cfg, model.eval(), self.cache, self.start)
        with torch.no_grad():
            cut = run.scores(rows)
            mask = pad_right([[1] * len(r.ids) for r in rows], 0)
            full = model(input_ids=pad_right([r.ids for r in rows], 0), attention_mask=mask,
                         task_ids=torch.tensor([r.task for r in rows])).logits
        at = (pad_right([r.labels for r in rows], -100)[:, 1:] != -100).nonzero(as_tuple=True)
        diff = float((cut["logits"] - full[at]).abs().max())
        return {"rows": len(rows), "lengths": [len(r.ids) for r in rows], "max_abs_logit_diff": diff}

    def run_cell(self, setting: Setting, data: dict, method: str, lr: float, mult: float, seed: int, test: bool,
                 state: dict | None = None) -> dict:
        """Train (or load ``state``), validate, and with ``test`` read the test split; one MLflow run."""
        began, data = time.time(), self.ready(data)
        model = build(self.cfg, self.base, method, len(data["tasks"]), seed)
        run = Run(self.cfg, model, self.cache, self.start)
        times = []
        if state is None:
            times = train(self.cfg, run, data, lr, mult, seed)
        else:
            load_adapter_state(model, state)
        cell = {"method": method, "lr": lr, "router_mult": mult, "seed": seed, "trainable": n_params(model),
                "router_params": n_params(model, "router"), "val": run.evaluate(data["val"], data["tasks"])}
        if times:
            cell["step_s"] = statistics.median(times[len(times) // 10:])
        if test:
            cell["test"] = run.evaluate(data["test"], data["tasks"], usage=True)
            if setting.metric == "rougeL":
                eos = self.stop_ids(self.encoder(setting).eos_token_id, self.base.generation_config.eos_token_id)
                cell["test"]["rougeL"] = run.rouge(data["test"], data["tasks"], self.encoder(setting), eos)
        cell["seconds"] = round(time.time() - began, 1)
        cell["_state"] = adapter_state(model) if state is None and not test else None
        self.log_mlflow(setting, cell)
        return cell

    def log_mlflow(self, setting: Setting, cell: dict) -> None:
        if (self.cfg.tracking_uri or "").lower() == "none":
            return
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        from moa.pipelines.tracking.store import resolve_tracking_uri

        client = MlflowClient(resolve_tracking_uri(self.cfg.tracking_uri))
        found = client.get_experiment_by_name(EXPERIMENT)
        experiment = found.experiment_id if found else client.create_experiment(EXPERIMENT)
        name = f"{setting.name}/{cell['method']}/lr{cell['lr']:g}/x{cell['router_mult']:g}/s{cell['seed']}"
        run = client.create_run(experiment, run_name=name)
        params = {"setting": setting.name, "method": cell["method"], "lr": cell["lr"], "router_mult": cell["router_mult"],
                  "seed": cell["seed"], "steps": self.cfg.steps, "batch_size": self.cfg.batch_size,
                  "backbone": self.cfg.backbone, "top_layers": self.cfg.top_layers, "rows_train": setting.train_per_task,
                  "fraction": setting.fraction, "trainable_params": cell["trainable"]}
        metrics = {f"{split}/{kind}/{task}": value for split in ("val", "test") for kind, per in cell.get(split, {}).items()
                   if kind != "usage" for task, value in per.items()}
        metrics.update({"seconds": cell["seconds"], **({"step_time_s": cell["step_s"]} if "step_s" in cell else {})})
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                         metrics=[Metric(k.replace(" ", "_"), float(v), now, 0) for k, v in metrics.items()])
        client.set_terminated(run.info.run_id)

    def cell(self, setting: Setting, data: dict, method: str, lr: float, mult: float, seed: int, test: bool,
             state: dict | None = None) -> dict:
        key = cell_key(setting.name, method, lr, mult, seed)
        cells = self.results["cells"]
        if key not in cells or (test and "test" not in cells[key]):
            done = self.run_cell(setting, data, method, lr, mult, seed, test, state)
            kept = done.pop("_state")
            if kept is not None:  # a grid cell's adapters: its test is read from them if it is selected
                self.state_path(setting, key).parent.mkdir(parents=True, exist_ok=True)
                save_file(kept, str(self.state_path(setting, key)))
            cells[key] = {**cells.get(key, {}), **done} if state is not None else done
            self.save()
            print(f"{key}: val {val_score(setting, cells[key]):.4f}"
                  + (f", test {test_mean(setting, cells[key]):.4f}" if test else "") + f" ({done['seconds']} s)", flush=True)
        return cells[key]

    def select(self, setting: Setting, data: dict, method: str) -> dict:
        """The grid on validation with seed 0; the selected (lr, router_mult) and the test split of that cell."""
        chosen = self.results["selected"].get(f"{setting.name}/{method}")
        if chosen is None and setting.select_from:
            chosen = self.results["selected"].get(f"{setting.select_from}/{method}")
            if chosen is None:
                raise SystemExit(f"{setting.name} takes {method}'s lr from {setting.select_from}: run that setting first")
        if chosen is None:
            grid = [(lr, 1.0) for lr in self.cfg.lrs]
            scores = {g: val_score(setting, self.cell(setting, data, method, *g, 0, False)) for g in grid}
            best = max(grid, key=scores.get)
            router = self.results["cells"][cell_key(setting.name, method, *best, 0)]["router_params"] > 0
            for mult in self.cfg.router_mults[1:] if router else ():
                scores[(best[0], mult)] = val_score(setting, self.cell(setting, data, method, best[0], mult, 0, False))
            lr, mult = max(scores, key=scores.get)
            chosen = {"lr": lr, "router_mult": mult}
        self.results["selected"][f"{setting.name}/{method}"] = chosen
        return chosen

    def run_setting(self, setting: Setting) -> None:
        data = prepare(self.cfg, setting, self.encoder(setting))
        print(f"{setting.name}: {len(data['train'])} training rows, {len(data['val'])} val, {len(data['test'])} test",
              flush=True)
        if setting.metric == "exact" and setting.name not in self.results.setdefault("reference", {}):
            self.results["reference"][setting.name] = majority(data)
        if setting.name not in self.results["check"]:
            self.results["check"][setting.name] = {**self.check(setting, self.ready(data)),
                                                   "cache_s": round(data.get("cache_s", 0.0), 1)}
            self.save()
        for method in setting.methods:
            chosen = self.select(setting, data, method)
            for seed in self.cfg.seeds:
                key = cell_key(setting.name, method, chosen["lr"], chosen["router_mult"], seed)
                saved = self.state_path(setting, key)
                state = load_file(str(saved)) if seed == self.cfg.seeds[0] and saved.is_file() else None
                self.cell(setting, data, method, chosen["lr"], chosen["router_mult"], seed, True, state)
            self.save()
        if set(setting.methods) - set(self.results["timing"].get(setting.name, {})):  # all methods side by side
            self.results["timing"][setting.name] = self.timing(setting, data)
            self.save()

    def state_path(self, setting: Setting, key: str) -> Path:
        """Where a grid cell's adapters are kept: one folder per configuration and setting definition (another
        --steps or prompt: other adapters)."""
        config = {**self.cfg.key(), "settings": setting_key(json.loads(json.dumps(dataclasses.asdict(setting))))}
        run = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
        return self.cfg.work / "states" / run / (key.replace("/", "__") + ".safetensors")

    def timing(self, setting: Setting, data: dict) -> dict:
        """Methods take turns step by step on the same batches (seed 0): median step time (first round dropped) and
        the training memory of the first step (saved activations + trainable parameters, gradients, AdamW moments)."""
        runs, opts, data = {}, {}, self.ready(data)
        for method in setting.methods:
            chosen = self.results["selected"][f"{setting.name}/{method}"]
            runs[method] = Run(self.cfg, build(self.cfg, self.base, method, len(data["tasks"]), 0), self.cache, self.start)
            opts[method] = optimizer(runs[method].model, chosen["lr"], chosen["router_mult"])
        rows = data["train"]
        batches = train_batches([len(r.ids) for r in rows], self.cfg.timing_rounds, self.cfg.batch_size, 0)
        times: dict[str, list[float]] = {m: [] for m in runs}
        memory = {}
        for round_, idx in enumerate(batches):
            for method, run in runs.items():
                if round_ == 0:
                    memory[method] = step_memory(run, [rows[i] for i in idx], opts[method])
                    continue
                began = time.perf_counter()
                run.step([rows[i] for i in idx], opts[method])
                times[method].append(time.perf_counter() - began)
        return {m: {"step_s": statistics.median(times[m]) if times[m] else float("nan"), **memory[m]} for m in runs}

    def run(self) -> dict:
        for setting in self.cfg.settings:
            self.run_setting(setting)
        write_report(self.cfg, self.results, self.command)
        return self.results


def step_memory(run: Run, rows: Sequence[Row], opt: torch.optim.Optimizer) -> dict:
    """One training step under :class:`router_harness.SavedBytes`: the bytes autograd saves (each storage once,
    parameters excluded), plus 4 x the trainable parameters' bytes (weights, gradients, AdamW's two moments)."""
    with SavedBytes(run.model) as saved:
        run.step(rows, opt)
    state = sum(4 * p.numel() * p.element_size() for p in run.model.parameters() if p.requires_grad)
    return {"saved_bytes": saved.bytes, "memory_bytes": saved.bytes + state}


def majority(data: dict) -> dict:
    """Test exact match of always answering the training rows' most frequent target, per task and overall (the
    floor to read the tweets tables by: a model that ignores the text)."""
    def most(rows):
        return Counter(r.target_text for r in rows).most_common(1)[0][0]

    overall, out = most(data["train"]), {"per_task": {}, "overall": {}}
    for task, name in enumerate(data["tasks"]):
        test = [r.target_text for r in data["test"] if r.task == task]
        own = most([r for r in data["train"] if r.task == task])
        out["per_task"][name], out["overall"][name] = (sum(t == own for t in test) / len(test),
                                                       sum(t == overall for t in test) / len(test))
    return out


# -- the table ----------------------------------------------------------------------------------------------------
def cell_key(setting: str, method: str, lr: float, mult: float, seed: int) -> str:
    return f"{setting}/{method}/lr={lr:g}/x{mult:g}/seed={seed}"


def val_score(setting: Setting, cell: dict) -> float:
    """Selection score: mean exact match over tasks (tweets), else minus the mean validation loss (headlines)."""
    if setting.metric == "exact":
        return statistics.mean(cell["val"]["exact"].values()) - 1e-6 * statistics.mean(cell["val"]["loss"].values())
    return -statistics.mean(cell["val"]["loss"].values())


def test_mean(setting: Setting, cell: dict) -> float:
    return statistics.mean(cell["test"][setting.metric].values())


def usage_stats(usage: dict[str, list[float]]) -> tuple[float, float]:
    """(mean over tasks of the usage entropy / log E, mutual information of task and expert in nats)."""
    matrix = torch.tensor(list(usage.values()), dtype=torch.float64)
    entropy = lambda p: float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())  # noqa: E731
    per_task = entropy(matrix)
    return per_task / math.log(matrix.shape[1]), entropy(matrix.mean(0, keepdim=True)) - per_task


def mean_sd(values: Sequence[float], scale: float = 100.0) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.1f} ± {scale * sd:.1f}"


def setting_table(cfg: Config, setting: Setting, results: dict) -> list[str]:
    cells, tasks = results["cells"], None
    runs = {}
    for method in setting.methods:
        chosen = results["selected"].get(f"{setting.name}/{method}")
        if chosen:
            got = [cells.get(cell_key(setting.name, method, chosen["lr"], chosen["router_mult"], s)) for s in cfg.seeds]
            got = [c for c in got if c and "test" in c]
            if got:
                runs[method], tasks = got, list(got[0]["test"][setting.metric])
    if not runs:
        return []
    base = {c["seed"]: test_mean(setting, c) for c in runs.get("peft-r8", [])}
    timing = results["timing"].get(setting.name, {})
    unit = "exact match (%)" if setting.metric == "exact" else "ROUGE-L F (x100)"
    lines = [f"### {setting.name}: test {unit}, mean ± sd over seeds", "",
             "| method | lr (router x) | " + " | ".join(tasks) + " | mean | Δ vs peft-r8 (paired) | ≥ 2 pts beyond 2 sd "
             "| trainable | step / peft-r8 | memory / peft-r8 | usage entropy | MI(task; expert) | val grid |",
             "|---" * (len(tasks) + 11) + "|"]
    for method, got in runs.items():
        chosen = results["selected"][f"{setting.name}/{method}"]
        rate = f"{chosen['lr']:g}" + (f" (x{chosen['router_mult']:g})" if got[0]["router_params"] else "")
        per_task = [mean_sd([c["test"][setting.metric][t] for c in got]) for t in tasks]
        means = [test_mean(setting, c) for c in got]
        deltas = [test_mean(setting, c) - base[c["seed"]] for c in got if c["seed"] in base]
        if method == "peft-r8" or not deltas:
            delta, flag = "-", "-"
        else:
            delta = mean_sd(deltas)
            sd = statistics.stdev(deltas) if len(deltas) > 1 else float("nan")
            flag = "n/a (1 seed)" if math.isnan(sd) else ("yes" if statistics.mean(deltas) - 2 * sd >= 0.02 else "no")
        ratio = lambda key: (f"{timing[method][key] / timing['peft-r8'][key]:.2f}"  # noqa: E731
                             if method in timing and "peft-r8" in timing else "-")
        usage = [usage_stats(c["test"]["usage"]) for c in got if c["test"].get("usage")]
        entropy = f"{statistics.mean(u[0] for u in usage):.2f}" if usage else "-"
        mi = f"{statistics.mean(u[1] for u in usage):.3f}" if usage else "-"
        grid = ", ".join(f"{c['lr']:g} x{c['router_mult']:g}: {abs(val_score(setting, c)):.3f}" for k, c in cells.items()
                         if k.startswith(f"{setting.name}/{method}/") and c["seed"] == cfg.seeds[0])
        lines.append(f"| {method} | {rate} | " + " | ".join(per_task) + f" | {mean_sd(means)} | {delta} | {flag} | "
                     f"{got[0]['trainable']:,} | {ratio('step_s')} | {ratio('memory_bytes')} | {entropy} | {mi} | "
                     f"{'from ' + setting.select_from if setting.select_from else grid} |")
    for kind, label in (("per_task", "each task's majority word (reference)"), ("overall", "the majority word (reference)")):
        floor = results.get("reference", {}).get(setting.name, {}).get(kind)
        if floor:
            lines.append(f"| {label} | - | " + " | ".join(f"{100 * floor[t]:.1f}" for t in tasks)
                         + f" | {100 * statistics.mean(floor[t] for t in tasks):.1f} |" + " - |" * 8)
    check = results["check"].get(setting.name)
    if check:
        lines += ["", f"Truncated vs full model: max |Δ logit| {check['max_abs_logit_diff']:.2e} on {check['rows']} "
                  f"validation rows of {check['lengths']} tokens; frozen layers cached in {check['cache_s']} s."]
    if timing.get("peft-r8"):
        lines.append(f"peft-r8: step {1e3 * timing['peft-r8']['step_s']:.0f} ms, training memory "
                     f"{timing['peft-r8']['memory_bytes'] / 2**20:.1f} MiB.")
    return lines + [""]


def write_report(cfg: Config, results: dict, command: str) -> str:
    body = [line for s in cfg.settings for line in setting_table(cfg, s, results)]
    text = "\n".join([f"```\n{command}\n```", "", *body, notes(cfg, results)])
    cfg.out.with_suffix(".md").write_text(text)
    return text


def notes(cfg: Config, results: dict) -> str:
    s = {x.name: x for x in cfg.settings}
    rows = "; ".join(f"{x.name}: {x.train_per_task if x.fraction == 1 else max(1, round(x.fraction * x.train_per_task))} "
                     f"training rows per task, val {x.val_per_task}, test {x.test_per_task} per task" for x in s.values())
    return (f"Notes. {cfg.backbone}, frozen; adapters on q_proj/v_proj{'/gate/up/down_proj' if cfg.mlp else ''} of "
            f"the top {cfg.top_layers} layers only (the "
            f"rest cached once per row: exact, see the check lines); {cfg.steps} steps x batch {cfg.batch_size}, "
            f"AdamW, constant lr, no weight decay; seeds {list(cfg.seeds)}; {rows}. lr grid {list(cfg.lrs)} chosen on "
            f"validation with seed {cfg.seeds[0]} (tweets: mean exact match; headlines: teacher-forced loss), router-lr "
            f"multipliers {list(cfg.router_mults)} tried at the best lr where a router has parameters; tweets-10pct "
            "and tweets-domain take the lrs selected on tweets; tweets-domain writes 'Domain: <domain>' on a line "
            "before each tweet for every method. lora: moa's single LoRA (n_experts=1, router 'lora'), PEFT r8's "
            "parameters. Exact match is teacher-forced: greedy generation equals the target and eos iff every target position's argmax is right (token level: a generation that decodes to the same "
            f"word through other tokens counts as a miss). Headlines: ROUGE-L of greedy generations, at most "
            f"{cfg.max_new_tokens} new tokens, full model. Δ: per seed, the method's mean minus peft-r8's, mean ± sd; "
            "'≥ 2 pts beyond 2 sd': mean Δ - 2 sd ≥ 2 points. Usage entropy: mean over tasks of the entropy of the "
            "task's expert usage (test rows, all adapted layers) / log E (0: one expert, 1: uniform); MI: entropy of "
            "the usage over all tasks minus the mean per-task entropy (0: routing ignores the task). Step time and "
            "memory from the interleaved phase (seed 0, selected lrs). Val grid: lr x router multiplier: validation "
            "exact match (tweets) or teacher-forced loss (headlines) of seed 0. Wall time of all invocations: "
            f"{results.get('wall_s', 0):.0f} s, {results.get('threads', 1)} torch thread(s).\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few rows and steps, seed 0, two lrs")
    parser.add_argument("--settings", nargs="+", help="tweets, tweets-10pct, headlines (default: these), tweets-domain")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="restrict every setting to these")
    parser.add_argument("--mlp", action="store_true", help="adapt gate/up/down_proj of the top layers too")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 on an idle 2-core machine; on a "
                        "shared one, 2 spin-waiting threads run several times slower than 1)")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--corpora", type=Path, default=ROOT / "outputs" / "corpora")
    parser.add_argument("--prompt-template", default="chat")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--tracking-uri", help="MLflow store ($MLFLOW_TRACKING_URI, else sqlite:///mlflow.db); none: off")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = default_settings()
    settings += (domain_control(settings[0]),)
    cfg = Config(settings, backbone=args.backbone, corpora=args.corpora, prompt_template=args.prompt_template,
                 tracking_uri=args.tracking_uri, mlp=args.mlp)
    if args.quick:
        quick = default_settings(6, 2, 3, 6, 2, 1, ("peft-r8", "topk", "static"), ("peft-r8", "topk"))
        quick += (domain_control(quick[0]),)
        cfg = dataclasses.replace(cfg, settings=quick, steps=6, batch_size=4, seeds=(0,),
                                  lrs=(3e-3, 1e-2), max_new_tokens=8, timing_rounds=3,
                                  out=cfg.out.with_name(cfg.out.name + "_quick"), work=cfg.work / "quick")
    known = {s.name: s for s in cfg.settings}
    cfg.settings = tuple(s for s in cfg.settings if not s.domain_in_prompt)  # the control: only on request
    if args.settings:
        unknown = set(args.settings) - set(known)
        if unknown:
            raise SystemExit(f"unknown settings {sorted(unknown)}; known: {sorted(known)}")
        cfg.settings = tuple(known[n] for n in args.settings)
    if args.methods:  # peft-r8, the reference, always runs; the domain control keeps to its own methods
        cfg.settings = tuple(dataclasses.replace(s, methods=tuple(m for m in dict.fromkeys(["peft-r8", *args.methods])
                                                                  if not s.domain_in_prompt or m in s.methods))
                             for s in cfg.settings)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in {"steps": args.steps, "seeds": tuple(args.seeds or ()),
                                                         "out": args.out, "work": args.work}.items() if v})
    command = "python bench/routers_real_llm.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    Bench(cfg, command).run()
    print(write_report(cfg, json.loads(cfg.out.with_suffix(".json").read_text()), command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
