"""The report as one self-contained HTML page: every figure and thumbnail is a data: URI, the CSS
is inline, there is no script, so the file opens offline, mails as one attachment and prints.

`render_page(content)` takes the sections' data (built by `report.write.write_report`) and
returns the page; each `_section_*` function renders one section and returns "" when it has
nothing to show. Print CSS keeps every figure, card and table row whole across page breaks.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from pathlib import PurePath
from typing import Any

e = html.escape

METRICS = (  # key in the metrics dict, label, what it means
    ("accuracy", "accuracy", "share of images whose top class is right"),
    ("top5_accuracy", "top-5 accuracy", "share whose true class is among the 5 highest"),
    ("balanced_accuracy", "balanced accuracy", "mean recall over the classes present"),
    ("macro_f1", "macro F1", "mean F1 over the classes present"),
    ("log_loss", "log loss", "mean -log p(true class); lower is better"),
    ("ece", "ECE", "expected calibration error: mean gap between confidence and accuracy; lower is better"),
)

CSS = """
:root{--fg:#1d2330;--muted:#667085;--line:#d9dee8;--bg:#f6f7fb;--card:#fff;--accent:#2f6fed;--soft:#dbe6fd;--bad:#b42318;--good:#067647}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header,main{max-width:1120px;margin:0 auto;padding:0 24px}
header{padding-top:22px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:19px;margin:0 0 10px}
h3{font-size:15px;margin:14px 0 6px}
nav{position:sticky;top:0;z-index:1;background:var(--bg);border-bottom:1px solid var(--line);padding:8px 0;margin:12px 0 0;font-size:14px}
nav a{margin-right:14px;color:var(--accent);text-decoration:none;white-space:nowrap}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 20px;margin:18px 0}
.muted{color:var(--muted)}.small{font-size:13px}
.facts{display:flex;flex-wrap:wrap;gap:6px 18px;margin:6px 0 0;font-size:14px;color:var(--muted)}
.facts b{color:var(--fg);font-weight:600}
.kpis{display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:10px;margin:0}
.kpi{border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.kpi .v{font-size:24px;font-weight:600;font-variant-numeric:tabular-nums}
.kpi .k{font-size:14px;font-weight:600}
.kpi .why{font-size:12px;color:var(--muted);line-height:1.3;margin-top:2px}
table{border-collapse:collapse;margin:6px 0;font-size:14px}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:right;font-variant-numeric:tabular-nums}
th{font-weight:600;background:#fafbfd}
th:first-child,td:first-child,th.l,td.l{text-align:left}
td.name{max-width:280px;overflow-wrap:anywhere}
.f1{display:inline-block;width:90px;height:9px;background:var(--soft);border-radius:5px;vertical-align:middle;margin-right:6px;overflow:hidden}
.f1 i{display:block;height:100%;background:var(--accent)}
.f1.low i{background:var(--bad)}
figure{margin:8px 0}
figure.plot img{max-width:100%;height:auto;display:block}
figcaption{font-size:13px;color:var(--muted);margin-top:4px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(290px,1fr));gap:12px}
.card{border:1px solid var(--line);border-radius:8px;padding:8px;font-size:13px}
.card .pics{display:flex;gap:6px}
.card .pics figure{margin:0;flex:1;text-align:center}
.card .pics img{width:100%;max-width:140px;height:132px;object-fit:contain;background:#eef0f5;border-radius:4px}
.card .pics figcaption{margin:0}
.card .file{overflow-wrap:anywhere;color:var(--muted)}
.truth{color:var(--good);font-weight:600}.wrong{color:var(--bad);font-weight:600}
.pair{border-top:1px solid var(--line);padding:10px 0}
.pair:first-of-type{border-top:0}
.sides{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.strip{display:flex;flex-wrap:wrap;gap:6px}
.strip figure{margin:0;width:100px;font-size:12px;text-align:center;color:var(--muted)}
.strip img{width:100px;height:100px;object-fit:contain;background:#eef0f5;border-radius:4px;display:block}
.missing{display:flex;align-items:center;justify-content:center;width:100%;height:100px;background:#eef0f5;color:var(--muted);font-size:12px;border-radius:4px}
.two{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:18px;align-items:start}
@media (max-width:760px){.two,.sides{grid-template-columns:1fr}}
.tag{display:inline-block;padding:0 6px;border-radius:4px;background:#eef0f5;font-size:12px}
footer{max-width:1120px;margin:0 auto;padding:0 24px 28px;font-size:13px;color:var(--muted)}
@page{size:A4;margin:12mm}
@media print{
 body{background:#fff;font-size:11pt}
 header,main,footer{max-width:none;padding:0}
 nav{display:none}
 section{border:0;border-radius:0;padding:0;margin:0 0 10mm}
 figure,.card,.pair,.kpi,tr,.strip figure{break-inside:avoid}
 h2,h3{break-after:avoid}
 #losses,#pairs{break-before:page}
 .cards{grid-template-columns:repeat(3,1fr)}
 .two,.sides{grid-template-columns:1fr 1fr}
 .strip figure{width:76px}.strip img{width:76px;height:76px}
 a{color:inherit;text-decoration:none}
}
"""


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _img(uri: str | None, alt: str, cls: str = "") -> str:
    if uri is None:
        return '<div class="missing">image not readable</div>'
    return f'<img src="{uri}" alt="{e(alt)}"{f" class={cls!r}" if cls else ""}>'


def _plot(fig: dict[str, Any] | None, alt: str, caption: str = "") -> str:
    """A figure from write_report: {"uri", "file"} ("file": the PNG written beside the page, or None)."""
    if fig is None:
        return ""
    data_file = f' data-file="{e(fig["file"])}"' if fig.get("file") else ""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure class="plot"{data_file}><img src="{fig["uri"]}" alt="{e(alt)}">{cap}</figure>'


def _name(path: str) -> str:
    return PurePath(path).name or path


# ----------------------------------------------------------------------------- sections


def _section_summary(c: dict[str, Any]) -> str:
    m = c["metrics"]
    kpis = "".join(
        f'<div class="kpi"><div class="v">{_fmt(m.get(key))}</div><div class="k">{e(label)}</div><div class="why">{e(why)}</div></div>'
        for key, label, why in METRICS
        if key in m
    )
    return f'<section id="summary"><h2>Summary</h2><div class="kpis">{kpis}</div></section>'


def _section_per_class(c: dict[str, Any]) -> str:
    per_class = c["metrics"]["per_class"]
    rows = []
    for name, v in per_class.items():
        low = " low" if v["support"] and v["f1"] < 0.5 else ""
        bar = f'<span class="f1{low}"><i style="width:{100 * v["f1"]:.0f}%"></i></span>'
        rows.append(
            f'<tr><td class="name">{e(name)}</td><td>{v["precision"]:.3f}</td><td>{v["recall"]:.3f}</td>'
            f"<td>{bar}{v['f1']:.3f}</td><td>{v['support']}</td></tr>"
        )
    return (
        '<section id="per-class"><h2>Per class</h2><p class="muted small">precision: of the images predicted as the class, '
        "the share that are; recall: of the images of the class, the share found; F1 below 0.5 in red.</p>"
        "<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>" + "".join(rows) + "</table></section>"
    )


def _section_confusion(c: dict[str, Any]) -> str:
    pairs = c.get("confused_counts") or []
    table = ""
    if pairs:
        table = (
            "<h3>Most confused</h3><table><tr><th>true</th><th class='l'>predicted as</th><th>images</th></tr>"
            + "".join(f"<tr><td>{e(t)}</td><td class='l'>{e(p)}</td><td>{n}</td></tr>" for t, p, n in pairs)
            + "</table>"
        )
    else:
        table = '<p class="muted">No image was misclassified.</p>'
    fig = _plot(c["figures"].get("confusion"), "confusion matrix", "rows: true class; colour: share of the row; numbers: images")
    return f'<section id="confusion"><h2>Confusion matrix</h2><div class="two"><div>{fig}</div><div>{table}</div></div></section>'


def _history_table(rows: Sequence[dict[str, float]], keys: Sequence[tuple[str, str]]) -> str:
    present = [(k, label) for k, label in keys if any(k in r and _fmt(r[k]) != "n/a" for r in rows)]
    head = "".join(f"<th>{e(label)}</th>" for _, label in present)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k), 4 if k != 'epoch' else 0)}</td>" for k, _ in present) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


HISTORY_COLUMNS = (
    ("epoch", "epoch"),
    ("train_loss", "train loss"),
    ("train_acc", "train acc"),
    ("val_loss", "val loss"),
    ("val_acc", "val acc"),
    ("epoch_time_s", "seconds"),
)
PROBE_COLUMNS = (
    ("l2", "L2 strength"),
    ("train_loss", "train loss"),
    ("train_acc", "train acc"),
    ("val_loss", "val loss"),
    ("val_acc", "val acc"),
)


def _probe_block(c: dict[str, Any], heading: str) -> str:
    sweep = c.get("probe_sweep") or []
    if not sweep:
        return ""
    rows = [{**r, "l2": f"{r['l2']:g}" + (" (kept)" if r.get("chosen") else "")} for r in sweep]
    fig = _plot(
        c["figures"].get("probe"),
        "linear probe L2 sweep",
        "the head was fitted once per L2 strength and the one with the best validation accuracy (then the lowest loss) kept",
    )
    note = (
        '<p class="muted small">Measured on the frozen features, one view per image: the summary above may differ where the '
        "model is evaluated with test-time augmentation.</p>"
    )
    return f"<h3>{e(heading)}</h3>{fig}{_history_table(rows, PROBE_COLUMNS)}{note}"


def _section_training(c: dict[str, Any]) -> str:
    history, strategy = c.get("history") or [], c.get("strategy")
    probe_only = strategy == "linear-probe" or (not strategy and len(history) <= 1 and bool(c.get("probe_sweep")))
    probe = _probe_block(c, "Linear probe: the L2 sweep" if probe_only else "The linear probe before fine-tuning")
    if not history and not probe:
        return (
            '<section id="training"><h2>Training</h2><p class="muted">No training history beside the model '
            "(metrics.csv), so there are no curves to show.</p></section>"
        )
    parts = []
    fig = c["figures"].get("training")
    if fig is not None:
        best = c.get("best_epoch")
        parts.append(_plot(fig, "training curves", f"per epoch; the kept weights are from epoch {best}" if best else "per epoch"))
    elif history and not probe_only:
        parts.append(f'<p class="muted small">One epoch only: its numbers instead of curves.</p>{_history_table(history, HISTORY_COLUMNS)}')
    if probe:
        parts.append(probe)
    if probe_only and history and not c.get("probe_sweep"):
        table = _history_table(history, HISTORY_COLUMNS)
        parts.append(f'<p class="muted small">The linear probe\'s result (no sweep recorded):</p>{table}')
    label = f' <span class="tag">{e(strategy)}</span>' if strategy else ""
    return f'<section id="training"><h2>Training{label}</h2>{"".join(parts)}</section>'


def _card(t: dict[str, Any]) -> str:
    overlay = ""
    if t.get("overlay"):
        pic = _img(t["overlay"], "Grad-CAM for " + t["predicted"])
        overlay = f"<figure>{pic}<figcaption>Grad-CAM: {e(t['predicted'])}</figcaption></figure>"
    return (
        f'<div class="card"><div class="pics"><figure>{_img(t["image"], _name(t["path"]))}<figcaption>image</figcaption></figure>'
        f"{overlay}</div>"
        f'<div>true <span class="truth">{e(t["true"])}</span> <span class="muted">p {t["true_score"]:.3f}</span></div>'
        f'<div>predicted <span class="wrong">{e(t["predicted"])}</span> <span class="muted">p {t["score"]:.3f}</span></div>'
        f'<div class="file" title="{e(t["path"])}">{e(_name(t["path"]))}</div></div>'
    )


def _section_losses(c: dict[str, Any]) -> str:
    cards, rest = c.get("loss_cards"), c.get("more_losses") or []
    if cards is None:
        return ""
    if not cards:
        return '<section id="losses"><h2>Top losses</h2><p class="muted">No image was misclassified.</p></section>'
    note = (
        "The misclassified images with the lowest probability for their true class, worst first. Grad-CAM shows where the "
        "model found its evidence for the class it predicted (red: strongest)."
    )
    more = ""
    if rest:
        more = (
            "<h3>More losses</h3><table><tr><th>file</th><th class='l'>true</th><th class='l'>predicted</th>"
            "<th>p(predicted)</th><th>p(true)</th></tr>"
            + "".join(
                f'<tr><td class="name" title="{e(t["path"])}">{e(_name(t["path"]))}</td><td class="l">{e(t["true"])}</td>'
                f'<td class="l">{e(t["predicted"])}</td><td>{t["score"]:.3f}</td><td>{t["true_score"]:.3f}</td></tr>'
                for t in rest
            )
            + "</table>"
        )
    return (
        f'<section id="losses"><h2>Top losses</h2><p class="muted small">{note}</p>'
        f'<div class="cards">{"".join(_card(t) for t in cards)}</div>{more}</section>'
    )


def _strip(items: Sequence[dict[str, Any]], what: str) -> str:
    if not items:
        return f'<p class="muted small">none {e(what)}</p>'
    return (
        '<div class="strip">'
        + "".join(f'<figure title="{e(x["path"])}">{_img(x["image"], _name(x["path"]))}{x["score"]:.2f}</figure>' for x in items)
        + "</div>"
    )


def _section_pairs(c: dict[str, Any]) -> str:
    pairs = c.get("pairs")
    if not pairs:
        return ""
    blocks = []
    for p in pairs:
        t, q = e(p["true"]), e(p["predicted"])
        blocks.append(
            f'<div class="pair"><h3><span class="truth">{t}</span> taken for <span class="wrong">{q}</span>: {p["count"]} image'
            f'{"s" if p["count"] != 1 else ""}</h3><div class="sides">'
            f'<div><div class="muted small">{t} predicted as {q} (p({q}) under each)</div>{_strip(p["mistakes"], "")}</div>'
            f'<div><div class="muted small">{q} recognised as {q} (p({q}) under each)</div>'
            f"{_strip(p['examples'], 'recognised in this split')}</div>"
            "</div></div>"
        )
    return (
        '<section id="pairs"><h2>Confused pairs</h2><p class="muted small">For the most frequent mistakes: the images of one class '
        "the model took for the other, beside images of that other class it recognised.</p>" + "".join(blocks) + "</section>"
    )


def _section_calibration(c: dict[str, Any]) -> str:
    fig = c["figures"].get("reliability")
    if fig is None:
        return ""
    note = (
        "Images binned by the model's confidence (its top probability). A calibrated model's bars reach the diagonal: "
        "bars below it mean over-confidence, above it under-confidence."
    )
    return (
        f'<section id="calibration"><h2>Calibration</h2><div class="two"><div>{_plot(fig, "reliability diagram")}</div>'
        f'<p class="muted small">{note}</p></div></section>'
    )


def _section_audit(c: dict[str, Any]) -> str:
    audit = c.get("audit")
    if not audit:
        return ""
    doc, path = audit["report"], audit["path"]
    ratio = doc.get("imbalance_ratio")
    facts = [
        f"{doc.get('num_images', '?')} images",
        f"{len(doc.get('class_names', []))} classes",
        f"imbalance ratio {ratio if ratio is not None else 'n/a (a class has no images)'}",
    ]
    if doc.get("probe_accuracy") is not None:
        facts.append(f"out-of-fold probe accuracy {doc['probe_accuracy']:.3f}")
    findings = doc.get("findings", {})
    rows, clean = [], []
    for kind, entries in findings.items():  # audit.json lists every kind, in audit.core.FINDING_KINDS order
        if not entries:
            clean.append(kind.replace("_", " "))
            continue
        files = sum(len(x.get("paths", [])) for x in entries)
        example = e(str(entries[0]["paths"][0])) if entries[0].get("paths") else ""
        name = e(kind.replace("_", " "))
        rows.append(f'<tr><td>{name}</td><td>{len(entries)}</td><td>{files}</td><td class="name l">{example}</td></tr>')
    table = (
        "<table><tr><th>finding</th><th>entries</th><th>files</th><th class='l'>first example</th></tr>" + "".join(rows) + "</table>"
        if rows
        else ""
    )
    none = f'<p class="small">Nothing found: {e(", ".join(clean))}.</p>' if clean else ""
    return (
        f'<section id="audit"><h2>Data audit</h2><p class="facts">{" · ".join(e(f) for f in facts)}</p>{table}{none}'
        f'<p class="muted small">From {e(str(path))} (imgcls audit); its audit.html shows every finding.</p></section>'
    )


SECTIONS = (
    ("summary", "Summary", _section_summary),
    ("per-class", "Per class", _section_per_class),
    ("confusion", "Confusion", _section_confusion),
    ("training", "Training", _section_training),
    ("losses", "Top losses", _section_losses),
    ("pairs", "Confused pairs", _section_pairs),
    ("calibration", "Calibration", _section_calibration),
    ("audit", "Data audit", _section_audit),
)


def render_page(c: dict[str, Any], sections: Sequence[tuple[str, str, Callable[[dict[str, Any]], str]]] = SECTIONS) -> str:
    """The whole page from write_report's content dict: title, facts, metrics, figures, ...;
    `sections` (id, menu label, renderer) in page order (a multi-label model's: `report.multilabel.SECTIONS`)."""
    rendered = [(sid, label, fn(c)) for sid, label, fn in sections]
    nav = "".join(f'<a href="#{sid}">{e(label)}</a>' for sid, label, body in rendered if body)
    facts = "".join(f"<span>{e(k)} <b>{e(str(v))}</b></span>" for k, v in c["facts"].items() if v not in (None, ""))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(c['title'])}</title><style>{CSS}</style></head><body>"
        f'<header><h1>{e(c["title"])}</h1><div class="facts">{facts}</div><nav>{nav}</nav></header>'
        f"<main>{''.join(body for _, _, body in rendered)}</main>"
        f"<footer>Written by imgcls {e(c.get('version', ''))} on {e(c.get('date', ''))}. "
        "Self-contained: every image is embedded.</footer>"
        "</body></html>\n"
    )
