"""The GPU protocol for the grouped expert LoRA op (issue 8): every implementation timed with CUDA events.

    python bench/grouped_lora_gpu.py                  # the full grid on the current CUDA device (bf16), ~10 min on an H100
    python bench/grouped_lora_gpu.py --quick          # a few shapes
    python bench/grouped_lora_gpu.py --smoke          # tiny shapes on the CPU: checks this script, times nothing useful

Grid: d_in in {1024, 4096}, d_out in {4096, 14336}, E in {8, 64}, k in {1, 2}, r in {8, 16}, N from 1 to 16384;
forward and forward+backward. Implementations: ``base`` (the frozen linear), ``loop``, ``dense``, ``grouped``
(``grouped_mm``), ``triton``, ``auto``, and PEFT's mixed-batch ``adapter_names`` path (k = 1 only: one adapter per
row; forward only, PEFT refuses ``adapter_names`` in training mode). The memory floor is the unfused-kernel floor of ``kernels.md`` section 10 at the bandwidth measured here
(a device-to-device copy): ``N (2 k d_in + 4 d_out) + 2 min(E, N k) r (d_in + d_out)`` bytes in bf16.
Targets printed per shape at N >= 512: ``auto`` >= 5x faster than ``loop`` and >= 2x faster than PEFT's mixed
batch (k = 1), and the op within 1.5x of its memory floor. The table goes to ``bench/results/grouped_lora_gpu_<device>.md``.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from moa.experts import grouped_lora, runnable_impls

RESULTS = Path(__file__).parent / "results"


def timer(device: torch.device):
    """``measure(fn, reps) -> median ms``: CUDA events on a GPU, perf_counter elsewhere."""

    def measure(fn, reps: int) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return measure


def measured_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(device)(lambda: dst.copy_(src), 10)
    return 2 * n / (ms * 1e-3)


def peft_mixed(base: nn.Linear, E: int, r: int):
    """PEFT LoRA with E adapters on ``base``; returns ``call(x, names)`` running the mixed-batch path."""
    from peft import LoraConfig, PeftModel, get_peft_model

    holder = nn.Module()
    holder.lin = base
    holder.forward = lambda x: holder.lin(x)
    model: PeftModel = get_peft_model(holder, LoraConfig(r=r, lora_alpha=r, target_modules=["lin"]), adapter_name="e0")
    for e in range(1, E):
        model.add_adapter(f"e{e}", LoraConfig(r=r, lora_alpha=r, target_modules=["lin"]))
    model.to(base.weight.device, base.weight.dtype).eval()  # PEFT allows adapter_names in eval mode only
    return lambda x, names: model(x, adapter_names=names)


def run_case(d_in, d_out, E, k, r, N, dtype, device, reps, backward, measure, bandwidth) -> dict[str, float]:
    g = torch.Generator(device="cpu").manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).to(device, dtype).requires_grad_(False)
    x = torch.randn(N, d_in, generator=g).to(device, dtype).requires_grad_(backward)
    A = (torch.randn(E, r, d_in, generator=g) / d_in**0.5).to(device, dtype).requires_grad_(backward)
    B = (torch.randn(E, d_out, r, generator=g) * 0.02).to(device, dtype).requires_grad_(backward)
    w, ids = torch.randn(N, E, generator=g).softmax(-1).topk(k)
    w, ids = w.to(device, dtype), ids.to(device)
    grad = torch.randn(N, d_out, generator=g).to(device, dtype)

    def step(fn):
        def go():
            if backward:
                fn().backward(grad)
            else:
                with torch.no_grad():
                    fn()
        return go

    fns = {"base": step(lambda: base(x))}
    for impl in [i for i in ("loop", "dense", "grouped", "triton") if i in runnable_impls(device)] + ["auto"]:
        fns[impl] = step(lambda impl=impl: grouped_lora(x, A, B, ids, w, 1.0, impl=impl))
    if k == 1 and not backward:  # PEFT's mixed batch is inference-only
        call = peft_mixed(base, E, r)
        names = [f"e{int(e)}" for e in ids[:, 0].tolist()]
        fns["peft_mixed"] = step(lambda: call(x, names))
    out = {name: measure(fn, reps) for name, fn in fns.items()}
    floor_bytes = N * (2 * k * d_in + 4 * d_out) + 2 * min(E, N * k) * r * (d_in + d_out)
    out["floor"] = floor_bytes / bandwidth * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="d_in=d_out=4096, E in {8, 64}, r=16, N in {1, 512, 4096}")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script only)")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        grid = [(64, 96, E, k, 8, N) for E, k, N in itertools.product((4, 16), (1, 2), (1, 64))]
        args.reps = 3
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/grouped_lora_gpu.py needs a CUDA device (use --smoke to check the script on a CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        if args.quick:
            grid = [(4096, 4096, E, k, 16, N) for E, k, N in itertools.product((8, 64), (1, 2), (1, 512, 4096))]
        else:
            Ns = [1, 16, 128, 512, 2048, 8192, 16384]
            grid = [
                (d_in, d_out, E, k, r, N)
                for d_in, d_out in ((1024, 4096), (4096, 4096), (4096, 14336))
                for E, k, r, N in itertools.product((8, 64), (1, 2), (8, 16), Ns)
            ]
    measure, bandwidth = timer(device), measured_bandwidth(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    header = (
        f"# grouped_lora on {name}\n\ntorch {torch.__version__}, triton "
        f"{getattr(__import__('triton'), '__version__', '-') if 'triton' in runnable_impls(device) else 'n/a'}, "
        f"{dtype}, measured copy bandwidth {bandwidth / 1e9:.0f} GB/s, median of {args.reps} (ms)\n"
    )
    lines = [header]
    print(header)
    for backward in (False, True):
        mode = "forward+backward" if backward else "forward"
        cols = ["base", "loop", "dense", "grouped", "triton", "auto", "peft_mixed", "floor"]
        title = f"\n## {mode}\n\n| d_in | d_out | E | k | r | N | " + " | ".join(cols) + " | loop/auto | peft/auto | auto/floor |"
        lines += [title, "|" + " --- |" * (len(cols) + 9)]
        print(title)
        for d_in, d_out, E, k, r, N in grid:
            res = run_case(d_in, d_out, E, k, r, N, dtype, device, args.reps, backward, measure, bandwidth)
            cells = [f"{res[c]:.3f}" if c in res else "-" for c in cols]
            ratios = [
                f"{res['loop'] / res['auto']:.2f}" if "loop" in res else "-",
                f"{res['peft_mixed'] / res['auto']:.2f}" if "peft_mixed" in res else "-",
                f"{res['auto'] / res['floor']:.2f}",
            ]
            row = f"| {d_in} | {d_out} | {E} | {k} | {r} | {N} | " + " | ".join(cells + ratios) + " |"
            lines.append(row)
            print(row, flush=True)
    if not args.smoke:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"grouped_lora_gpu_{name.replace(' ', '_')}.md"
        path.write_text("\n".join(lines) + "\n")
        print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
