"""Calibration metrics (moa.metrics) against hand-computed values, and their logging by MoAModule."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassCalibrationError
from torchmetrics.functional.classification import binary_calibration_error
from transformers import BertConfig, BertModel

import moa
from moa.lightning import ClassificationHead, MoAModule
from moa.metrics import (
    ace,
    brier,
    calibration_metrics,
    classwise_ece,
    ece,
    mce,
    reliability_diagram,
    thresholded_ace,
)

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# 4 samples, 3 classes; top labels: 0.62 right, 0.46 wrong, 0.83 right, 0.67 wrong (0.62 and 0.67 share a bin)
PROBS = [[0.62, 0.27, 0.11], [0.21, 0.46, 0.33], [0.04, 0.13, 0.83], [0.67, 0.24, 0.09]]
LABELS = [0, 2, 2, 1]


def test_ece_mce_ace_brier_by_hand():
    # bins (0.6, 0.7]: conf 0.645, acc 0.5 (2 samples); (0.4, 0.5]: 0.46 vs 0; (0.8, 0.9]: 0.83 vs 1
    assert ece(PROBS, LABELS) == pytest.approx((2 * 0.145 + 0.46 + 0.17) / 4)
    assert mce(PROBS, LABELS) == pytest.approx(0.46)
    # N = 4 < 10 bins: N // 10 = 0 samples per bin, the last bin takes all: |0.645 - 0.5|
    assert ace(PROBS, LABELS) == pytest.approx(0.145)
    assert brier(PROBS, LABELS) == pytest.approx((0.2294 + 0.7046 + 0.0474 + 1.0346) / 4)


def test_classwise_ece_by_hand():
    # class 0: bins {0.62, 0.67} vs {1, 0} -> 2 * 0.145, 0.21 vs 0, 0.04 vs 0          = 0.54
    # class 1: bins {0.27, 0.24} vs {0, 1} -> 2 * 0.245, 0.46 vs 0, 0.13 vs 0          = 1.08
    # class 2: 0.11 vs 0, 0.33 vs 1, 0.83 vs 1, 0.09 vs 0 -> 0.11 + 0.67 + 0.17 + 0.09  = 1.04
    assert classwise_ece(PROBS, LABELS) == pytest.approx((0.54 + 1.08 + 1.04) / 12)


def test_thresholded_ace_by_hand():
    # threshold 0.1 keeps 10 of the 12 class probabilities: 10 bins of one, the mean |p - 1[c = y]|
    kept_gaps = [0.38, 0.27, 0.11, 0.21, 0.46, 0.67, 0.13, 0.17, 0.67, 0.76]
    assert thresholded_ace(PROBS, LABELS, threshold=0.1) == pytest.approx(sum(kept_gaps) / 10)
    # threshold 0.01 keeps all 12: nine bins of one (the smallest), the last bin the three largest
    # (0.62, 0.67, 0.83 with correctness 1, 0, 1: gap |0.70667 - 0.66667| = 0.04)
    smallest = [0.04, 0.09, 0.11, 0.13, 0.21, 0.76, 0.27, 0.67, 0.46]
    assert thresholded_ace(PROBS, LABELS, threshold=0.01) == pytest.approx((sum(smallest) + 3 * 0.04) / 12)


def test_bins_are_closed_on_the_right():
    # conf 0.5 belongs to (0.4, 0.5], conf 0.55 to (0.5, 0.6]: two bins, not one
    assert ece([[0.5, 0.5], [0.45, 0.55]], [0, 0]) == pytest.approx((0.5 + 0.55) / 2)
    # conf 1.0 belongs to the last bin, with 0.95
    assert ece([[1.0, 0.0], [0.95, 0.05]], [0, 1]) == pytest.approx(abs(0.975 - 0.5))
    # the first bin is closed on the left: class probabilities 0 and 0.1 share [0, 0.1]
    assert classwise_ece([[1.0, 0.0], [0.9, 0.1]], [0, 0]) == pytest.approx((0.1 + 2 * 0.05) / 4)


def reference_ace(conf, correct, n_bins=10):
    """The official loop, written out: sorted, N // n_bins per bin, the last bin takes the rest."""
    order = sorted(range(len(conf)), key=lambda i: conf[i])
    size, total = len(conf) // n_bins, 0.0
    for b in range(n_bins):
        idx = order[b * size: (b + 1) * size] if b < n_bins - 1 else order[b * size:]
        if idx:
            total += len(idx) * abs(sum(conf[i] for i in idx) / len(idx) - sum(correct[i] for i in idx) / len(idx))
    return total / len(conf)


