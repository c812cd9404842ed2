"""The report's figures, drawn with matplotlib's object API (no pyplot state, no display needed).

Each `*_figure` function returns a matplotlib Figure; `figure_bytes` renders one to PNG (or SVG)
bytes for the page, `save_figure` writes one to a file. A figure is only drawn when it has data
to show: one epoch of history or one probe candidate is a table in the page, never empty axes.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.atomic import atomic_path

DPI = 110
TRAIN_COLOUR, VAL_COLOUR, ACCENT = "#2f6fed", "#e8590c", "#667085"


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # only here: importing matplotlib costs ~0.3 s

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def figure_bytes(fig: Any, fmt: str = "png") -> bytes:
    """The figure rendered to PNG (or another matplotlib format) in memory."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI)
    return buf.getvalue()


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """savefig to `path` atomically; the format comes from `path`'s suffix (the temp name ends in .tmp)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format=path.suffix.lstrip(".").lower() or "png")
    return path


def _finite(values: Sequence[float]) -> bool:
    return any(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


# ----------------------------------------------------------------------------- confusion matrix


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str], title: str = "") -> Any:
    """Row-normalised colours (recall per true class), raw counts in the cells when there is room."""
    cm = np.asarray(confusion)
    n = len(class_names)
    size = min(2.6 + 0.4 * n, 24)
    fig = _figure(size + 0.8, size)
    ax = fig.add_subplot()
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, shrink=0.7, label="share of the true class")
    ticks = [c if len(c) <= 18 else c[:17] + "…" for c in class_names]
    fs = 8 if n <= 40 else 6
    ax.set_xticks(range(n), labels=ticks, rotation=90 if n > 6 else 0, fontsize=fs)
    ax.set_yticks(range(n), labels=ticks, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
    return fig


def plot_confusion_matrix(confusion: np.ndarray, class_names: list[str], path: str | os.PathLike, title: str = "Confusion matrix") -> Path:
    """The confusion matrix written to `path` (PNG, SVG or PDF, by its suffix)."""
    return save_figure(confusion_figure(confusion, class_names, title), path)


# ----------------------------------------------------------------------------- training


def training_figure(history: Sequence[dict[str, float]]) -> Any | None:
    """Loss, accuracy and learning rate per epoch (train and validation); None below two epochs.

    A series with no finite value (validation without a validation split, the rate of a run
    that logged none) is left out rather than drawn as an empty line.
    """
    if len(history) < 2:
        return None
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    lr = [h.get("lr", math.nan) for h in history]
    panels = [("loss", "train_loss", "val_loss"), ("accuracy", "train_acc", "val_acc")]
    show_lr = _finite(lr) and any(v > 0 for v in lr if math.isfinite(v))
    fig = _figure(4.0 * (len(panels) + show_lr), 3.2)
    axes = fig.subplots(1, len(panels) + show_lr, squeeze=False)[0]
    for ax, (name, train_key, val_key) in zip(axes, panels):
        for key, label, colour in ((train_key, "train", TRAIN_COLOUR), (val_key, "validation", VAL_COLOUR)):
            ys = [h.get(key, math.nan) for h in history]
            if _finite(ys):
                ax.plot(ep, ys, marker="o" if len(ep) <= 30 else None, ms=3, label=label, color=colour)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    if show_lr:
        ax = axes[-1]
        ax.plot(ep, lr, color=ACCENT)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.grid(alpha=0.3)
    return fig


def plot_training_curves(history: list[dict[str, float]], path: str | os.PathLike) -> Path | None:
    """The training curves written to `path`; None (and no file) below two epochs."""
    fig = training_figure(history)
    return save_figure(fig, path) if fig is not None else None


def probe_figure(sweep: Sequence[dict[str, float]]) -> Any | None:
    """The linear probe's L2 sweep: train and validation accuracy and loss against the L2
    strength (log scale), the kept strength marked; None below two strengths tried."""
    if len(sweep) < 2:
        return None
    l2 = [r["l2"] for r in sweep]
    fig = _figure(8.0, 3.2)
    axes = fig.subplots(1, 2)
    for ax, (name, train_key, val_key) in zip(axes, (("accuracy", "train_acc", "val_acc"), ("loss", "train_loss", "val_loss"))):
        for key, label, colour in ((train_key, "train", TRAIN_COLOUR), (val_key, "validation", VAL_COLOUR)):
            ys = [r.get(key, math.nan) for r in sweep]
            if _finite(ys):
                ax.plot(l2, ys, marker="o", ms=4, label=label, color=colour)
        for r in sweep:
            if r.get("chosen"):
                ax.axvline(r["l2"], color=ACCENT, ls="--", lw=1, label=f"kept: L2 {r['l2']:g}")
        ax.set_xscale("log")
        ax.set_xlabel("L2 strength")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=8)
    return fig


# ----------------------------------------------------------------------------- calibration


def reliability_figure(bins: Sequence[dict[str, Any]], ece: float | None = None) -> Any:
    """Accuracy per confidence bin (calibration.reliability_diagram's bins) as bars, the bin's
    mean confidence as a marker, the diagonal of a calibrated model, and the images per bin below."""
    fig = _figure(5.2, 5.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    filled = [b for b in bins if b["count"]]
    widths = [b["upper"] - b["lower"] for b in filled]
    lows = [b["lower"] for b in filled]
    centres = [(b["lower"] + b["upper"]) / 2 for b in filled]
    top.plot([0, 1], [0, 1], color=ACCENT, ls="--", lw=1, label="calibrated")
    top.bar(
        lows,
        [b["accuracy"] for b in filled],
        width=widths,
        align="edge",
        color=TRAIN_COLOUR,
        alpha=0.85,
        edgecolor="white",
        label="accuracy",
    )
    top.plot(centres, [b["confidence"] for b in filled], ls="none", marker="D", ms=5, color=VAL_COLOUR, label="mean confidence")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy")
    top.set_title("Reliability" + (f" (ECE {ece:.3f})" if ece is not None and math.isfinite(ece) else ""), pad=24)
    top.legend(frameon=False, fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    top.grid(alpha=0.3)
    bottom.bar(lows, [b["count"] for b in filled], width=widths, align="edge", color=ACCENT, edgecolor="white")
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("images")
    return fig
