"""bench/routers_real.py end to end on a tiny tweets-like corpus: the lr chosen per method is the argmax of the
recorded validation accuracies, the table's mean ± sd and delta are recomputed from the JSON, and a second run
resumes without fitting anything."""

import json
import statistics
from pathlib import Path

import pytest
import torch

LABELS = ("negative", "neutral", "positive")


def _corpora(folder: Path) -> Path:
    """Two tweet domains whose rows name their label word (learnable in a few steps)."""
    (folder / "tweets").mkdir(parents=True)
    for split, n in (("train", 24), ("val", 6), ("test", 6)):
        rows = [{"text": f"{domain} is {LABELS[i % 3]} today {i}", "label": LABELS[i % 3], "task": domain,
                 "domain": domain} for i in range(n) for domain in ("apple", "claritin")]
        (folder / "tweets" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _row(table: str, method: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.slow
def test_routers_real_selects_on_validation_and_resumes(tmp_path, monkeypatch, bench_script):
    torch.set_num_threads(1)
    bench = bench_script("routers_real")
    out = tmp_path / "results" / "real.md"
    argv = ["--corpora", str(_corpora(tmp_path / "corpora")), "--work", str(tmp_path / "work"), "--out", str(out),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--settings", "tweets", "--methods", "peft-lora",
            "poly", "--lrs", "0.001", "0.05", "--router-mults", "1", "10", "--seeds", "0", "1", "--steps", "2",
            "--no-transfer", "--timing-steps", "0", "--threads", "1"]
    assert bench.main(argv) == 0
    store = json.loads(out.with_suffix(".json").read_text())
    cells, text = store["cells"], out.read_text()
    for method in ("peft-lora", "poly"):
        tuned = {k: c for k, c in cells.items() if k.startswith(f"tweets/{method}/lr=")}
        first = [tuned[f"tweets/{method}/lr={lr}/rx=1/seed=0"] for lr in ("0.001", "0.05")]
        if method == "poly":  # router lr x 10 at the better lr of router lr x 1
            best_lr = max(first, key=lambda c: statistics.mean(c["val"].values()))["lr"]
            assert set(tuned) == {f"tweets/poly/lr={lr}/rx=1/seed=0" for lr in ("0.001", "0.05")} | {
                f"tweets/poly/lr={best_lr:g}/rx=10/seed=0"}
            assert tuned[f"tweets/poly/lr={best_lr:g}/rx=10/seed=0"]["router_lr"] == pytest.approx(10 * best_lr)
        best = max(tuned.values(), key=lambda c: statistics.mean(c["val"].values()))  # first of equals: grid order
        chosen = store["selected"]["tweets"][method]
        assert (chosen["lr"], chosen["router_lr"]) == (best["lr"], best["router_lr"])
        runs = [cells[f"tweets/{method}/seed={s}"] for s in (0, 1)]
        assert all((r["lr"], r["router_lr"]) == (best["lr"], best["router_lr"]) for r in runs)
        means = [statistics.mean(r["test"].values()) for r in runs]
        row = _row(text, method)
        assert row[1] == f"{best['lr']:g}" + (f" ({best['router_lr']:g})" if method == "poly" else "")
        assert row[4] == f"{statistics.mean(means):.3f} ± {statistics.stdev(means):.3f}"
        assert row[2] == f"{statistics.mean(r['test']['apple'] for r in runs):.3f} ± " \
                         f"{statistics.stdev(r['test']['apple'] for r in runs):.3f}"
    base = statistics.mean(statistics.mean(cells[f"tweets/peft-lora/seed={s}"]["test"].values()) for s in (0, 1))
    poly = statistics.mean(statistics.mean(cells[f"tweets/poly/seed={s}"]["test"].values()) for s in (0, 1))
    assert _row(text, "poly")[5] == f"{poly - base:+.3f}"
    usage = cells["tweets/poly/seed=0"]["usage"]
    assert set(usage) == {"apple", "claritin"} and all(abs(sum(u) - 1) < 1e-5 and len(u) == 4 for u in usage.values())
    assert cells["tweets/peft-lora/seed=0"]["usage"] == {}

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished cell was fitted again")

    monkeypatch.setattr(bench.harness, "fit", no_fit)
    assert bench.main(argv) == 0
    assert json.loads(out.with_suffix(".json").read_text())["cells"] == cells
    with pytest.raises(SystemExit, match="other settings"):
        bench.main([*argv, "--steps", "3"])


def test_saved_bytes_counts_what_backward_keeps_once_and_no_parameter(bench_script):
    SavedBytes = bench_script("router_harness").SavedBytes

    layer = torch.nn.Linear(8, 16, bias=False)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedBytes(layer) as saved:
        hidden = layer(x).relu()
        (hidden * hidden).sum()   # mul saves `hidden` (already counted by relu: its output) twice, one storage
    # linear saves its input x (its weight is a parameter: not counted); relu saves its output [4, 16]
    assert saved.bytes == x.numel() * 4 + hidden.numel() * 4
    with SavedBytes(layer) as nothing:
        with torch.no_grad():
            layer(x).relu()
    assert nothing.bytes == 0