def reference_ece(conf, correct, n_bins=10):
    total, mx = 0.0, 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        idx = [i for i, c in enumerate(conf) if (lo < c <= hi) or (b == 0 and c == 0)]
        if idx:
            gap = abs(sum(conf[i] for i in idx) / len(idx) - sum(correct[i] for i in idx) / len(idx))
            total, mx = total + len(idx) * gap, max(mx, gap)
    return total / len(conf), mx


@pytest.mark.parametrize("n", [7, 25, 103])
def test_equal_mass_and_equal_width_bins_match_plain_loops(n):
    g = torch.Generator().manual_seed(n)
    probs = torch.softmax(torch.randn(n, 4, generator=g) * 2, dim=1).double()
    labels = torch.randint(0, 4, (n,), generator=g)
    conf, pred = probs.max(1)
    correct = (pred == labels).double().tolist()
    assert ace(probs, labels) == pytest.approx(reference_ace(conf.tolist(), correct))
    expected_ece, expected_mce = reference_ece(conf.tolist(), correct)
    assert ece(probs, labels) == pytest.approx(expected_ece)
    assert mce(probs, labels) == pytest.approx(expected_mce)


def torchmetrics_ce(probs, labels, n_bins, norm):
    """torchmetrics' top-label calibration error, fed in two batches (it accumulates over updates)."""
    metric = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=n_bins, norm=norm)
    half = len(labels) // 2
    metric.update(probs[:half], labels[:half])
    metric.update(probs[half:], labels[half:])
    return float(metric.compute())


