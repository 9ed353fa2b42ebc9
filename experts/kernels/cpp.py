"""``cpp``: the routed LoRA as a small CPU C++ kernel, without gathered copies or padding (fp32, fp64).

``lora_cpu.cpp`` reads the rows of ``x`` (and, backward, of ``dy``) by index and accumulates each token's k expert
outputs straight into its output row (or, in the fused layer path, onto the base output ``y0``): no ``[P, d_in]``
gather, no ``[E, capacity]`` padding, no ``[P, d_out]`` buffer to combine. Pairs are ordered by (slot, expert,
token) with a counting sort; within one slot every token appears once, so the passes over one slot's expert groups
run in parallel (OpenMP, ``torch.get_num_threads()`` threads) with each output row written by one thread, no
atomics; ``dA`` / ``dB`` are reduced per expert, in parallel over experts. See the header of ``lora_cpu.cpp``.

The kernel is plain C (no torch headers, so the build takes seconds), built at first use with
``torch.utils.cpp_extension.load`` (``-O3 -march=native -fopenmp``) into torch's extension directory
(``TORCH_EXTENSIONS_DIR``), one build per CPU feature set (the name carries a hash of the CPU flags, so a shared
cache never hands a binary to a CPU that cannot run it). ``MOA_NO_CPP=1`` disables it; a failed build is recorded in
:data:`BUILD_ERROR` and everything falls back to the ``grouped`` PyTorch path. Other dtypes (fp16, bf16) and
non-CPU tensors take that path too. Expert ids outside ``[0, n_experts)`` raise :class:`~moa.experts.errors.UserError`
naming the id (the kernel checks them before reading anything by id: plans of the router skip validation).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import threading
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..errors import UserError
from .grouped import grouped_expand, lora_grouped
from .plan import ExpertPlan

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_cpu.cpp")
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
DTYPES = (torch.float32, torch.float64)
#: False when ``MOA_NO_CPP`` is set (to anything but "" or "0"): the ``cpp`` impl is then not registered.
ENABLED = os.environ.get("MOA_NO_CPP", "") in ("", "0")
BUILD_ERROR: BaseException | None = None
BUILD_SECONDS: float | None = None  # wall time of the first load in this process (a cached build: well under 1 s)

_lib = None
_tried = False
_lock = threading.Lock()

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_FWD_ARGS = [_P, _I64, _P, _P, _P, _P, _P, _P, _I64, _P, _P, _I64, _P, _I64, _I64, _I64, _I64, _I64, _I64, _INT]
_BWD_ARGS = [_P, _I64, _P, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _INT, _I64,
             _I64, _I64, _I64, _I64, _I64, _INT]
_TRANSPOSE_ARGS = [_P, _I64, _I64, _I64, _P, _I64, _I64, _I64, _INT, _INT]
_GATE_ARGS = [_P, _I64, _P, _I64, _P, _P, _I64, _P, _I64, _I64, _I64, _INT]


def _cpu_tag() -> str:
    """A short hash of what ``-march=native`` compiles for: the CPU's feature flags (Linux) or the machine name."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), flags)
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def load():
    """The loaded kernel library (built on the first call of the process if the cache has none), or None."""
    global _lib, _tried, BUILD_ERROR, BUILD_SECONDS
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if ENABLED:
            t0 = time.perf_counter()
            try:
                from torch.utils.cpp_extension import load as load_extension

                path = load_extension(
                    name=f"moa_lora_cpu_{_cpu_tag()}",
                    sources=[str(SOURCE)],
                    extra_cflags=CFLAGS,
                    extra_ldflags=["-fopenmp"],
                    is_python_module=False,
                    verbose=False,
                )
                lib = ctypes.CDLL(path)
                for name, args in (("forward", _FWD_ARGS), ("backward", _BWD_ARGS), ("transpose", _TRANSPOSE_ARGS)):
                    for suffix in ("f32", "f64"):
                        fn = getattr(lib, f"moa_lora_{name}_{suffix}")
                        fn.argtypes, fn.restype = args, None
                for suffix in ("f32", "f64"):
                    fn = getattr(lib, f"moa_gate_backward_sparse_{suffix}")
                    fn.argtypes, fn.restype = _GATE_ARGS, ctypes.c_int
                lib.moa_lora_schedule.argtypes = [_P, _I64, _I64, _I64, _P, _P]
                lib.moa_lora_schedule.restype = ctypes.c_int64  # -1, or the first pair with an out-of-range id
                _lib = lib
            except Exception as exc:  # no compiler, no OpenMP, ...: the PyTorch path serves
                BUILD_ERROR = exc
                logger.info("moa: the cpp LoRA kernel is unavailable (%s); using the grouped PyTorch path", exc)
            BUILD_SECONDS = time.perf_counter() - t0
        _tried = True
    return _lib


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return load() is not None


