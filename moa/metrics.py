"""Calibration metrics of a classifier, as defined in HypeLoRA's ``calibration_metrics.py``.

Every function takes ``probs`` ``[N, C]`` (softmax probabilities; tensors, arrays or lists) and integer
``labels`` ``[N]``, and returns a Python float. With ``conf_i = max_c p_ic``, ``pred_i = argmax_c p_ic`` and
``acc_i = 1[pred_i = y_i]``:

* :func:`ece`: 10 equal-width bins over [0, 1] (the first ``[0, 0.1]``, the others ``(lo, hi]``),
  ``sum_b |S_b|/N * |mean conf - mean acc|``;
* :func:`classwise_ece`: the same binning of every class's probability ``p_ic`` against ``1[y_i = c]``,
  ``sum_c sum_b |S_cb|/(N C) * |mean 1[y=c] - mean p_c|``;
* :func:`mce`: ``max_b |mean conf - mean acc|`` over non-empty equal-width bins;
* :func:`ace`: top-label adaptive ECE: confidences sorted into 10 equal-mass bins of ``N // 10`` samples (the
  last bin takes the rest), weighted like ECE. This is what the official code computes (its README says
  "averaged per class", its code does not);
* :func:`thresholded_ace`: every class probability ``p_ic >= threshold`` with correctness ``1[c = y_i]``,
  flattened, then the equal-mass binning of :func:`ace`;
* :func:`brier`: ``mean_i sum_c (p_ic - 1[y_i = c])^2``.

ECE, MCE and classwise ECE equal torchmetrics' ``MulticlassCalibrationError`` (``norm="l1"`` / ``"max"``) and
``binary_calibration_error`` per class except at the bin edges: torchmetrics bins ``[lo, hi)``, puts confidence 1
in a bin of its own and rounds multiclass confidences to float32, so it is not used here (tests compare the two).

:func:`reliability_diagram` draws accuracy and confidence per equal-width bin and saves a PNG (matplotlib, Agg).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from moa.experts.errors import UserError, UserTypeError

N_BINS = 10
TACE_THRESHOLDS = (0.01, 0.001, 0.0001)


def _check(probs, labels) -> tuple[Tensor, Tensor]:
    probs = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    labels = torch.as_tensor(labels).detach().to("cpu")
    if probs.dim() != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise UserError(f"probs must be [N, C] with N >= 1 samples and C >= 2 classes, got shape {tuple(probs.shape)}")
    if labels.dim() != 1 or labels.shape[0] != probs.shape[0]:
        raise UserError(f"labels must be [N] = [{probs.shape[0]}] to match probs {tuple(probs.shape)}, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise UserTypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= probs.shape[1]:
        raise UserError(f"labels must lie in [0, {probs.shape[1] - 1}], got values in [{int(labels.min())}, {int(labels.max())}]")
    if not torch.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1 + 1e-6:
        raise UserError("probs must be probabilities in [0, 1] (apply softmax to logits first)")
    return probs, labels.long()


def _equal_width_bins(values: Tensor, n_bins: int) -> Tensor:
    """Bin of each value: the first bin is ``[0, 1/n]``, the others ``(lo, hi]`` (``bin_lower < v <= bin_upper``)."""
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    return (torch.bucketize(values.contiguous(), edges, right=False) - 1).clamp(0, n_bins - 1)


def _binned_gaps(conf: Tensor, correct: Tensor, bins: Tensor, n_bins: int) -> tuple[Tensor, Tensor]:
    """Per bin: sample count and ``|mean conf - mean correct|`` (0 for empty bins)."""
    counts = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
    correct_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    gaps = (conf_sum - correct_sum).abs() / counts.clamp_min(1)
    return counts, gaps


def _top_label(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    conf, pred = probs.max(dim=1)
    return conf, (pred == labels).to(torch.float64)


def ece(probs, labels, n_bins: int = N_BINS) -> float:
    """Expected calibration error, equal-width bins, top label."""
    probs, labels = _check(probs, labels)
    conf, correct = _top_label(probs, labels)
    counts, gaps = _binned_gaps(conf, correct, _equal_width_bins(conf, n_bins), n_bins)
    return float((counts * gaps).sum() / conf.numel())


def mce(probs, labels, n_bins: int = N_BINS) -> float:
    """Maximum calibration error over the non-empty equal-width bins."""
    probs, labels = _check(probs, labels)
    conf, correct = _top_label(probs, labels)
    counts, gaps = _binned_gaps(conf, correct, _equal_width_bins(conf, n_bins), n_bins)
    return float(gaps[counts > 0].max())


def classwise_ece(probs, labels, n_bins: int = N_BINS) -> float:
    """Classwise ECE: every class's probability binned against its one-vs-rest label, averaged over classes."""
    probs, labels = _check(probs, labels)
    n, c = probs.shape
    onehot = torch.nn.functional.one_hot(labels, c).to(torch.float64)
    total = 0.0
    for k in range(c):
        counts, gaps = _binned_gaps(probs[:, k], onehot[:, k], _equal_width_bins(probs[:, k], n_bins), n_bins)
        total += float((counts * gaps).sum())
    return total / (n * c)