@pytest.mark.parametrize("n_classes", [2, 3, 10])
@pytest.mark.parametrize("n_bins", [10, 15])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])  # under- to over-confident
def test_ece_mce_classwise_match_torchmetrics(n_classes, n_bins, temperature):
    g = torch.Generator().manual_seed(n_classes * 100 + n_bins)
    probs = torch.softmax(torch.randn(500, n_classes, generator=g, dtype=torch.float64) * temperature, dim=1)
    labels = torch.randint(0, n_classes, (500,), generator=g)
    # drop confidences at a bin edge or 1, where the conventions differ (next test), even once torchmetrics has
    # rounded them to float32 (it does, for the multiclass metric)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    keep = (probs.max(1).values[:, None] - edges).abs().min(1).values > 1e-7
    probs, labels = probs[keep], labels[keep]
    assert len(labels) >= 495
    assert ece(probs, labels, n_bins) == pytest.approx(torchmetrics_ce(probs, labels, n_bins, "l1"), abs=1e-6)
    assert mce(probs, labels, n_bins) == pytest.approx(torchmetrics_ce(probs, labels, n_bins, "max"), abs=1e-6)
    # classwise ECE: the mean over classes of each class probability's binary calibration error
    per_class = [binary_calibration_error(probs[:, k], (labels == k).long(), n_bins) for k in range(n_classes)]
    assert classwise_ece(probs, labels, n_bins) == pytest.approx(float(torch.stack(per_class).mean()), abs=1e-6)


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("n_bins", [4, 8])
def test_bin_edges_mirror_torchmetrics(n_classes, n_bins):
    """At the edges the conventions differ: torchmetrics bins ``[lo, hi)`` (and conf = 1 on its own), moa bins
    ``(lo, hi]`` as HypeLoRA does. Mirrored (1 - conf against 1 - correct) one is the other, exactly: with
    dyadic edges and confidences every value below is exact."""
    top = torch.tensor([1 / n_classes, 0.25, 0.375, 0.5, 0.5, 0.625, 0.75, 0.75, 0.875, 1.0, 1.0], dtype=torch.float64)
    top = top[top >= 1 / n_classes].repeat(3)  # ties at every edge, and ties between classes (conf = 1 / C)
    probs = torch.cat([top[:, None], ((1 - top) / (n_classes - 1))[:, None].expand(-1, n_classes - 1)], dim=1)
    g = torch.Generator().manual_seed(n_bins)
    probs = probs[:, torch.randperm(n_classes, generator=g)]  # the top class is not always class 0
    labels = torch.randint(0, n_classes, (len(top),), generator=g)
    conf, pred = probs.max(dim=1)
    wrong = (pred != labels).long()
    for ours, norm in ((ece, "l1"), (mce, "max")):
        mirrored = float(binary_calibration_error(1 - conf, wrong, n_bins, norm=norm))
        assert ours(probs, labels, n_bins) == pytest.approx(mirrored, abs=1e-12), norm
    # the difference is real: conf 0.5 (right) and 0.625 (wrong) share torchmetrics' bin [0.5, 0.75), not ours
    pair, pair_labels = torch.tensor([[0.5, 0.5], [0.625, 0.375]]), torch.tensor([0, 1])
    assert ece(pair, pair_labels, 4) == pytest.approx((0.5 + 0.625) / 2)
    assert torchmetrics_ce(pair, pair_labels, 4, "l1") == pytest.approx(0.0625)


def test_perfect_predictions_are_calibrated():
    probs = torch.eye(3).repeat(4, 1)
    labels = torch.arange(3).repeat(4)
    metrics = calibration_metrics(probs, labels)
    assert metrics["accuracy"] == 1.0
    for name in ("ece", "classwise_ece", "mce", "ace", "brier", "tace_0.01"):
        assert metrics[name] == pytest.approx(0.0), name


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        ece([0.2, 0.8], [1])
    with pytest.raises(ValueError, match="labels must be"):
        ece(PROBS, [0, 1])
    with pytest.raises(ValueError, match=r"lie in \[0, 2\]"):
        ece(PROBS, [0, 1, 2, 3])
    with pytest.raises(TypeError, match="integer class ids"):
        ece(PROBS, [0.0, 1.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="softmax"):
        brier([[2.0, -1.0]], [0])


def test_reliability_diagram_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(200, 3, generator=g) * 2, dim=1)
    labels = torch.randint(0, 3, (200,), generator=g)
    path = reliability_diagram(probs, labels, tmp_path / "plots" / "reliability.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_moa_module_logs_calibration_over_the_validation_epoch():
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=16))
    model = moa.attach(bert, moa.MoAConfig(n_experts=2, r=4, top_k=1))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (60, 8), generator=g)
    rows = [{"input_ids": i, "labels": int(i[1] % 3)} for i in ids]
    module = MoAModule(model, head=ClassificationHead(32, 3, pooling="mean"), lr=1e-2)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0)
    val = DataLoader(rows, batch_size=16)  # 4 batches (16, 16, 16, 12): the metrics cover the whole epoch
    trainer.fit(module, DataLoader(rows, batch_size=16, shuffle=True), val)
    module.eval()
    with torch.no_grad():
        probs = torch.cat([torch.softmax(module(batch), -1) for batch in val])
    expected = calibration_metrics(probs, torch.tensor([r["labels"] for r in rows]))
    for name in ("ece", "mce", "ace", "classwise_ece", "brier"):
        assert trainer.callback_metrics[f"val/{name}"].item() == pytest.approx(expected[name], abs=1e-5), name
    assert module._calibration == {}  # the epoch's predictions are released
