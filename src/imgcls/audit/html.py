"""The audit as one self-contained HTML page: a section per finding kind, thumbnails inline.

Every thumbnail is a JPEG embedded as a base64 data: URI, so the page is a single file that can
be mailed or opened from anywhere; only the first MAX_ENTRIES entries of each kind are drawn
(the JSON has them all).
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

MAX_ENTRIES = 60  # entries drawn per finding kind
MAX_THUMBS = 8  # thumbnails drawn per entry (a group of 500 blank images shows 8)
THUMB_PX = 112

TITLES = {
    "unreadable": ("Unreadable or unsupported files", "The decoder's reason; training skips these files."),
    "exact_duplicates": ("Exact duplicates", "Byte-identical files."),
    "near_duplicates": ("Near-duplicates", "Resized, re-encoded or slightly cropped copies (perceptual hash and feature similarity)."),
    "label_issues": (
        "Likely label errors",
        "Out-of-fold linear probe on pretrained features, confident learning; lowest self-confidence first.",
    ),
    "outliers": ("Outliers", "Far from every other image in feature space."),
    "tiny": ("Tiny images", "Short side far below the data set's typical size."),
    "extreme_aspect": ("Extreme aspect ratios", "The centre crop keeps a small part of these."),
    "dark": ("Dark images", "Mean grey level near black and far below their class's median."),
    "bright": ("Bright images", "Mean grey level near white and far above their class's median."),
    "near_constant": ("Near-constant images", "Blank or uniform: almost no variation, unlike the rest of their class."),
    "blurry": ("Very blurry images", "Variance of the Laplacian far below the data set's median."),
    "unusual_mode": ("Unusual colour modes", "From the file header: CMYK, 16-bit, alpha, palette, greyscale among colour."),
}
_NOT_FIGURES = {"paths", "labels", "splits", "exclude"}

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}
.note{color:#666}.entry{background:#fff;border:1px solid #ddd;border-radius:6px;margin:8px 0;padding:8px}
.figs{font-size:12px;color:#444;margin-bottom:6px}
.tag{display:inline-block;padding:1px 6px;border-radius:4px;background:#eee;margin-right:4px}
.tag.across_classes{background:#fcc}.tag.across_splits{background:#fdc}.tag.exclude{background:#ddd}
figure{display:inline-block;margin:4px;vertical-align:top;width:120px;font-size:11px;word-break:break-all}
figure img{display:block;max-width:112px;max-height:112px;border:1px solid #ccc}
.missing{width:112px;height:60px;background:#eee;color:#a00;display:flex;align-items:center;justify-content:center}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}
"""


def thumbnail_uri(path: str | os.PathLike, size: int = THUMB_PX) -> str | None:
    """A JPEG thumbnail of the image at `path` as a data: URI, or None if it does not decode."""
    from PIL import Image

    from imgcls.io import ImageDecodeError, load_image

    try:
        img = load_image(path, draft_size=size)
    except ImageDecodeError:
        return None
    scale = size / max(img.size)
    if scale < 1:
        img.thumbnail((size, size))
    elif scale >= 2:  # small images (CIFAR's 32 px) drawn at a visible size, pixels kept sharp
        k = int(scale)
        img = img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(root: Path, rel: str, label: str, split: str, excluded: bool) -> str:
    uri = thumbnail_uri(root / rel)
    img = f'<img src="{uri}" alt="{html.escape(rel)}">' if uri else '<div class="missing">no image</div>'
    caption = html.escape(rel) + (f"<br>{html.escape(label)}" if label else "")
    if split and split != "all":
        caption += f" &middot; {html.escape(split)}"
    if excluded:
        caption += ' <span class="tag exclude">exclude</span>'
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def _entry_html(root: Path, entry: dict[str, Any]) -> str:
    figs = []
    for k, v in entry.items():
        if k in _NOT_FIGURES or v is None or v is False:
            continue
        if v is True or (k == "relation" and v == "within_class"):  # the across_* flags say the rest of "relation"
            tag = k if v is True else v
            figs.append(f'<span class="tag {html.escape(tag)}">{html.escape(tag.replace("_", " "))}</span>')
        elif k == "relation":
            continue
        else:
            figs.append(f"{html.escape(k.replace('_', ' '))}: <b>{html.escape(str(v))}</b>")
    excluded = set(entry.get("exclude", []))
    shown = list(zip(entry["paths"], entry["labels"], entry["splits"]))[:MAX_THUMBS]
    thumbs = "".join(_figure(root, p, y, s, p in excluded) for p, y, s in shown)
    more = len(entry["paths"]) - len(shown)
    extra = f'<span class="note">and {more} more</span>' if more > 0 else ""
    return f'<div class="entry"><div class="figs">{" &nbsp; ".join(figs)}</div>{thumbs}{extra}</div>'


def _classes_table(report: dict[str, Any]) -> str:
    splits = list(report["splits"])
    head = "".join(f"<th>{html.escape(s)}</th>" for s in splits) + "<th>total</th>"
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{c.get(s, 0)}</td>" for s in splits) + f"<td>{c['total']}</td></tr>"
        for name, c in report["class_counts"].items()
    )
    return f"<table><tr><th>class</th>{head}</tr>{rows}</table>"


def _near_duplicate_note(check: dict[str, Any] | None, note: str) -> str:
    """The section's note, saying so where the copy check left the features out (audit/calibrate.py)."""
    if not check or check.get("feature_rules") == "used":
        return note
    return (
        f"Resized or re-encoded copies, by perceptual hash only: resized copies of {check['sampled']} of these images stood out "
        f"from every other image in feature space for {check['found_share']:.0%} of them, so the features do not tell copies "
        "from look-alikes here."
    )


def render_html(report: dict[str, Any]) -> str:
    """The page for an audit report (`run_audit`'s document); reads the images for the thumbnails."""
    root = Path(report["root"])
    ratio = report["imbalance_ratio"]
    parts = [
        f"<h1>imgcls audit: {html.escape(report['data'])}</h1>",
        f'<p class="note">{report["num_images"]} images, {len(report["class_names"])} classes, layout {html.escape(report["layout"])}; '
        f"features: {html.escape(str(report['settings']['features']))}"
        + (f"; probe accuracy {report['probe_accuracy']:.3f}" if report.get("probe_accuracy") is not None else "")
        + "</p>",
        "<h2>Classes</h2>",
        _classes_table(report),
        f"<p>imbalance ratio (largest / smallest class): <b>{ratio if ratio is not None else 'a class has no images'}</b></p>",
    ]
    for kind, entries in report["findings"].items():
        title, note = TITLES.get(kind, (kind, ""))
        if kind == "near_duplicates":
            note = _near_duplicate_note(report.get("settings", {}).get("copy_check"), note)
        parts.append(f'<h2 id="{kind}">{html.escape(title)} ({len(entries)})</h2><p class="note">{html.escape(note)}</p>')
        parts += [_entry_html(root, e) for e in entries[:MAX_ENTRIES]]
        if len(entries) > MAX_ENTRIES:
            parts.append(f'<p class="note">{len(entries) - MAX_ENTRIES} more in audit.json</p>')
    body = "\n".join(parts)
    head = f'<meta charset="utf-8"><title>imgcls audit</title><style>{_CSS}</style>'
    return f"<!doctype html><html><head>{head}</head><body>{body}</body></html>\n"
