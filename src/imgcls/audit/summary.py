"""The audit's outputs: the terminal summary, audit.json and audit.html."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from imgcls.atomic import atomic_write_text

JSON_FILE = "audit.json"
HTML_FILE = "audit.html"
EXAMPLES = 3  # entries shown per kind in the terminal


def _example(kind: str, e: dict[str, Any]) -> str:
    p = e["paths"][0]
    if kind == "unreadable":
        return f"{p}: {e['reason']}"
    if kind in ("exact_duplicates", "near_duplicates"):
        more = f" (+{len(e['paths']) - 2} more)" if len(e["paths"]) > 2 else ""
        tags = f"{', '.join(sorted(set(e['labels'])))}; {', '.join(sorted(set(e['splits'])))}"
        return f"{e['relation'].replace('_', ' ')}: {p} = {e['paths'][1]}{more} [{tags}]"
    if kind == "label_issues":
        return f"{p}: labelled {e['given']} ({e['self_confidence']:.2f}), looks like {e['suggested']} ({e['suggested_probability']:.2f})"
    if kind == "outliers":
        return f"{p}: neighbour similarity {e['neighbour_similarity']:.2f} (z {e['z']:.1f}), nearest class {e['nearest_class']}"
    figures = ", ".join(f"{k} {v}" for k, v in e.items() if k not in ("paths", "labels", "splits", "exclude"))
    return f"{p}: {figures}"


def _count(kind: str, entries: list[dict[str, Any]]) -> str:
    if kind in ("exact_duplicates", "near_duplicates"):
        n_files = sum(len(e["paths"]) for e in entries)
        rel = {r: sum(e["relation"] == r for e in entries) for r in ("across_classes", "across_splits", "within_class")}
        detail = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in rel.items() if n)
        return f"{len(entries)} groups, {n_files} files" + (f" ({detail})" if detail else "")
    return f"{len(entries)}"


def format_summary(report: dict[str, Any]) -> str:
    """A few readable lines per finding kind, with examples; empty kinds on one line at the end."""
    counts = ", ".join(f"{name} {c['total']}" for name, c in report["class_counts"].items())
    ratio = report["imbalance_ratio"]
    lines = [
        f"audit of {report['data']} ({report['layout']}): {report['num_images']} images, {len(report['class_names'])} classes, "
        + ", ".join(f"{k} {v}" for k, v in report["splits"].items()),
        f"class counts: {counts}",
        f"imbalance ratio (largest / smallest class): {ratio if ratio is not None else 'a class has no images'}",
        f"features: {report['settings']['features']}"
        + (f", out-of-fold probe accuracy {report['probe_accuracy']:.3f}" if report.get("probe_accuracy") is not None else ""),
    ]
    if report.get("ignored"):
        lines.append("skipped while listing: " + ", ".join(f"{n} {why}" for why, n in sorted(report["ignored"].items())))
    clean = []
    for kind, entries in report["findings"].items():
        if not entries:
            clean.append(kind)
            continue
        lines.append(f"{kind.replace('_', ' ')}: {_count(kind, entries)}")
        lines += [f"    {_example(kind, e)}" for e in entries[:EXAMPLES]]
        if len(entries) > EXAMPLES:
            lines.append(f"    ... {len(entries) - EXAMPLES} more")
    for kind, per_class in report.get("typical", {}).items():
        lines.append(
            f"{kind.replace('_', ' ')} but typical of their class (not flagged): " + ", ".join(f"{c} {n}" for c, n in per_class.items())
        )
    if clean:
        lines.append("nothing found: " + ", ".join(k.replace("_", " ") for k in clean))
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write OUT/audit.json and OUT/audit.html (atomically); returns both paths."""
    from imgcls.audit.html import render_html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / JSON_FILE, out / HTML_FILE
    atomic_write_text(json_path, json.dumps(report, indent=1) + "\n")
    atomic_write_text(html_path, render_html(report))
    return json_path, html_path
