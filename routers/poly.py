"""``poly`` and ``mhr``: task-level routing over an inventory of K LoRA skills (Polytropon and Multi-Head Routing).

Polytropon (Ponti et al., EACL 2023) and MHR (Caccia et al., NeurIPS 2023), as in the official code (microsoft/mttl,
``mhr-camera-ready``). The pool's K experts are the *skills*. Each task t has routing logits ``Z[t]`` of shape
``[h * K]`` (``h`` heads, ``h = 1`` for Poly); per head q the weights over skills are

    w[t, q] = s / (sum_k s_k + 1e-12),   s = sigmoid(Z[t, q] + log u - log(1 - u))  (training, Gumbel-sigmoid)
                                          s = sigmoid(Z[t, q])                      (evaluation)

and they mix the skill *parameters*, A and B separately (never the skill outputs). Head q owns the q-th block of
A's input features (d_in / h columns) and of B's output features (d_out / h rows); all heads feed the same rank-r
bottleneck:

    A_t[:, block_q] = sum_k w[t, q, k] A_k[:, block_q],   B_t[block_q, :] = sum_k w[t, q, k] B_k[block_q, :]
    y = W0 x + (alpha / r) B_t A_t x,   alpha = 1 unless the config sets it (scale 1/r, as mttl and HF PEFT)

The training noise u is drawn per *example* (each example of a task gets its own mixture, as mttl and PEFT), so in
training the router returns one mixed adapter per example (per (example, task) pair with per-token task ids) as
``factors`` and each token's index into them; without noise (evaluation, ``relaxed_bernoulli=False``) examples of
a task share one adapter, so it returns one per task *present in the batch*. Either way the pool runs the batch
through the grouped kernels in one call, with no loop over examples.

Initialisation follows mttl (the official code): skills' A ~ U(+-1/sqrt(3 d_in)) (``calculate_gain('leaky_relu',
sqrt(5)) / sqrt(d_in)``, full d_in even with heads), B = 0, Z ~ U(+-1e-3). HF PEFT's Poly draws A from kaiming
(a=sqrt(5)) on each ``[r, d_in / h]`` block, a bound sqrt(3 h) times larger; the outputs at init are the same
(B = 0) and PEFT checkpoints load exactly (:func:`skills_from_split_layout`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from moa.experts import ExpertPlan, LoRAPool, PoolSpec, build_pool, keep_reference
from moa.experts.errors import UserError, UserTypeError

from .base import Router, Routing, RoutingContext, register_router

EPS = 1e-12  # mttl / PEFT: w = s / (sum s + EPS)
LOGIT_INIT = 1e-3  # Z ~ U(-1e-3, 1e-3): about uniform routing at the start
SHARED_KEY = "task_skill_logits"  # the shared Z's key in MoAModel.shared (granularity="shared")
GRANULARITIES = ("layer", "shared")


def uniform_noise(shape: torch.Size, dtype: torch.dtype, device) -> Tensor:
    """u ~ U(0, 1) for the relaxed-Bernoulli draw, from the global generator with ``torch.rand`` as PyTorch's
    ``RelaxedBernoulli`` (hence PEFT) draws it: seeded runs match, and activation checkpointing, which restores the
    RNG state, re-runs a layer with the same noise."""
    return torch.rand(shape, dtype=dtype, device=device)


class TaskSkillLogits(nn.Module):
    """Routing logits ``Z [n_tasks, n_heads * n_skills]`` (mttl / PEFT ``module_logits``) and the weights they give."""

    def __init__(self, n_tasks: int, n_heads: int, n_skills: int):
        super().__init__()
        if n_tasks < 1 or n_heads < 1 or n_skills < 1:
            raise UserError(f"n_tasks, n_heads and n_skills must be >= 1, got {n_tasks}, {n_heads}, {n_skills}")
        self.n_heads, self.n_skills = n_heads, n_skills
        self.logits = nn.Parameter(torch.empty(n_tasks, n_heads * n_skills))
        self.reset_parameters()

    @property
    def n_tasks(self) -> int:
        return self.logits.shape[0]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.logits.uniform_(-LOGIT_INIT, LOGIT_INIT)

    def weights(self, task_ids: Tensor | None = None, sample: bool = False) -> Tensor:
        """``[n, h, K]`` normalised skill weights of the given tasks (all tasks when ``None``).

        ``sample``: relaxed-Bernoulli (Gumbel-sigmoid, temperature 1) draw instead of the plain sigmoid.
        """
        z = self.logits if task_ids is None else self.logits.index_select(0, task_ids)
        z = z.view(-1, self.n_heads, self.n_skills)
        if sample:  # one draw per row: rows are examples in training (see _TaskSkillRouter.forward)
            u = uniform_noise(z.shape, z.dtype, z.device).clamp(torch.finfo(z.dtype).tiny, 1 - torch.finfo(z.dtype).eps)
            z = z + u.log() - (-u).log1p()
        s = torch.sigmoid(z)
        return s / (s.sum(-1, keepdim=True) + EPS)

    @torch.no_grad()
    def resize(self, n_tasks: int, keep_existing: bool = False) -> None:
        """Give Z ``n_tasks`` rows, drawn fresh from U(+-1e-3) as mttl's ``resize_module_logits``.

        ``keep_existing`` keeps the rows of the tasks that stay (to add tasks); mttl re-draws every row, which is
        what few-shot transfer to new tasks needs (a new task must not start from another task's row).
        """
        if not isinstance(n_tasks, int) or n_tasks < 1:
            raise UserError(f"n_tasks must be a positive integer, got {n_tasks!r}")
        old = self.logits
        new = torch.empty(n_tasks, old.shape[1], dtype=old.dtype, device=old.device).uniform_(-LOGIT_INIT, LOGIT_INIT)
        if keep_existing:
            kept = min(n_tasks, old.shape[0])
            new[:kept] = old[:kept]
        self.logits = nn.Parameter(new, requires_grad=old.requires_grad)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The routing logits train in the ``"router"`` group (their own, larger learning rate)."""
        return {"router": [self.logits]} if self.logits.requires_grad else {}

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, n_heads={self.n_heads}, n_skills={self.n_skills}"


def mix_skills(A: Tensor, B: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head parameter mixtures of K skills: ``A [K, r, d_in]``, ``B [K, d_out, r]``, ``weights [G, h, K]``.

    Returns ``A_mix [G, r, d_in]`` and ``B_mix [G, d_out, r]``: head q mixes the q-th d_in/h block of A's columns
    and the q-th d_out/h block of B's rows.
    """
    K, r, d_in = A.shape
    d_out = B.shape[1]
    G, h, k = weights.shape
    if k != K or B.shape[0] != K:
        raise UserError(f"weights over {k} skills do not fit a pool of {K} skills (A {tuple(A.shape)}, B {tuple(B.shape)})")
    if d_in % h or d_out % h:
        raise UserError(f"{h} heads must divide the in and out features ({d_in}, {d_out})")
    weights = weights.to(A.dtype)
    a_mix = torch.einsum("gqk,krqi->grqi", weights, A.reshape(K, r, h, d_in // h)).reshape(G, r, d_in)
    b_mix = torch.einsum("gqk,kqor->gqor", weights, B.reshape(K, h, d_out // h, r)).reshape(G, d_out, r)
    return a_mix, b_mix


def skills_from_split_layout(a_split: Tensor, b_split: Tensor) -> tuple[Tensor, Tensor]:
    """mttl / PEFT layout ``A [h, K, d_in/h, r]``, ``B [h, K, r, d_out/h]`` -> moa ``A [K, r, d_in]``, ``B [K, d_out, r]``.

    Heads are stacked along d_in in A (``A_t = reshape(einsum(...), (d_in, r))``) and concatenated along d_out in B
    (after PEFT's ``transpose(1, 2)``), so head q is the q-th contiguous block of each.
    """
    h, K, d_in_h, r = a_split.shape
    if b_split.dim() != 4 or b_split.shape[:3] != (h, K, r):
        raise UserError(f"B {tuple(b_split.shape)} does not fit A {tuple(a_split.shape)}: want [{h}, {K}, {r}, d_out/h]")
    A = a_split.permute(1, 3, 0, 2).reshape(K, r, h * d_in_h)
    B = b_split.permute(1, 0, 3, 2).reshape(K, h * b_split.shape[3], r)
    return A, B


def skills_to_split_layout(A: Tensor, B: Tensor, n_heads: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`skills_from_split_layout`."""
    K, r, d_in = A.shape
    d_out = B.shape[1]
    if d_in % n_heads or d_out % n_heads:
        raise UserError(f"{n_heads} heads must divide the in and out features ({d_in}, {d_out})")
    a_split = A.reshape(K, r, n_heads, d_in // n_heads).permute(2, 0, 3, 1)
    b_split = B.reshape(K, n_heads, d_out // n_heads, r).permute(1, 0, 3, 2)
    return a_split.contiguous(), b_split.contiguous()


@torch.no_grad()
def init_skills_like_mttl(pool: LoRAPool) -> None:
    """mttl's SkilledLoRA init: A ~ U(+-gain / sqrt(d_in)), gain = calculate_gain('leaky_relu', sqrt(5)); B = 0."""
    bound = nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(pool.in_features)
    pool.lora_A.uniform_(-bound, bound)
    pool.lora_B.zero_()


class _TaskSkillRouter(Router):
    """Shared implementation of ``poly`` (one head) and ``mhr`` (``n_heads`` heads).

    Options (``MoAConfig.router_options``):
        n_tasks: number of tasks (rows of Z); the forward call gives ``task_ids`` in ``[0, n_tasks)``.
        granularity: ``"layer"`` (default, mttl's ``finegrained``): one Z per adapted layer; ``"shared"``: one Z for
            all layers (mttl's ``coarsegrained``), stored once in ``MoAModel.shared`` (its relaxed-Bernoulli sample is
            also drawn once per forward call, per example, and every layer uses that example's draw).
        relaxed_bernoulli: Gumbel-sigmoid sampling of the weights in training (default True, as mttl's default and
            PEFT); False uses the plain sigmoid in training too (mttl's T0 configs).
        average: route every task to the per-head average of the skills (uniform weights 1/K, mttl's
            ``AverageSelector``): the MHR-mu adaptation mode. ``task_ids`` are then optional.
    """

    mixes_expert_outputs = False  # a task's adapter is (sum w A)(sum w B): merge / to_peft would be wrong
    uses_top_k = False  # one mixed adapter per token, whatever MoAConfig.top_k says

    def __init__(
        self,
        in_features: int,
        n_experts: int,
        top_k: int = 1,
        *,
        n_tasks: int | None = None,
        n_heads: int = 1,
        granularity: str = "layer",
        relaxed_bernoulli: bool = True,
        average: bool = False,
    ):
        super().__init__(in_features, n_experts, top_k)
        if n_tasks is None:
            raise UserError(
                f"router {self.name!r} routes by task: give router_options={{'n_tasks': T}} (one routing row per task)"
            )
        if not isinstance(n_tasks, int) or n_tasks < 1:
            raise UserError(f"router {self.name!r}: n_tasks must be a positive integer, got {n_tasks!r}")
        if not isinstance(n_heads, int) or n_heads < 1:
            raise UserError(f"router {self.name!r}: n_heads must be a positive integer, got {n_heads!r}")
        if granularity not in GRANULARITIES:
            raise UserError(f"router {self.name!r}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.n_heads, self.granularity = n_heads, granularity
        self.relaxed_bernoulli, self.average = bool(relaxed_bernoulli), bool(average)
        self._n_tasks = n_tasks  # until the logits exist (shared granularity: in build_pool)
        if granularity == "layer":
            self.skill_logits = TaskSkillLogits(n_tasks, n_heads, n_experts)

    # -- the logits: this layer's own, or the model's shared ones ---------------------------------------------
    @property
    def logits_module(self) -> TaskSkillLogits:
        if self.granularity == "layer":
            return self.skill_logits
        module = self.__dict__.get("_shared_logits")
        if module is None:
            raise RuntimeError(
                f"router {self.name!r} with granularity='shared' has no logits yet: build_pool(kind, spec, shared) "
                "creates them in the shared modules (moa.attach does this)"
            )
        return module

    @property
    def n_tasks(self) -> int:
        if self.granularity == "shared" and "_shared_logits" not in self.__dict__:
            return self._n_tasks
        return self.logits_module.n_tasks

    def build_pool(self, kind: str, spec: PoolSpec, shared: nn.ModuleDict) -> nn.Module:
        """The skill inventory (the configured expert kind, mttl init for LoRA skills) and, if shared, the one Z."""
        if spec.in_features % self.n_heads or spec.out_features % self.n_heads:
            raise UserError(
                f"router {self.name!r}: n_heads={self.n_heads} must divide the in and out features of every adapted "
                f"layer; {spec.name or 'a layer'} maps {spec.in_features} -> {spec.out_features}"
            )
        if spec.alpha is None:  # Poly / MHR scale the update by 1/r (alpha = 1) in mttl and PEFT
            spec = dataclasses.replace(spec, alpha=1.0)
        pool = build_pool(kind, spec, shared)
        if not callable(getattr(type(pool), "factors", None)):  # the class, so generated factors are not built yet
            raise UserError(f"router {self.name!r} mixes skill parameters: expert kind {kind!r} has no A and B factors")
        if isinstance(pool, LoRAPool):
            init_skills_like_mttl(pool)
        if self.granularity == "shared":
            if SHARED_KEY not in shared:
                shared[SHARED_KEY] = TaskSkillLogits(self._n_tasks, self.n_heads, self.n_experts).to(device=spec.device)
            module = shared[SHARED_KEY]
            if (module.n_tasks, module.n_heads, module.n_skills) != (self._n_tasks, self.n_heads, self.n_experts):
                raise UserError(f"the shared routing logits {module.extra_repr()} do not fit router {self.extra_repr()}")
            keep_reference(self, "_shared_logits", module)
        return pool

    # -- routing ---------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, ctx: RoutingContext, pool: nn.Module) -> Routing:
        lead = tuple(x.shape[:-1])
        n_tokens = math.prod(lead)
        if self.average:
            plan = ctx.cached(("poly-average", lead), lambda: ExpertPlan(
                torch.zeros(n_tokens, 1, dtype=torch.long, device=x.device), 1, validate=False))
            weights = torch.full((1, self.n_heads, self.n_experts), 1.0 / self.n_experts, device=x.device)
            counts = torch.full((1,), float(n_tokens), device=x.device)
        else:
            logits = self.logits_module
            sample = self.training and self.relaxed_bernoulli
            if sample:  # noise per example: one adapter per (example, task) group
                groups, plan, counts, key = ctx.cached(("poly-examples", lead, self.n_tasks),
                                                       lambda: self._example_plan(ctx, lead, x.device))
            else:  # no noise: the examples of a task share its adapter, one per task present
                groups, plan, counts = ctx.cached(("poly-tasks", lead, self.n_tasks),
                                                  lambda: self._task_plan(ctx, lead, x.device))
                key = ("tasks", lead)
            if self.granularity == "shared":  # one draw per forward call (per example) for every layer
                weights = ctx.cached(("poly-weights", id(logits), key, sample), lambda: logits.weights(groups, sample))
            else:
                weights = logits.weights(groups, sample)
        a_mix, b_mix = mix_skills(pool.A, pool.B, weights)
        usage = (counts.to(weights.dtype)[:, None] * weights.mean(1)).sum(0) / max(n_tokens, 1)
        ones = x.new_ones(n_tokens, 1)
        return Routing(plan, ones, factors=(a_mix, b_mix), usage=usage)

    def _task_plan(self, ctx: RoutingContext, lead: tuple, device) -> tuple[Tensor, ExpertPlan, Tensor]:
        """The tasks present (sorted), the plan sending each token to its task's mixture, and tokens per task."""
        ids = self._token_task_ids(ctx, lead, device)
        if ids.numel() == 0:
            present, inverse, counts = ids.new_zeros(1), ids, ids.new_zeros(1)
        else:
            present, inverse, counts = torch.unique(ids, sorted=True, return_inverse=True, return_counts=True)
        return present, ExpertPlan(inverse.view(-1, 1), present.numel(), validate=False), counts

    def _example_plan(self, ctx: RoutingContext, lead: tuple, device) -> tuple[Tensor, ExpertPlan, Tensor, tuple]:
        """Groups for per-example noise: each group's task, the plan sending each token to its group, tokens per group,
        and a key naming the grouping (for the shared draw).

        An example is an index of the input's first dim. With per-sample task ids the groups are the examples in order
        (group b = example b, as PEFT's ``[B, h, K]`` draw); with per-token ids, the (example, task) pairs present.
        """
        ids = self._token_task_ids(ctx, lead, device)
        n_examples = lead[0] if lead else 1
        if ids.numel() == 0:
            return ids.new_zeros(1), ExpertPlan(ids.view(-1, 1), 1, validate=False), ids.new_zeros(1), ("empty",)
        per_example = ids.numel() // n_examples
        example = torch.arange(n_examples, device=device).repeat_interleave(per_example)
        if ctx.task_ids.dim() == 1 and ctx.task_ids.shape[0] == n_examples:
            counts = torch.full((n_examples,), per_example, device=device)
            plan = ExpertPlan(example.view(-1, 1), n_examples, validate=False)
            # keyed by the batch size alone: layers of other lengths (encoder / decoder) share the examples' draws
            return ctx.task_ids.to(device).long(), plan, counts, ("examples", n_examples)
        keys, inverse, counts = torch.unique(example * self.n_tasks + ids, sorted=True, return_inverse=True,
                                             return_counts=True)
        plan = ExpertPlan(inverse.view(-1, 1), keys.numel(), validate=False)
        return keys % self.n_tasks, plan, counts, ("tokens", lead)

    def _token_task_ids(self, ctx: RoutingContext, lead: tuple, device) -> Tensor:
        """The call's task ids, validated, one per token (flattened)."""
        if ctx.task_ids is None:
            raise UserError(
                f"router {self.name!r} routes by task: pass task_ids=... (one id per sample [B] or per token [B, T]) "
                "in the forward call"
            )
        if ctx.task_ids.dtype.is_floating_point or ctx.task_ids.dtype == torch.bool:
            raise UserTypeError(f"task_ids must be integer ids, got dtype {ctx.task_ids.dtype}")
        ids = ctx.per_token("task_ids", torch.Size(lead)).reshape(-1).to(device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_tasks):
            raise UserError(
                f"task_ids must lie in [0, {self.n_tasks - 1}] for {self.n_tasks} tasks; got values in "
                f"[{int(ids.min())}, {int(ids.max())}] (resize the routing logits for new tasks: moa.transfer.resize_tasks)"
            )
        return ids

    # -- adaptation and inspection ---------------------------------------------------------------------------
    @torch.no_grad()
    def task_skill_weights(self) -> Tensor:
        """``[n_tasks, h, K]`` evaluation-mode routing weights (uniform when ``average`` is on)."""
        if self.average:
            return torch.full((self.n_tasks, self.n_heads, self.n_experts), 1.0 / self.n_experts)
        return self.logits_module.weights(sample=False).detach().float().cpu()

    def resize(self, n_tasks: int, keep_existing: bool = False) -> None:
        """Resize Z to ``n_tasks`` rows (fresh U(+-1e-3) rows; see :meth:`TaskSkillLogits.resize`)."""
        self.logits_module.resize(n_tasks, keep_existing)
        self._n_tasks = n_tasks

    def set_average(self, average: bool) -> None:
        """Switch to (or from) the per-head average of the skills (MHR-mu)."""
        self.average = bool(average)

    def extra_repr(self) -> str:
        return (
            f"n_skills={self.n_experts}, n_tasks={self.n_tasks}, n_heads={self.n_heads}, "
            f"granularity={self.granularity!r}, relaxed_bernoulli={self.relaxed_bernoulli}, average={self.average}"
        )


@register_router
class PolyRouter(_TaskSkillRouter):
    """``poly``: Polytropon, one routing distribution over the K skills per task (MHR with one head)."""

    name = "poly"

    def __init__(self, in_features: int, n_experts: int, top_k: int = 1, *, n_heads: int = 1, **options):
        if n_heads != 1:
            raise UserError(f"router 'poly' has one head; for n_heads={n_heads} use router='mhr'")
        super().__init__(in_features, n_experts, top_k, n_heads=1, **options)


@register_router
class MHRRouter(_TaskSkillRouter):
    """``mhr``: Multi-Head Routing, one routing distribution per task and head (``router_options['n_heads']``)."""

    name = "mhr"

    def __init__(self, in_features: int, n_experts: int, top_k: int = 1, *, n_heads: int | None = None, **options):
        if n_heads is None:
            raise UserError("router 'mhr' needs router_options={'n_heads': h} (h divides every adapted layer's in and out features)")
        super().__init__(in_features, n_experts, top_k, n_heads=n_heads, **options)
