"""The grouped expert LoRA op: one op, interchangeable implementations.

``grouped_lora(x, A, B, expert_ids, weights, scaling)`` computes, for every token n routed to k of E experts,
``sum_j weights[n, j] * scaling * B[e_nj] @ A[e_nj] @ x[n]``.

Implementations (all exact, all with autograd for x, A, B and the weights):

* ``loop``     reference, one expert at a time (never chosen by ``auto``)
* ``dense``    dense-masked: two GEMMs over the packed pool, zero weight for unrouted experts
* ``grouped``  sort by expert, ``torch.nn.functional.grouped_mm``, weighted ``index_add_`` combine
* ``scatter``  ``grouped`` with the combine done by torch-scatter (only when it is installed)
* ``cpp``      a CPU C++ kernel (:mod:`.cpp`, built at first use): rows read by index, each token's k expert outputs
  accumulated into its output row, no gathered copies, no padding, no combine buffer (fp32/fp64; other dtypes and
  devices take the ``grouped`` path). Not registered under ``MOA_NO_CPP=1``
* ``triton``   one fused Triton kernel (gather, shrink, scale, expand) over the expert-sorted pairs, grouped-GEMM
  backward (only when triton is installed and can run here: a CUDA device, or ``TRITON_INTERPRET=1`` for CPU tensors)

:mod:`.fused` is not an implementation of this op but the layer-level path ``MoALinear`` takes: the base GEMM
with the router gate and the dense shrink folded in, the expand accumulated into the base output.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import cpp as _cpp
from . import scatter as _scatter
from . import triton_lora as _triton
from ..errors import UserError
from .dense import lora_dense
from .grouped import lora_grouped
from .loop import lora_loop
from .plan import ExpertPlan

Impl = Callable[[Tensor, Tensor, Tensor, "ExpertPlan | None", Tensor], Tensor]

IMPLS: dict[str, Impl] = {"loop": lora_loop, "dense": lora_dense, "grouped": lora_grouped}
if _scatter.AVAILABLE:
    IMPLS["scatter"] = _scatter.lora_scatter
if _cpp.ENABLED:  # built on first use; falls back to ``grouped`` if the build fails (``_cpp.BUILD_ERROR``)
    IMPLS["cpp"] = _cpp.lora_cpp
if _triton.AVAILABLE and (_triton.INTERPRETED or torch.cuda.is_available()):
    IMPLS["triton"] = _triton.lora_triton

# Crossover between ``dense`` and ``grouped``, measured with ``bench/grouped_lora.py --sweep`` on the 2-core CPU this
# project is developed on (fp32, forward+backward, d_in = d_out = 768, k = 2). Dense-masked costs ~E*r/(k*r) times
# the sparse FLOPs but needs no sort, gather or scatter; it wins while E*r stays small or the batch is tiny.
DENSE_MAX_EXPERT_ROWS = 128  # E * r at or below which dense won at every N we measured
DENSE_MAX_PAIRS = 128  # N * k at or below which sorting costs more than the wasted FLOPs
# With the ``cpp`` kernel (no sort in PyTorch, no gather, no padding, no combine buffer) the sparse path wins from a
# much smaller pool: ``--sweep`` (1 thread, CPU time) measured dense / cpp = 1.1-1.5 at E*r = 64 for N = 16..4096 and
# 1.2-7.5 above; at E*r = 32 cpp lost from N = 1024 (0.6-0.9). At the layer level (N = 2048, the fused paths) cpp
# measured 1.03x PEFT against dense's 1.11x at E=8, r=8, 1.04x against 1.20x at E=8, r=16, equal at E=4, r=8.
CPP_MIN_EXPERT_ROWS = 64  # E * r from which ``auto`` takes ``cpp`` on the CPU (when it built)


def choose_impl(n_tokens: int, n_experts: int, rank: int, top_k: int | None, device_type: str = "cpu") -> str:
    """The implementation ``auto`` uses for this shape (``top_k=None``: dense soft routing) on this device type.

    Decode-sized calls (``N * k <= DENSE_MAX_PAIRS``) take the dense form on every device. Otherwise, on the CPU,
    sparse routing with ``E * r >= CPP_MIN_EXPERT_ROWS`` takes the ``cpp`` kernel when it built (else ``grouped`` above
    the dense crossover); on CUDA, ``E * r`` above the dense crossover goes to the fused ``triton`` kernel when it is
    registered (the thresholds were measured on the CPU; the GPU crossover is not measured yet).
    """
    if top_k is None or top_k >= n_experts:
        return "dense"
    if n_tokens * top_k <= DENSE_MAX_PAIRS:  # decode: a few tokens; one GEMM pair beats sorting and launching
        return "dense"
    if device_type == "cpu" and n_experts * rank >= CPP_MIN_EXPERT_ROWS and "cpp" in IMPLS and _cpp.available():
        return "cpp"
    if n_experts * rank <= DENSE_MAX_EXPERT_ROWS:
        return "dense"
    if device_type == "cuda" and "triton" in IMPLS:
        return "triton"
    return "grouped"


def available_impls() -> list[str]:
    return ["auto", *IMPLS]


def runnable_impls(device: "torch.device | str" = "cpu") -> list[str]:
    """Registered implementations that can run on tensors of ``device`` (triton needs CUDA or the interpreter)."""
    return [name for name in IMPLS if name != "triton" or _triton.can_run(device)]


def grouped_lora(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    expert_ids: "Tensor | ExpertPlan | None",
    weights: Tensor,
    scaling: float = 1.0,
    impl: str = "auto",
) -> Tensor:
    """Routed LoRA experts for a batch of tokens.

    Args:
        x: ``[..., d_in]`` token activations (any number of leading dims).
        A: ``[E, r, d_in]`` expert down-projections (``LoRAPool.A`` is a view of the packed weight).
        B: ``[E, d_out, r]`` expert up-projections (``LoRAPool.B``).
        expert_ids: ``[..., k]`` integer expert of each routing slot, an :class:`ExpertPlan` over the flattened
            tokens (metadata shared across layers), or ``None`` for dense soft routing.
        weights: ``[..., k]`` routing weight of each slot, or ``[..., E]`` when ``expert_ids`` is ``None``.
        scaling: LoRA scale (``alpha / r``), folded into the weights.
        impl: ``"auto"`` or one of :data:`IMPLS`.

    Returns:
        ``[..., d_out]``, the routed LoRA update (without the base layer).
    """
    if A.dim() != 3 or B.dim() != 3:
        raise UserError(f"A must be [E, r, d_in] and B [E, d_out, r]; got {tuple(A.shape)} and {tuple(B.shape)}")
    E, r, d_in = A.shape
    if B.shape[0] != E or B.shape[2] != r:
        raise UserError(f"A {tuple(A.shape)} and B {tuple(B.shape)} disagree on experts or rank (want B [{E}, d_out, {r}])")
    if x.shape[-1] != d_in:
        raise UserError(f"x has {x.shape[-1]} features but the experts expect d_in={d_in}")
    lead = x.shape[:-1]
    if weights.shape[:-1] != lead:
        raise UserError(f"weights {tuple(weights.shape)} must have the leading shape of x {tuple(lead)}")
    x2 = x.reshape(-1, d_in)
    n = x2.shape[0]
    w2 = weights.reshape(n, weights.shape[-1]) * scaling

    if expert_ids is None:
        if weights.shape[-1] != E:
            raise UserError(f"dense routing weights must have {E} columns (one per expert), got {weights.shape[-1]}")
        plan, top_k = None, None
    elif isinstance(expert_ids, ExpertPlan):
        plan = expert_ids
        if plan.n_experts != E or plan.n_tokens != n or plan.top_k != weights.shape[-1]:
            raise UserError(
                f"plan covers {plan.n_tokens} tokens x {plan.top_k} slots over {plan.n_experts} experts; "
                f"the call has {n} tokens x {weights.shape[-1]} weights over {E} experts"
            )
        top_k = plan.top_k
    else:
        if expert_ids.shape != weights.shape:
            raise UserError(f"expert_ids {tuple(expert_ids.shape)} and weights {tuple(weights.shape)} must match")
        plan = ExpertPlan(expert_ids.reshape(n, weights.shape[-1]), E)
        top_k = plan.top_k

    if impl == "auto":
        impl = choose_impl(n, E, r, top_k, x.device.type)
    fn = IMPLS.get(impl)
    if fn is None:
        hint = {
            "scatter": " (torch-scatter is not installed)",
            "triton": " (it needs triton and a CUDA device, or TRITON_INTERPRET=1 set before importing triton)",
        }.get(impl, "")
        raise UserError(f"unknown grouped_lora impl {impl!r}{hint}; choose from {available_impls()}")
    if plan is None and impl != "dense":  # only dense consumes a dense gate as it is
        plan = ExpertPlan.all_experts(n, E, device=x.device)
    out = fn(x2, A, B, plan, w2)
    return out.reshape(*lead, B.shape[1])


__all__ = ["ExpertPlan", "IMPLS", "available_impls", "choose_impl", "grouped_lora", "runnable_impls"]
