"""Multi-label CSV manifests: which form a manifest has (`manifest_task`) and its rows with
multi-hot labels (`read_multilabel_manifest`). data.index_dataset calls them for a .csv DATA.

Two forms, each with an optional `split` column (train, val or test) as for single labels:

    path,labels,split                  path,desert,mountains,sea,split
    a.jpg,sea;sunset,train             a.jpg,0,0,1,train
    b.jpg,,train                       b.jpg,0,0,0,train      (no label: "none of them")

The separator of the `labels` column is `label_sep` (";" by default; --label-sep).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from imgcls.config import TASKS
from imgcls.data import LABEL_COLUMNS, PATH_COLUMNS, DatasetError, check_split_column, manifest_split, manifest_text
from imgcls.multilabel import split_label_cell

LABELS_COLUMN = "labels"  # the multi-label list column ("a;b"); a single-label manifest's is "label"


def _header(csv_path: Path, text: str) -> list[str]:
    try:
        return next(csv.reader(io.StringIO(text, newline="")), [])
    except csv.Error as e:
        raise DatasetError(f"{csv_path}:1: not a readable CSV header ({e})") from None


def _columns(header: list[str]) -> tuple[str | None, str | None, list[int]]:
    """(path column, list column, the other columns' positions) of a header; names lower-cased."""
    cols = [c.strip().lower() for c in header]
    path_col = next((c for c in PATH_COLUMNS if c in cols), None)
    list_col = LABELS_COLUMN if LABELS_COLUMN in cols else next((c for c in LABEL_COLUMNS if c in cols), None)
    others = [i for i, c in enumerate(cols) if c and c not in (path_col, "split") and c not in (LABELS_COLUMN, *LABEL_COLUMNS)]
    return path_col, list_col, others


def manifest_task(csv_path: Path, task: str) -> str:
    """ "single-label" or "multi-label" for the manifest at `csv_path` and the requested `task`
    (auto: multi-label when it has a `labels` column, or extra columns and no `label` column)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task != "auto":
        return task
    cols = [c.strip().lower() for c in _header(csv_path, manifest_text(csv_path))]
    path_col, _, others = _columns(cols)
    if LABELS_COLUMN in cols or (path_col is not None and others and not any(c in cols for c in LABEL_COLUMNS)):
        return "multi-label"
    return "single-label"


def read_multilabel_manifest(
    csv_path: Path, class_names: list[str] | None, label_sep: str = ";"
) -> tuple[list[str], list[tuple[int, str, str, str]], np.ndarray]:
    """(label names, rows, multi-hot targets (rows, C) uint8) of a multi-label manifest.

    rows are (line number, path, the row's labels joined by ";", split or "all"), as data's
    single-label reader gives them. class_names pins the label order (a trained model's labels):
    a label or label column it does not know is an error, and so is, in the column form, a model
    label without its column. Errors name the file and the line.
    """
    text = manifest_text(csv_path)
    header = _header(csv_path, text)
    path_col, list_col, others = _columns(header)
    if path_col is None:
        raise DatasetError(f"{csv_path}: a manifest needs a header with a 'path' column, found {header}")
    if list_col is not None:
        names, rows, targets = _read_list_form(csv_path, text, path_col, list_col, class_names, label_sep)
    elif others:
        names, rows, targets = _read_column_form(csv_path, text, path_col, [header[i].strip() for i in others], class_names)
    else:
        raise DatasetError(f"{csv_path}: a multi-label manifest needs a 'labels' column (e.g. 'sea;sunset') or one 0/1 column per label")
    check_split_column(csv_path, rows)
    return names, rows, targets


def _rows(csv_path: Path, text: str, path_col: str) -> list[tuple[int, str, str, dict[str, str]]]:
    """(line number, path, split, all cells by stripped column name, original case) per data row."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    out = []
    try:
        for row in reader:
            lineno = reader.line_num
            cells = {k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)}
            lower = {k.lower(): v for k, v in cells.items()}
            path = lower.get(path_col, "")
            if not path:
                raise DatasetError(f"{csv_path}:{lineno}: empty path")
            if any("\0" in v for v in cells.values()):  # Python >= 3.11's csv reads NUL bytes; 3.10's refused the row
                raise DatasetError(f"{csv_path}:{lineno}: the {'path' if chr(0) in path else 'row'} contains a NUL byte")
            out.append((lineno, path, manifest_split(csv_path, lineno, lower.get("split", "")), cells))
    except csv.Error as e:
        raise DatasetError(f"{csv_path}:{reader.line_num}: not a readable CSV row ({e})") from None
    return out


def _read_list_form(
    csv_path: Path, text: str, path_col: str, list_col: str, class_names: list[str] | None, sep: str
) -> tuple[list[str], list[tuple[int, str, str, str]], np.ndarray]:
    parsed = []
    for lineno, path, split, cells in _rows(csv_path, text, path_col):
        cell = next((v for k, v in cells.items() if k.lower() == list_col), "")
        parsed.append((lineno, path, split, split_label_cell(cell, sep)))
    names = list(class_names) if class_names else sorted({lab for *_, labs in parsed for lab in labs})
    if not names:
        raise DatasetError(f"{csv_path}: no labels in column {list_col!r} (labels are separated by {sep!r})")
    lookup = {n: i for i, n in enumerate(names)}
    targets = np.zeros((len(parsed), len(names)), dtype=np.uint8)
    rows = []
    for r, (lineno, path, split, labs) in enumerate(parsed):
        for lab in labs:
            if lab not in lookup:
                raise DatasetError(f"{csv_path}:{lineno}: label {lab!r} is not one of the model's labels {names}")
            targets[r, lookup[lab]] = 1
        rows.append((lineno, path, ";".join(sorted(labs)), split))
    return names, rows, targets


def _read_column_form(
    csv_path: Path, text: str, path_col: str, columns: list[str], class_names: list[str] | None
) -> tuple[list[str], list[tuple[int, str, str, str]], np.ndarray]:
    if len({c.lower() for c in columns}) < len(columns):
        raise DatasetError(f"{csv_path}: label columns repeat a name: {columns}")
    names = list(class_names) if class_names else columns
    if class_names:
        unknown = [c for c in columns if c not in class_names]
        missing = [n for n in class_names if n not in columns]
        if unknown or missing:
            raise DatasetError(
                f"{csv_path}: the label columns must be the model's labels {class_names}"
                + (f"; not known: {unknown}" if unknown else "")
                + (f"; missing: {missing}" if missing else "")
            )
    parsed = _rows(csv_path, text, path_col)
    targets = np.zeros((len(parsed), len(names)), dtype=np.uint8)
    rows = []
    for r, (lineno, path, split, cells) in enumerate(parsed):
        for c, name in enumerate(names):
            v = cells.get(name, "")
            if v not in ("0", "1"):
                raise DatasetError(f"{csv_path}:{lineno}: column {name!r} must be 0 or 1, found {v!r}")
            targets[r, c] = v == "1"
        rows.append((lineno, path, ";".join(n for n, t in zip(names, targets[r]) if t), split))
    return names, rows, targets