def _equal_mass_ace(conf: Tensor, correct: Tensor, n_bins: int) -> float:
    """Sort by confidence; bins of ``N // n_bins`` samples, the last one takes the rest (as the official code)."""
    n = conf.numel()
    if n == 0:
        return 0.0
    order = torch.argsort(conf, stable=True)
    conf, correct = conf[order], correct[order]
    size = n // n_bins
    bins = (torch.arange(n) // size).clamp(max=n_bins - 1) if size else torch.full((n,), n_bins - 1)
    counts, gaps = _binned_gaps(conf, correct, bins, n_bins)
    return float((counts * gaps).sum() / n)


def ace(probs, labels, n_bins: int = N_BINS) -> float:
    """Adaptive (equal-mass) calibration error of the top label."""
    probs, labels = _check(probs, labels)
    return _equal_mass_ace(*_top_label(probs, labels), n_bins)


def thresholded_ace(probs, labels, threshold: float = 0.01, n_bins: int = N_BINS) -> float:
    """Equal-mass ACE over every class probability ``>= threshold`` against its one-vs-rest correctness."""
    probs, labels = _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(torch.float64)
    keep = probs.flatten() >= threshold
    return _equal_mass_ace(probs.flatten()[keep], onehot.flatten()[keep], n_bins)


def brier(probs, labels) -> float:
    """Multi-class Brier score ``mean_i sum_c (p_ic - 1[y_i = c])^2``."""
    probs, labels = _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(torch.float64)
    return float(((probs - onehot) ** 2).sum(1).mean())


def calibration_metrics(probs, labels, n_bins: int = N_BINS) -> dict[str, float]:
    """All of the above (and accuracy) in one dict; thresholded ACE at 0.01, 0.001 and 0.0001."""
    probs, labels = _check(probs, labels)
    out = {
        "accuracy": float((probs.argmax(1) == labels).double().mean()),
        "ece": ece(probs, labels, n_bins),
        "classwise_ece": classwise_ece(probs, labels, n_bins),
        "mce": mce(probs, labels, n_bins),
        "ace": ace(probs, labels, n_bins),
        "brier": brier(probs, labels),
    }
    for eps in TACE_THRESHOLDS:
        out[f"tace_{eps:g}"] = thresholded_ace(probs, labels, eps, n_bins)
    return out


def reliability_diagram(probs, labels, path: str | os.PathLike, n_bins: int = N_BINS, title: str | None = None) -> Path:
    """Save a reliability diagram (accuracy per equal-width confidence bin, with the gap to the diagonal) as PNG.

    Uses matplotlib's Agg canvas directly: no display and no change to pyplot's global backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    probs, labels = _check(probs, labels)
    conf, correct = _top_label(probs, labels)
    bins = _equal_width_bins(conf, n_bins)
    counts = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(conf))
    acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct) / counts.clamp_min(1)
    mean_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf) / counts.clamp_min(1)
    centers = (torch.arange(n_bins, dtype=torch.float64) + 0.5) / n_bins
    filled = counts > 0

    figure = Figure(figsize=(4.5, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    width = 1.0 / n_bins
    axes.bar(centers[filled].numpy(), acc[filled].numpy(), width=width, edgecolor="black", label="accuracy")
    axes.bar(centers[filled].numpy(), (mean_conf - acc)[filled].numpy(), bottom=acc[filled].numpy(), width=width,
             color="red", alpha=0.3, edgecolor="red", label="gap to confidence")
    axes.plot([0, 1], [0, 1], "k--", linewidth=1)
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
             title=title or f"ECE {ece(probs, labels, n_bins):.3f}  (N={conf.numel()})")
    axes.legend(loc="upper left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
