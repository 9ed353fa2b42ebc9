"""What the router benchmarks share (``bench/routers_all.py`` on ml-100k text, ``bench/routers_real.py`` on tweets and
BBC): the methods as ``MoAClassifier`` keyword arguments, the PEFT LoRA baseline, one Lightning fit with step
time and training memory probes, accuracy and routing usage per task, interleaved step timing, few-shot transfer
files, MLflow bookkeeping and an atomic JSON store of finished cells.

Step time and memory are measured as the module doc of ``bench/routers_all.py`` describes: the median wall time of
a training step, and the bytes autograd saves for backward (unique storages, parameters excluded) plus the trainable
parameters with their gradients and AdamW's two moments over the first 8 steps.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

warnings.filterwarnings("ignore")
logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

from moa.atomic import write_text  # noqa: E402
from moa.pipelines.data.text import TextData  # noqa: E402
from moa.pipelines.kinds.classifier.module import MoAClassifier, RLOOClassifier, TaskLabelHead  # noqa: E402
from moa.pipelines.tracking.logger import MLflowLogger  # noqa: E402
from moa.pretrained import minilm_dir  # noqa: E402

HIDDEN = 384
ROUTED = ("topk", "poly", "mhr", "remix", "hyper")  # methods with trainable router parameters (their own lr group)


def targets(layers: int, ffn: bool = False) -> str:
    """query and value of MiniLM's top ``layers`` layers (of 6), and with ``ffn`` their feed-forward
    (intermediate and output dense), as one regex (MoA and PEFT both full-match it)."""
    ids = "|".join(str(i) for i in range(6 - layers, 6))
    modules = r"attention\.self\.(query|value)" + (r"|intermediate\.dense|output\.dense" if ffn else "")
    return rf"encoder\.layer\.({ids})\.({modules})"


def method_spec(method: str, rank: int, n_tasks: int) -> dict:
    """``MoAClassifier`` keyword arguments of a method (pools of 4 experts, static: one per task; active rank ``rank``)."""
    half = rank // 2
    specs = {
        "topk": dict(n_experts=4, r=half, alpha=half, router="topk", top_k=2),
        "static": dict(n_experts=n_tasks, r=rank, alpha=rank, router="static", router_options={"key": "task_ids"}),
        "poly": dict(n_experts=4, r=rank, alpha=rank, router="poly", router_options={"n_tasks": n_tasks}),
        "mhr": dict(n_experts=4, r=rank, alpha=rank, router="mhr", router_options={"n_tasks": n_tasks, "n_heads": 4}),
        "flylora": dict(n_experts=4 * rank, r=4 * rank, alpha=4 * rank, router="flylora", top_k=rank,
                        router_options={"bias_u": 0.001}),
        "remix": dict(n_experts=4, r=half, alpha=half, router="remix", top_k=2),
        "hyper": dict(n_experts=4, r=half, alpha=half, router="topk", top_k=2, expert_kind="hyper",
                      expert_options={"arch": "mlp", "hidden_sizes": [64, 64]}),
    }
    return specs[method]


class PeftClassifier(L.LightningModule):
    """MiniLM with a plain PEFT LoRA and one label head per task: the baseline."""

    def __init__(self, label_counts: list[int], r: int, target_modules: str, lr: float, seed: int):
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel

        base = AutoModel.from_pretrained(str(minilm_dir()))
        torch.manual_seed(seed)
        self.model = get_peft_model(base, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=target_modules))
        torch.manual_seed(seed)
        self.head = TaskLabelHead(HIDDEN, label_counts, "mean")
        self.lr = lr

    def on_fit_start(self) -> None:
        self.train()  # from_pretrained returns eval mode; train like MoAModule.on_fit_start does

    def forward(self, batch: dict) -> Tensor:
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return self.head(hidden, batch["attention_mask"], batch["task_ids"])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)


def build(method: str, data: TextData, seed: int, *, rank: int, target: str, lr: float, router_lr: float,
          rloo_samples: int = 2, peft_rank: int | None = None):
    """A fresh module of ``method`` (``peft-lora``: PEFT LoRA of rank ``peft_rank or rank``)."""
    if method.startswith("peft-lora"):
        counts = [len(data.label_names[t]) for t in data.task_names]
        return PeftClassifier(counts, peft_rank or rank, target, lr, seed)
    spec = dict(method_spec(method, rank, len(data.task_names)), target_modules=target)
    cls = RLOOClassifier if method == "remix" else MoAClassifier
    extra = {"n_samples": rloo_samples} if method == "remix" else {}
    return cls(backbone="minilm", seed=seed, lr=lr, router_lr=router_lr, **spec, **extra)


# -- measurement --------------------------------------------------------------------------------------------------
class SavedBytes:
    """Context manager: the bytes autograd saves for backward inside it (each storage once, ``module``'s
    parameters excluded) are ``.bytes`` after it exits."""

    def __init__(self, module: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.seen: dict[int, int] = {}
        self.bytes = 0

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self.bytes = sum(self.seen.values())


class StepProbe(L.Callback):
    """Step wall times, and the training memory of the first ``memory_steps`` steps (see the module doc)."""

    def __init__(self, memory_steps: int = 8):
        self.times: list[float] = []
        self.memory_steps, self.saved_bytes, self._probe = memory_steps, 0, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step < self.memory_steps:
            self._probe = SavedBytes(module).__enter__()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t0)
        if self._probe is not None:
            self._probe.__exit__(None, None, None)
            self._probe, self.saved_bytes = None, max(self.saved_bytes, self._probe.bytes)

    def median_step(self) -> float:
        """The median over the steps after the memory probe and the first 10 %."""
        return statistics.median(self.times[max(self.memory_steps, len(self.times) // 10):] or self.times)


def trainable_params(module) -> int:
    """Adapter and router parameters that train (the task heads excluded)."""
    return sum(p.numel() for p in module.model.parameters() if p.requires_grad)


def state_bytes(module) -> int:
    """Trainable parameters (head included), their gradients and AdamW's two moments, in bytes."""
    return sum(4 * p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def active_params(method: str, module, rank: int) -> int:
    """Adapter parameters one token's output uses, summed over the adapted layers: k experts' A and B (the active
    rank's ``rank * (d_in + d_out)``), plus the router's gate (``d_in * E``) where it has one; FlyLoRA: A's
    non-zeros (frozen) and the k selected columns of B; Poly / MHR: the one mixed rank-r adapter of the example's
    task (mixing the skills is per example, not per token); hyper: the generated factors (the hypernetwork runs once
    per forward call, not per token); PEFT LoRA: all of it."""
    if method.startswith("peft-lora"):
        return trainable_params(module)
    total = 0
    for layer in module.model.moa_layers().values():
        d_in, d_out = layer.in_features, layer.out_features
        if method == "flylora":
            total += int((layer.pool.lora_A != 0).sum()) + rank * d_out
        else:
            total += rank * (d_in + d_out)
            gate = getattr(layer.router, "gate", None)
            if gate is not None:
                total += sum(p.numel() for p in gate.parameters())
    return total


def fit(module, data: TextData, steps: int, logger) -> StepProbe:
    probe = StepProbe()
    trainer = L.Trainer(max_steps=steps, logger=logger if logger is not None else False, callbacks=[probe],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=10, accelerator="cpu",
                        devices=1, default_root_dir=tempfile.gettempdir())
    trainer.fit(module, data)
    return probe


@torch.no_grad()
def evaluate(module, data: TextData, split: str = "test") -> dict[str, float]:
    """Accuracy per task on ``split`` (eval mode), by task name."""
    module.eval()
    names = data.task_names
    hits: dict[str, list[int]] = {t: [0, 0] for t in names}
    for batch in (data.test_dataloader() if split == "test" else data.val_dataloader()):
        pred = module(batch).argmax(-1)
        for t, ok in zip(batch["task_ids"].tolist(), (pred == batch["labels"]).tolist()):
            hits[names[t]][0] += int(ok)
            hits[names[t]][1] += 1
    module.train()
    return {t: h[0] / h[1] for t, h in hits.items() if h[1]}


@torch.no_grad()
def routing_usage(module, data: TextData, split: str = "val") -> dict[str, list[float]]:
    """Per task: the share of routing slots each expert received on ``split`` (the layers' ``last_usage`` averaged
    over layers, weighted by rows; one forward call per task of each batch). Empty for methods without routing."""
    if not hasattr(module.model, "routing_stats"):
        return {}
    module.eval()
    names, sums, rows = data.task_names, {}, {}
    for batch in (data.val_dataloader() if split == "val" else data.test_dataloader()):
        for t in batch["task_ids"].unique().tolist():
            keep = batch["task_ids"] == t
            module({k: v[keep] if isinstance(v, Tensor) and v.shape[:1] == keep.shape else v for k, v in batch.items()})
            stats = list(module.model.routing_stats().values())
            if not stats:
                continue
            usage = torch.stack([u.float() for u in stats]).mean(0) * int(keep.sum())
            sums[names[t]] = sums.get(names[t], 0) + usage
            rows[names[t]] = rows.get(names[t], 0) + int(keep.sum())
    module.train()
    return {t: (sums[t] / rows[t]).tolist() for t in sums}


def usage_summary(usage: dict[str, list[float]]) -> dict[str, float]:
    """``balance``: entropy of the mean usage over tasks / log(experts) (0: every slot to one expert, a collapsed
    router; 1: all experts alike); ``specialisation``: the mean total-variation distance of each task's usage from
    the mean (0: every task routed alike, so the router cannot be separating the tasks)."""
    if not usage:
        return {}
    vectors = [torch.tensor(u) for u in usage.values()]
    mean = torch.stack(vectors).mean(0)
    entropy = float(-(mean * mean.clamp_min(1e-12).log()).sum())
    return {"balance": entropy / math.log(len(mean)) if len(mean) > 1 else 0.0,
            "specialisation": statistics.mean(float((v - mean).abs().sum() / 2) for v in vectors)}


def time_interleaved(builders: dict, data: TextData, steps: int) -> dict[str, float]:
    """Median training-step time per method, interleaved step by step: each module (``builders[name]()``) is set up
    by a 1-step fit (Lightning builds the per-task head and the optimizer groups), then the methods take turns on
    the same batches (``training_step``, backward, AdamW step, as Lightning's automatic optimization does), so a
    change of the machine's load hits every method alike. The first 3 rounds are dropped."""
    modules, optimizers = {}, {}
    for name, make in builders.items():
        module = make()
        fit(module, data, 1, None)
        module._trainer = None  # self.log outside a Trainer only warns
        module.train()
        modules[name], optimizers[name] = module, module.configure_optimizers()
    times: dict[str, list[float]] = {m: [] for m in modules}
    loader = iter(data.train_dataloader())
    for step in range(steps + 3):
        batch = next(loader)
        for name, module in modules.items():
            t0 = time.perf_counter()
            loss = module.training_step(dict(batch), step)
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            if step >= 3:
                times[name].append(time.perf_counter() - t0)
    medians = {m: statistics.median(t) for m, t in times.items()}
    print("  interleaved step times: " + ", ".join(f"{m} {1e3 * t:.0f} ms" for m, t in medians.items()), flush=True)
    return medians


# -- data, tracking, storage --------------------------------------------------------------------------------------
def text_data(folder: Path, seed: int, max_length: int, batch_size: int) -> TextData:
    return TextData(train=str(folder / "train.jsonl"), val=str(folder / "val.jsonl"), test=str(folder / "test.jsonl"),
                    task_column="task", max_length=max_length, batch_size=batch_size, split_seed=seed)


def fewshot_files(folder: Path, out: Path, heldout: str, shots: int, seed: int) -> None:
    """``out/seen/`` (every task but ``heldout``) and ``out/shots/`` (``shots`` training rows per label of the
    held-out task, seeded; its full val and test)."""
    for split in ("train", "val", "test"):
        frame = pd.read_json(folder / f"{split}.jsonl", lines=True, dtype=False)
        for name, part in (("seen", frame[frame["task"] != heldout]), ("shots", frame[frame["task"] == heldout])):
            if name == "shots" and split == "train":
                part = part.sample(frac=1.0, random_state=seed).groupby("label").head(shots).sort_index()
            (out / name).mkdir(parents=True, exist_ok=True)
            part.to_json(out / name / f"{split}.jsonl", orient="records", lines=True, force_ascii=False)


def make_logger(experiment: str, run_name: str, tracking_uri: str | None) -> MLflowLogger:
    return MLflowLogger(experiment_name=experiment, run_name=run_name, tracking_uri=tracking_uri)


def finish(logger, params: dict, metrics: dict) -> None:
    """Params and final metrics on the run the logger opened (Lightning has finished it after the fit)."""
    client, run_id = logger.experiment, logger.run_id
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    client.log_batch(run_id, params=[Param(f"bench/{k}", str(v)[:500]) for k, v in params.items()],
                     metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def save_json(path: Path, value) -> None:
    """Write ``value`` as JSON atomically (a stop mid-write keeps the previous file)."""
    write_text(path, json.dumps(value, indent=1))


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"