def supports(x: Tensor, A: Tensor, B: Tensor, weights: Tensor) -> bool:
    """The kernel handles these tensors: CPU, one dtype among :data:`DTYPES`, and the library loads."""
    return (
        x.device.type == "cpu"
        and x.dtype in DTYPES
        and A.dtype == B.dtype == weights.dtype == x.dtype
        and A.device == B.device == weights.device == x.device
        and available()
    )


def _rows(t: Tensor) -> Tensor:
    """``t`` as rows of unit stride (any row stride)."""
    return t if t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1) else t.contiguous()


def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


def _suffix(t: Tensor) -> str:
    return "f32" if t.dtype == torch.float32 else "f64"


class _CppLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y0, x, A, B, weights, ids, bias, inplace=False, gate_w=None, probs=None, scaling=1.0):
        # gate_w given: weights = probs * scaling, probs (no graph) the softmax of the k selected logits x . gate_w[e];
        # the backward takes their gradient to gate_w and x itself (see cpp_expand_routed)
        lib = load()
        n, d_in = x.shape
        E, r, _ = A.shape
        d_out, k = B.shape[1], ids.shape[1]
        nt = torch.get_num_threads()
        ids = ids.contiguous()
        sched = torch.empty(n * k, dtype=torch.long)
        starts = torch.empty(k * E + 1, dtype=torch.long)
        bad = lib.moa_lora_schedule(ids.data_ptr(), n, k, E, sched.data_ptr(), starts.data_ptr())
        if bad >= 0:  # checked before anything is read by id or written (an unvalidated plan, e.g. the router's)
            token, slot = divmod(bad, k)
            raise UserError(
                f"expert id {int(ids.view(-1)[bad])} (token {token}, slot {slot}) is out of range for a pool of "
                f"{E} experts: ids must lie in [0, {E - 1}]"
            )
        x, A = _rows(x), A.contiguous()
        # Bt = B^T [E, r, d_out]: the expand and the backward's B-products run along d_out. A blocked transpose in
        # the kernel library: torch's copy of the pool's strided B view is several times slower.
        Bt = x.new_empty(E, r, d_out)
        getattr(lib, f"moa_lora_transpose_{_suffix(x)}")(B.data_ptr(), *B.stride(), Bt.data_ptr(), E, r, d_out, 1, nt)
        w = weights.contiguous()
        h = x.new_empty(n * k, r)
        if inplace and y0 is not None and y0._base is None and y0.dim() == 2 and y0.stride(1) == 1:
            y = y0  # accumulated onto y0's own rows (each row read, then written, by one tile)
            ctx.mark_dirty(y0)
        else:
            y0 = None if y0 is None else _rows(y0)
            y = x.new_empty(n, d_out)
        bias = None if bias is None else bias.contiguous()
        getattr(lib, f"moa_lora_forward_{_suffix(x)}")(
            x.data_ptr(), x.stride(0), A.data_ptr(), Bt.data_ptr(), sched.data_ptr(), starts.data_ptr(),
            w.data_ptr(), _ptr(y0), 0 if y0 is None else y0.stride(0), _ptr(bias), y.data_ptr(), y.stride(0),
            h.data_ptr(), n, k, E, r, d_in, d_out, nt,
        )
        ctx.save_for_backward(x, A, B, Bt, w, h, sched, starts, gate_w, probs)
        ctx.scaling = scaling
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, A, B, Bt, w, h, sched, starts, gate_w, probs = ctx.saved_tensors
        need_y0, need_x, need_a, need_b, need_w = ctx.needs_input_grad[:5]
        need_g = gate_w is not None and ctx.needs_input_grad[8]
        n, d_in = x.shape
        E, r, d_out = Bt.shape
        k = w.shape[1]
        nt = torch.get_num_threads()
        fn = getattr(load(), f"moa_lora_backward_{_suffix(x)}")
        dy = _rows(dy)
        dx = x.new_empty(n, d_in) if need_x else None
        dA = torch.empty_like(A) if need_a else None  # every expert's rows are written (zeros for an empty expert)
        # dB in B's own layout (the pool's: rows of lora_B), written by the kernel's reduction: the gradient reaches
        # lora_B without a copy or a transpose
        dB = torch.empty_like(B) if need_b else None
        gate = gate_w is not None and (need_x or need_g)
        dw = w.new_empty(n, k) if need_w or gate else None
        dB_strides = dB.stride() if need_b else (0, 0, 0)

        def run(phase, dx, dA, dB, dw, dh=None, dl=None, dWg=None):
            fn(
                dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), A.data_ptr(), Bt.data_ptr(), sched.data_ptr(),
                starts.data_ptr(), w.data_ptr(), h.data_ptr(), _ptr(dx), _ptr(dA), _ptr(dB), *dB_strides, _ptr(dw),
                _ptr(dh), _ptr(dl), _ptr(gate_w if dl is not None else None), _ptr(dWg), phase, n, k, E, r, d_in,
                d_out, nt,
            )

        if not gate:
            run(0, dx, dA, dB, dw)
            return (dy if need_y0 else None), dx, dA, dB, dw, None, None, None, None, None, None
        dh = x.new_empty(n * k, r)
        run(1, None, None, dB, dw, dh)
        grad_p = dw * ctx.scaling  # d loss / d probs; the softmax's backward gives that of the selected logits:
        dl = (probs * (grad_p - (probs * grad_p).sum(-1, keepdim=True))).contiguous()
        dWg = torch.empty_like(gate_w) if need_g else None
        run(2, dx, dA, None, None, dh, dl, dWg)
        return (dy if need_y0 else None), dx, dA, dB, (dw if need_w else None), None, None, None, dWg, None, None


