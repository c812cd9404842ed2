"""Plots and the static HTML report, written without a notebook (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.metrics import format_confusion_matrix, most_confused

HISTORY_FILE = "metrics.csv"
HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "images_per_s"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_history(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else float("nan")) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_confusion_matrix(confusion: np.ndarray, class_names: list[str], path: str | os.PathLike, title: str = "Confusion matrix") -> Path:
    """Row-normalised colours, raw counts in the cells (when there is room for them)."""
    plt = _plt()
    cm = np.asarray(confusion)
    n = len(class_names)
    size = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=class_names, rotation=90 if n > 6 else 0, fontsize=8)
    ax.set_yticks(range(n), labels=class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_training_curves(history: list[dict[str, float]], path: str | os.PathLike) -> Path | None:
    """Loss and accuracy per epoch, train and validation."""
    if not history:
        return None
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [h["train_loss"] for h in history], label="train")
    a1.plot(ep, [h["val_loss"] for h in history], label="validation")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    a2.plot(ep, [h["train_acc"] for h in history], label="train")
    a2.plot(ep, [h["val_acc"] for h in history], label="validation")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_report(
    out_dir: str | os.PathLike,
    metrics: dict[str, Any],
    class_names: list[str],
    history: list[dict[str, float]] | None = None,
    title: str = "imgcls evaluation",
    top_losses: list[dict[str, Any]] | None = None,
) -> Path:
    """metrics.json, confusion_matrix.png/.txt, training_curves.png and report.html in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cm = np.asarray(metrics["confusion_matrix"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "confusion_matrix.txt").write_text(format_confusion_matrix(cm, class_names) + "\n")
    plot_confusion_matrix(cm, class_names, out / "confusion_matrix.png")
    curves = plot_training_curves(history or [], out / "training_curves.png")
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(n)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td><td>{m['f1']:.3f}</td><td>{m['support']}</td></tr>"
        for n, m in metrics["per_class"].items()
    )
    confused = "".join(f"<tr><td>{e(t)}</td><td>{e(p)}</td><td>{c}</td></tr>" for t, p, c in most_confused(cm, class_names))
    losses = ""
    if top_losses:
        losses = "<h2>Top losses</h2><table><tr><th>file</th><th>true</th><th>predicted</th><th>p(predicted)</th><th>p(true)</th></tr>" + "".join(
            f"<tr><td>{e(t['path'])}</td><td>{e(t['true'])}</td><td>{e(t['predicted'])}</td><td>{t['score']:.3f}</td><td>{t['true_score']:.3f}</td></tr>"
            for t in top_losses
        ) + "</table>"
    summary = "".join(
        f"<tr><th>{k}</th><td>{metrics[k]:.4f}</td></tr>" for k in ("accuracy", "top5_accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece") if k in metrics
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>{e(title)}</h1><p>{metrics['num_samples']} images, {len(class_names)} classes.</p>
<table>{summary}</table>
<h2>Confusion matrix</h2><img src="confusion_matrix.png" alt="confusion matrix">
{'<h2>Training curves</h2><img src="training_curves.png" alt="training curves">' if curves else ''}
<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{rows}</table>
<h2>Most confused pairs</h2><table><tr><th>true</th><th>predicted as</th><th>count</th></tr>{confused}</table>
{losses}
</body></html>"""
    (out / "report.html").write_text(page, encoding="utf-8")
    return out / "report.html"
