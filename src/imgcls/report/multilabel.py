"""The report of a multi-label model: per-label PR curves and, per label, the images it gets most wrong.

`write_report` hands over here when it is given `MultiLabelPredictions` (or multi-label metrics,
`multilabel.multilabel_metrics`): the page has the multi-label summary (mAP, F1, Hamming loss,
subset accuracy, labels per image), the per-label table with each threshold, one precision-recall
curve per label with its threshold's operating point marked, and per label its false positives
with the highest scores and its false negatives with the lowest; training and audit sections are
the single-label report's. The array functions (`pr_curve`, `pr_figure`, `most_wrong`) take
probabilities (N, C), multi-hot targets (N, C) and thresholds (C,) directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgcls.report import gallery, plots
from imgcls.report.page import _fmt, _img, _name, _plot, _section_audit, _section_training, e

MOST_WRONG = 6  # images per side (false positives, false negatives) shown for each label
PR_MAX_LABELS = 40  # PR panels drawn; beyond, the labels with the most positive images
PR_COLUMNS = 4

SUMMARY = (  # key in the metrics dict, label, what it means
    ("macro_map", "macro mAP", "mean over labels of the area under the precision-recall curve"),
    ("micro_map", "micro mAP", "AP of all (image, label) scores pooled"),
    ("macro_f1", "macro F1", "mean F1 over the labels present, at their thresholds"),
    ("micro_f1", "micro F1", "F1 of all (image, label) decisions pooled"),
    ("hamming_loss", "Hamming loss", "share of wrong (image, label) decisions; lower is better"),
    ("subset_accuracy", "subset accuracy", "share of images whose whole label set is right"),
    ("label_cardinality", "labels per image", "predicted, on average (true: see below)"),
)


@dataclass(frozen=True)
class MultiLabelPredictions:
    """One evaluated split of a multi-label model, image by image.

    probs: (N, C) calibrated per-label probabilities; targets: (N, C) 0/1; paths: the N image
    files; thresholds: (C,) the model's decision thresholds (a label is predicted at p >= its threshold).
    """

    probs: np.ndarray
    targets: np.ndarray
    paths: Sequence[str]
    thresholds: np.ndarray

    def __post_init__(self) -> None:
        n, c = np.shape(self.probs) if np.ndim(self.probs) == 2 else (len(self.probs), -1)
        if np.shape(self.targets) != (n, c) or len(self.paths) != n or np.shape(self.thresholds) != (c,):
            raise ValueError(
                f"probs {np.shape(self.probs)}, targets {np.shape(self.targets)}, {len(self.paths)} paths and "
                f"thresholds {np.shape(self.thresholds)} do not fit together: (N, C), (N, C), N, (C,)"
            )


def pr_curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) of one label at every threshold, from the highest score down, starting
    at recall 0, precision 1; tied scores form one step. Empty arrays without a positive image."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(targets).astype(bool)
    if not y.any():
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each run of equal scores
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, tp / y.sum()], np.r_[1.0, tp / (tp + fp)]


def operating_point(scores: np.ndarray, targets: np.ndarray, threshold: float) -> tuple[float, float] | None:
    """(recall, precision) at `threshold`; None without a positive image or a prediction."""
    pred, y = np.asarray(scores) >= threshold, np.asarray(targets).astype(bool)
    if not y.any() or not pred.any():
        return None
    tp = float((pred & y).sum())
    return tp / y.sum(), tp / pred.sum()


def pr_figure(
    probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray, class_names: Sequence[str], ap: Sequence[float | None] | None = None
) -> Any | None:
    """One precision-recall panel per label (at most PR_MAX_LABELS, those with the most positive
    images), the threshold's operating point marked; AP in each title (`ap`, or the curve's own
    step area). None when no label has a positive image."""
    t = np.asarray(targets).astype(bool)
    have = [c for c in np.argsort(-t.sum(0), kind="stable") if t[:, c].any()][:PR_MAX_LABELS]
    if not have:
        return None
    have = sorted(have)
    cols = min(PR_COLUMNS, len(have))
    rows = math.ceil(len(have) / cols)
    fig = plots._figure(2.7 * cols, 2.5 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, c in zip(axes, have):
        recall, precision = pr_curve(probs[:, c], t[:, c])
        area = float(np.sum(np.diff(recall) * precision[1:]))  # step area: scikit-learn's average precision
        shown = ap[c] if ap is not None and ap[c] is not None else area
        ax.step(recall, precision, where="post", color=plots.TRAIN_COLOUR, lw=1.5)
        point = operating_point(probs[:, c], t[:, c], float(thresholds[c]))
        if point is not None:
            ax.plot(*point, marker="o", ms=6, color=plots.VAL_COLOUR, label=f"threshold {thresholds[c]:.2f}")
            ax.legend(frameon=False, fontsize=7, loc="lower left")
        name = class_names[c] if len(class_names[c]) <= 22 else class_names[c][:21] + "…"
        ax.set_title(f"{name}  (AP {shown:.3f}, {int(t[:, c].sum())} pos.)", fontsize=9)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(have) :]:
        ax.set_visible(False)
    return fig


def most_wrong(
    probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray, class_names: Sequence[str], paths: Sequence[str], k: int = MOST_WRONG
) -> list[dict[str, Any]]:
    """Per label: "label", "threshold", "false_positives" (images without the label scored at or
    above its threshold, highest score first) and "false_negatives" (images with the label scored
    below it, lowest first), k of each as {"path", "score"}, with their totals "num_fp", "num_fn"."""
    p, t = np.asarray(probs), np.asarray(targets).astype(bool)
    out = []
    for c, name in enumerate(class_names):
        s, th = p[:, c], float(thresholds[c])
        fp = np.flatnonzero(~t[:, c] & (s >= th))
        fn = np.flatnonzero(t[:, c] & (s < th))
        fp_shown = fp[np.argsort(-s[fp], kind="stable")][:k]
        fn_shown = fn[np.argsort(s[fn], kind="stable")][:k]
        out.append(
            {
                "label": name,
                "threshold": th,
                "num_fp": len(fp),
                "num_fn": len(fn),
                "false_positives": [{"path": str(paths[i]), "score": float(s[i])} for i in fp_shown],
                "false_negatives": [{"path": str(paths[i]), "score": float(s[i])} for i in fn_shown],
            }
        )
    return out


def add_predictions(
    content: dict[str, Any], pred: MultiLabelPredictions, class_names: Sequence[str], figure: Callable[[str, Any], dict[str, Any] | None]
) -> None:
    """Add the PR figure and the most-wrong images (thumbnails) to write_report's content;
    figure(name, fig) renders a figure (and writes it beside the page when the report has files)."""
    per_label = content["metrics"].get("per_label") or []
    ap = [r.get("ap") for r in per_label] if len(per_label) == len(class_names) else None
    content["figures"]["pr"] = figure("pr_curves", pr_figure(pred.probs, pred.targets, pred.thresholds, class_names, ap))
    thumbs = gallery.Thumbnails()
    wrong = most_wrong(pred.probs, pred.targets, pred.thresholds, class_names, pred.paths)
    for w in wrong:
        for side in ("false_positives", "false_negatives"):
            w[side] = [{**x, "image": thumbs(x["path"])} for x in w[side]]
    content["most_wrong"] = wrong


# ----------------------------------------------------------------------------- the page's sections


def _section_summary(c: dict[str, Any]) -> str:
    m = c["metrics"]
    kpis = "".join(
        f'<div class="kpi"><div class="v">{_fmt(m.get(key))}</div><div class="k">{e(label)}</div><div class="why">{e(why)}</div></div>'
        for key, label, why in SUMMARY
        if key in m
    )
    true = ""
    if "label_cardinality_true" in m:
        true = f"<p class='muted small'>True labels per image: {_fmt(m['label_cardinality_true'])}.</p>"
    return f'<section id="summary"><h2>Summary <span class="tag">multi-label</span></h2><div class="kpis">{kpis}</div>{true}</section>'


def _section_per_label(c: dict[str, Any]) -> str:
    rows = []
    for r in c["metrics"].get("per_label") or []:
        f1 = r.get("f1")
        ok = f1 is not None and math.isfinite(f1)
        low = " low" if ok and r.get("support") and f1 < 0.5 else ""
        bar = f'<span class="f1{low}"><i style="width:{100 * f1:.0f}%"></i></span>' if ok else ""
        rows.append(
            f'<tr><td class="name">{e(str(r.get("label")))}</td><td>{_fmt(r.get("precision"), 3)}</td><td>{_fmt(r.get("recall"), 3)}</td>'
            f"<td>{bar}{_fmt(f1, 3)}</td><td>{_fmt(r.get('ap'), 3)}</td><td>{r.get('support', '')}</td>"
            f"<td>{_fmt(r.get('threshold'), 3)}</td></tr>"
        )
    if not rows:
        return ""
    return (
        '<section id="per-label"><h2>Per label</h2><p class="muted small">Each label is decided on its own: predicted when its '
        "probability reaches its threshold. Precision, recall and F1 at that threshold; AP over every threshold; F1 below 0.5 in red.</p>"
        "<table><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>AP</th><th>support</th><th>threshold</th></tr>"
        + "".join(rows)
        + "</table></section>"
    )


def _section_pr(c: dict[str, Any]) -> str:
    fig = c["figures"].get("pr")
    if fig is None:
        return ""
    cap = "precision against recall as each label's threshold moves from 1 down to 0; the dot: the model's threshold"
    return f'<section id="pr"><h2>Precision-recall per label</h2>{_plot(fig, "precision-recall curves", cap)}</section>'


def _strip(items: Sequence[dict[str, Any]], none: str) -> str:
    if not items:
        return f'<p class="muted small">{e(none)}</p>'
    figs = "".join(f'<figure title="{e(x["path"])}">{_img(x["image"], _name(x["path"]))}p {x["score"]:.2f}</figure>' for x in items)
    return f'<div class="strip">{figs}</div>'


def _section_most_wrong(c: dict[str, Any]) -> str:
    wrong = c.get("most_wrong")
    if wrong is None:
        return ""
    blocks = []
    for w in wrong:
        name = e(w["label"])
        blocks.append(
            f'<div class="pair"><h3>{name} <span class="muted small">threshold {w["threshold"]:.3f}: {w["num_fp"]} false '
            f"positive{'s' if w['num_fp'] != 1 else ''}, {w['num_fn']} false negative{'s' if w['num_fn'] != 1 else ''}</span></h3>"
            f'<div class="sides"><div><div class="muted small">without {name}, scored highest (false positives)</div>'
            f"{_strip(w['false_positives'], 'no false positive')}</div>"
            f'<div><div class="muted small">with {name}, scored lowest (false negatives)</div>'
            f"{_strip(w['false_negatives'], 'no false negative')}</div></div></div>"
        )
    return (
        '<section id="losses"><h2>Most wrong, per label</h2><p class="muted small">For each label, the images it gets most '
        "wrong: those without it that score highest, and those with it that score lowest.</p>" + "".join(blocks) + "</section>"
    )


SECTIONS = (
    ("summary", "Summary", _section_summary),
    ("per-label", "Per label", _section_per_label),
    ("pr", "PR curves", _section_pr),
    ("training", "Training", _section_training),
    ("losses", "Most wrong", _section_most_wrong),
    ("audit", "Data audit", _section_audit),
)