def sparse_gate_backward(d_logits: Tensor, x: Tensor, gate_w: Tensor, dx: Tensor | None, need_g: bool):
    """The router gate's backward when ``d_logits`` ``[N, E]`` is mostly exact zeros (top-k routing with no
    load-balancing loss in the backward: the renormalised weights depend on the k selected logits only):
    ``dx += d_logits @ gate_w`` in place (``dx`` None: skipped) and ``d_logits^T x`` returned (``need_g``), with the
    zero products left out. Returns ``(True, dW_gate or None)``, or ``(False, None)`` when the kernel does not take
    these tensors or more than one entry in eight is nonzero (nothing written: the caller runs the dense GEMMs)."""
    if (
        d_logits.device.type != "cpu"
        or d_logits.dtype not in DTYPES
        or not (x.dtype == gate_w.dtype == d_logits.dtype and (dx is None or dx.dtype == x.dtype))
        or d_logits.dim() != 2
        or load() is None
    ):
        return False, None
    d_logits, x, gate_w = _rows(d_logits), _rows(x), gate_w.contiguous()
    if dx is not None and (dx.dim() != 2 or dx.stride(1) != 1):
        return False, None
    n, E = d_logits.shape
    d = x.shape[1]
    dwg = x.new_empty(E, d) if need_g else None
    done = getattr(load(), f"moa_gate_backward_sparse_{_suffix(x)}")(
        d_logits.data_ptr(), d_logits.stride(0), x.data_ptr(), x.stride(0), gate_w.data_ptr(), _ptr(dx),
        0 if dx is None else dx.stride(0), _ptr(dwg), n, E, d, torch.get_num_threads(),
    )
    return (True, dwg) if done else (False, None)


def lora_cpp(x: Tensor, A: Tensor, B: Tensor, plan: ExpertPlan, weights: Tensor) -> Tensor:
    """x: [N, d_in], A: [E, r, d_in], B: [E, d_out, r], weights: [N, k] (scaling folded in); the ``grouped`` path
    for tensors the kernel does not take (see :func:`supports`)."""
    if not supports(x, A, B, weights):
        return lora_grouped(x, A, B, plan, weights)
    return _CppLoRA.apply(None, x, A, B, weights, plan.expert_ids, None)


def cpp_expand(
    y0: Tensor,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    plan: ExpertPlan,
    weights: Tensor,
    bias: Tensor | None = None,
    inplace: bool = False,
) -> Tensor:
    """``y0 + bias + lora(x)`` with each token's expert outputs accumulated onto its row of ``y0`` (the fused layer
    path's sparse expand; ``bias`` frozen, added in the same pass); :func:`~.grouped.grouped_expand` for tensors the
    kernel does not take. ``inplace``: the result is written into ``y0`` itself (rows of unit stride; a buffer the
    caller owns and reads no more, such as the base GEMM's output) where the kernel runs."""
    if not supports(x, A, B, weights) or y0.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        out = grouped_expand(y0, x, A, B, plan, weights)
        return out if bias is None else out + bias
    return _CppLoRA.apply(y0, x, A, B, weights, plan.expert_ids, bias, inplace)


def cpp_expand_routed(
    y0: Tensor,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    plan: ExpertPlan,
    probs: Tensor,
    scaling: float,
    gate_w: Tensor,
    bias: Tensor | None = None,
    inplace: bool = False,
) -> Tensor:
    """:func:`cpp_expand` with weights ``probs * scaling`` where ``probs`` ``[N, k]`` is the softmax of each row's k
    selected gate logits ``x @ gate_w[ids]^T`` (a top-k router with renormalised weights). Where the kernel runs it
    takes the gradient of ``probs`` to ``gate_w`` and ``x`` itself (``dW_gate[e] = sum dl x``, ``dx += dl W_gate[e]``
    in its passes over the pairs, ``dl`` the softmax's backward), so ``probs``' own graph is not used: the gate's
    backward costs no pass of its own. Elsewhere ``probs`` keeps its graph (the plain :func:`cpp_expand`)."""
    if (
        not supports(x, A, B, probs)
        or y0.dtype != x.dtype
        or (bias is not None and bias.dtype != x.dtype)
        or gate_w.dtype != x.dtype
        or gate_w.device != x.device
    ):
        return cpp_expand(y0, x, A, B, plan, probs * scaling, bias, inplace)
    probs = probs.detach()
    return _CppLoRA.apply(
        y0, x, A, B, probs * scaling, plan.expert_ids, bias, inplace, gate_w.contiguous(), probs.contiguous(), scaling
    )
