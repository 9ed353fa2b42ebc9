"""Grouped expert LoRA kernels: implementations timed side by side, interleaved, in one run.

    python bench/grouped_lora.py                 # the two target shapes of issue 2 (about 2 minutes)
    python bench/grouped_lora.py --sweep         # dense vs grouped / cpp over (N, E*r): where ``auto`` switches
    python bench/grouped_lora.py --cpu-time      # 1 thread, the thread's CPU time: steadier on a loaded machine

Layers compared (fp32, d_in = d_out = 768, N = 2048 tokens, k = 2, ``x`` requires grad as inside a model):
``base`` the frozen linear alone; ``peft`` a PEFT LoRA layer of rank r on it; ``moa[impl]`` a MoALinear (the
same frozen base, a top-k softmax router, E experts of rank r) with each kernel implementation; ``moa[auto]`` is
the layer's fused path (base GEMM with the gate and, for dense routing, the shrink; combine into its output),
the others run the base layer, the router and the op ``grouped_lora(impl=...)`` one after another.
Every repetition runs every layer once (round robin) so a noisy shared CPU hits them alike; medians are
printed with the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from moa.experts import LoRAPool, grouped_lora, runnable_impls
from moa.experts.kernels import cpp as _cpp
from moa.layer import ContextSlot, MoALinear
from moa.routers import build_router


def peft_layer(base: nn.Linear, r: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    holder = nn.Module()
    holder.lin = base
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=r, target_modules=["lin"]))
    layer = model.base_model.model.lin
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return layer


def moa_layer(base: nn.Linear, E: int, r: int, k: int, impl: str) -> MoALinear:
    pool = LoRAPool(base.in_features, base.out_features, E, r, impl=impl)
    nn.init.normal_(pool.lora_B, std=0.02)
    return MoALinear(base, pool, build_router("topk", base.in_features, E, k), ContextSlot())


CLOCK = time.perf_counter


def time_layers(layers: dict[str, nn.Module], x: torch.Tensor, backward: bool, reps: int) -> dict[str, float]:
    grad = torch.randn(x.shape[0], next(iter(layers.values()))(x).shape[-1])
    times: dict[str, list[float]] = {name: [] for name in layers}
    for rep in range(reps + 2):  # two warm-up rounds
        for name, layer in layers.items():
            x.grad = None
            for param in layer.parameters():  # as optimizer.zero_grad() leaves them (set_to_none, torch's default):
                param.grad = None             # a step's backward writes fresh gradients, it does not add to old ones
            t0 = CLOCK()
            if backward:
                layer(x).backward(grad)
            else:
                with torch.no_grad():
                    layer(x)
            if rep >= 2:
                times[name].append(CLOCK() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def target_case(E: int, r: int, n_tokens: int, d: int, k: int, reps: int, layer_target: float, speedup_target: float) -> None:
    torch.manual_seed(0)
    base = nn.Linear(d, d).requires_grad_(False)
    x = torch.randn(n_tokens, d, requires_grad=True)
    layers: dict[str, nn.Module] = {"base": base, "peft": peft_layer(base, r)}
    for impl in ["loop", *sorted(set(runnable_impls("cpu")) - {"loop"}), "auto"]:
        layers[f"moa[{impl}]"] = moa_layer(base, E, r, k, impl)
    clock = "thread CPU time" if CLOCK is time.thread_time else "wall time"
    print(f"\n## E={E}, r={r}, k={k}, N={n_tokens}, d_in=d_out={d}, fp32, {torch.get_num_threads()} threads, {clock}, median of {reps}")
    for backward in (False, True):
        ms = time_layers(layers, x, backward, reps)
        mode = "forward+backward" if backward else "forward"
        print(f"{mode}:")
        for name, t in ms.items():
            print(f"  {name:14s} {t:8.2f} ms   x{t / ms['base']:.2f} base   x{t / ms['peft']:.2f} peft")
        if backward:
            vs_peft = ms["moa[auto]"] / ms["peft"]
            vs_loop = ms["moa[loop]"] / ms["moa[auto]"]
            print(
                f"targets: MoA layer (auto) / PEFT LoRA r={r} = {vs_peft:.2f} (target <= {layer_target}) "
                f"{'OK' if vs_peft <= layer_target else 'MISSED'}; loop / auto = {vs_loop:.2f} "
                f"(target >= {speedup_target}) {'OK' if vs_loop >= speedup_target else 'MISSED'}"
            )


def sweep(d: int, k: int, reps: int) -> None:
    """Op-level dense vs the sparse impls (grouped, and cpp where it built), forward+backward: the ``auto`` crossover."""
    sparse = ["grouped", *(["cpp"] if "cpp" in runnable_impls("cpu") and _cpp.available() else [])]
    Ns = [16, 64, 256, 1024, 4096]
    configs = [(4, 8), (8, 8), (8, 16), (16, 16), (32, 16), (64, 16)]
    ratios: dict[str, dict[tuple[int, int], list[float]]] = {impl: {} for impl in sparse}
    for E, r in configs:
        for impl in sparse:
            ratios[impl][E, r] = []
        for n in Ns:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, d, generator=g, requires_grad=True)
            A = torch.randn(E, r, d, generator=g).requires_grad_()
            B = torch.randn(E, d, r, generator=g).requires_grad_()
            w, ids = torch.randn(n, E, generator=g).softmax(-1).topk(k)
            grad = torch.randn(n, d, generator=g)
            fns = {impl: (lambda impl=impl: grouped_lora(x, A, B, ids, w, impl=impl)) for impl in ("dense", *sparse)}
            ts = {impl: [] for impl in fns}
            for rep in range(reps + 2):
                for impl, fn in fns.items():
                    t0 = CLOCK()
                    fn().backward(grad)
                    if rep >= 2:
                        ts[impl].append(CLOCK() - t0)
            for impl in sparse:
                ratios[impl][E, r].append(statistics.median(ts["dense"]) / statistics.median(ts[impl]))
    for impl in sparse:
        print(f"\n## sweep: grouped_lora op, forward+backward, d={d}, k={k}; ratio = dense / {impl} (> 1: {impl} wins)")
        print("E x r (E*r)  " + "".join(f"N={n:<8d}" for n in Ns))
        for (E, r), row in ratios[impl].items():
            print(f"{E:3d} x {r:<3d}({E * r:5d}) " + "".join(f"{v:<10.2f}" for v in row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="dense vs grouped crossover sweep instead of the targets")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cpu-time", action="store_true",
        help="time with 1 thread and its CPU time (time.thread_time): other processes on a shared CPU inflate wall "
        "time, and with 2 threads OpenMP's spin-waits, far more than they change the CPU time one thread needs",
    )
    args = parser.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK, args.threads = time.thread_time, 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, impls {runnable_impls('cpu')}")
    if args.sweep:
        sweep(args.dim, 2, args.reps)
        return
    target_case(8, 8, args.tokens, args.dim, 2, args.reps, layer_target=1.15, speedup_target=1.5)
    target_case(64, 16, args.tokens, args.dim, 2, args.reps, layer_target=1.3, speedup_target=5.0)


if __name__ == "__main__":
    main()
