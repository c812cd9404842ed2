"""`write_report`: metrics, history and per-image predictions in, one self-contained report.html out.

Training (RUN/report/, on the validation split), `imgcls evaluate` (MODEL/evaluation/<data>/)
and `imgcls report MODEL DATA --out FILE` all call it. With files=True the figures are also
written beside the page as PNGs, with metrics.json and confusion_matrix.txt; the page itself
never refers to them (every image is a data: URI), so it can be moved or mailed alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.atomic import atomic_write_bytes, atomic_write_text
from imgcls.metrics import format_confusion_matrix, most_confused
from imgcls.report import gallery, plots
from imgcls.report import multilabel as ml
from imgcls.report.gallery import Predictions
from imgcls.report.multilabel import MultiLabelPredictions
from imgcls.report.page import SECTIONS, render_page

AUDIT_FILE = "audit.json"  # `imgcls audit DATA --out RUN` puts it beside the model, where the report looks for it
TOP_LOSSES = 20  # misclassified images listed; the first gallery.EXPLAIN_TOP as cards with Grad-CAM
RELIABILITY_BINS = 15  # as metrics.expected_calibration_error


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _model_facts(model_dir: Path | None) -> dict[str, Any]:
    """model.json of the model folder (arch, strategy, training), {} without one."""
    if model_dir is None:
        return {}
    return _read_json(model_dir / "model.json") or {}


def _figure(name: str, fig: Any, out: Path | None) -> dict[str, Any] | None:
    """A figure as {"uri", "file"}: PNG bytes rendered once, written beside the page when `out` is set."""
    if fig is None:
        return None
    data = plots.figure_bytes(fig)
    file = None
    if out is not None:
        atomic_write_bytes(out / f"{name}.png", data)
        file = f"{name}.png"
    return {"uri": gallery.png_uri(data), "file": file}


def _explainer(model_dir: Path | None, log: Callable[[str], None]) -> Callable[[list[str], list[str]], list[Any]] | None:
    """explain(paths, labels) -> Grad-CAM overlays, from the model folder (fp32 on the CPU); None without one."""
    if model_dir is None:
        return None
    from imgcls.inference.explain import Explainer

    try:
        explainer = Explainer.load(model_dir)
    except (OSError, ValueError) as err:  # a model folder that does not load: the report goes on without Grad-CAM
        log(f"report: no Grad-CAM ({err})")
        return None
    # drawn at thumbnail size: a large photo costs no full-size map
    return lambda paths, labels: [x.overlay for x in explainer.explain_many(paths, labels, max_side=gallery.THUMB_PX)]


def _audit(audit: str | os.PathLike | None, model_dir: Path | None, log: Callable[[str], None]) -> dict[str, Any] | None:
    path = Path(audit) if audit is not None else (model_dir / AUDIT_FILE if model_dir is not None else None)
    if path is None or not path.is_file():
        if audit is not None:
            log(f"report: no audit at {audit}")
        return None
    doc = _read_json(path)
    if not isinstance(doc, dict) or "findings" not in doc:
        log(f"report: {path} is not an audit.json from imgcls audit; left out")
        return None
    return {"path": str(path), "report": doc}


def write_report(
    out_dir: str | os.PathLike,
    metrics: dict[str, Any],
    class_names: list[str],
    history: list[dict[str, float]] | None = None,
    title: str = "imgcls evaluation",
    predictions: Predictions | MultiLabelPredictions | None = None,
    model_dir: str | os.PathLike | None = None,
    probe_sweep: Sequence[dict[str, float]] | None = None,
    audit: str | os.PathLike | None = None,
    top_losses: int = TOP_LOSSES,
    facts: dict[str, Any] | None = None,
    html_path: str | os.PathLike | None = None,
    files: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> Path:
    """Write report.html (and with files=True metrics.json, confusion_matrix.txt and the figures
    as PNGs) to `out_dir`; return the page's path.

    metrics: `metrics.classification_metrics` of the split. predictions: the split image by image
    (the top losses, confused pairs and the reliability diagram need them; without, those
    sections are left out). model_dir: the model folder, for Grad-CAM on the top losses, its
    model.json (strategy, kept epoch) and an audit.json beside it. probe_sweep: the linear
    probe's L2 sweep (`report.history.read_probe_sweep`). audit: an audit.json to summarise
    instead of MODEL/audit.json. html_path: the page's path instead of OUT/report.html.

    A multi-label model's report (metrics from `multilabel.multilabel_metrics`, predictions
    `MultiLabelPredictions`) has per-label PR curves and each label's most wrong images instead
    of the confusion matrix, top losses, confused pairs and reliability diagram (`report.multilabel`).
    """
    multi = isinstance(predictions, MultiLabelPredictions) or metrics.get("task") == "multi-label"
    out = Path(out_dir)
    if files:
        out.mkdir(parents=True, exist_ok=True)
    page = Path(html_path) if html_path is not None else out / "report.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    mdir = Path(model_dir) if model_dir is not None else None
    beside = out if files else None
    cm = np.asarray(metrics["confusion_matrix"]) if not multi else np.zeros((0, 0), np.int64)
    if files:
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        if not multi:
            atomic_write_text(out / "confusion_matrix.txt", format_confusion_matrix(cm, class_names) + "\n")
    meta = _model_facts(mdir)
    training = meta.get("training", {})
    content: dict[str, Any] = {
        "title": title,
        "metrics": metrics,
        "history": history or [],
        "probe_sweep": list(probe_sweep or []),
        "strategy": meta.get("strategy") or training.get("strategy"),
        "best_epoch": training.get("best_epoch"),
        "confused_counts": most_confused(cm, class_names) if not multi else [],
        "facts": {"images": metrics.get("num_samples"), "labels" if multi else "classes": len(class_names), **(facts or {})},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": _version(),
    }
    content["figures"] = {
        "confusion": _figure("confusion_matrix", plots.confusion_figure(cm, class_names), beside) if not multi else None,
        "training": _figure("training_curves", plots.training_figure(content["history"]), beside),
        "probe": _figure("probe_sweep", plots.probe_figure(content["probe_sweep"]), beside),
    }
    if isinstance(predictions, MultiLabelPredictions):
        ml.add_predictions(content, predictions, class_names, lambda name, fig: _figure(name, fig, beside))
    elif predictions is not None:
        _add_predictions(content, predictions, class_names, top_losses, mdir, beside, log)
    content["audit"] = _audit(audit, mdir, log)
    atomic_write_text(page, render_page(content, ml.SECTIONS if multi else SECTIONS))
    return page


def _add_predictions(
    content: dict[str, Any],
    pred: Predictions,
    class_names: list[str],
    top_losses: int,
    model_dir: Path | None,
    beside: Path | None,
    log: Callable[[str], None],
) -> None:
    """The sections that need image-by-image results: top losses, confused pairs, reliability."""
    from imgcls.calibration import reliability_diagram

    thumbs = gallery.Thumbnails()
    losses = gallery.top_losses(pred, class_names, top_losses)
    shown = losses[: gallery.EXPLAIN_TOP]
    explain = _explainer(model_dir, log) if shown else None
    content["loss_cards"] = gallery.loss_cards(shown, thumbs, explain, log)
    content["more_losses"] = losses[gallery.EXPLAIN_TOP :]
    pairs = gallery.confused_pairs(pred, class_names)
    for p in pairs:
        for side in ("mistakes", "examples"):
            p[side] = [{**x, "image": thumbs(x["path"])} for x in p[side]]
    content["pairs"] = pairs
    if len(pred.labels):
        bins = reliability_diagram(pred.probs, pred.labels, RELIABILITY_BINS)
        fig = plots.reliability_figure(bins, content["metrics"].get("ece"))
        content["figures"]["reliability"] = _figure("reliability_diagram", fig, beside)


def _version() -> str:
    from imgcls import __version__

    return __version__
