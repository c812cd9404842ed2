"""Dataset indexing, stratified splits and the decoded uint8 cache.

Three layouts are recognised (`index_dataset`):
- class folders       DATA/<class>/**/*.jpg
- split folders       DATA/{train,val|valid|validation,test}/<class>/**/*
- a CSV manifest      path,label[,split] with paths relative to the CSV file; multi-label:
                      path,labels[,split] ("a;b", "" for none) or one 0/1 column per label
                      (read by imgcls.data_multilabel; index_dataset's `task`)
Every image is decoded exactly once (`decode_images`) into a uint8 array at the cache size of the
preprocessing spec; files that cannot be decoded are reported with a reason and left out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcls.decode import DecodedImages, decode_images  # noqa: F401 (re-exported: imgcls.data.decode_images)
from imgcls.io import IMAGE_EXTENSIONS, is_image_path
from imgcls.transforms import PreprocessSpec

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
PATH_COLUMNS = ("path", "filepath", "file", "filename", "image", "image_path")  # first match wins
LABEL_COLUMNS = ("label", "class", "category", "target")


class DatasetError(ValueError):
    """The dataset cannot be used as given (layout, classes, manifest)."""


@dataclass
class DatasetIndex:
    """Image paths and integer labels per split ("all" when DATA has no split folders).

    Multi-label data (`targets` set) keeps the same shape: a sample's integer is its row of
    `targets`, the multi-hot labels (rows, C) uint8 of the manifest, so that code which filters
    or reorders samples keeps them with their labels (`load_split(..., targets)` looks them up).
    """

    root: Path
    layout: str  # "folders" | "splits" | "csv"
    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]]
    ignored: Counter = field(default_factory=Counter)  # reason -> number of files skipped while listing
    targets: np.ndarray | None = None  # multi-label: (rows, C) uint8 multi-hot; None: single-label

    @property
    def multilabel(self) -> bool:
        return self.targets is not None

    def summary(self) -> str:
        parts = [f"{k}: {len(v)}" for k, v in self.splits.items()]
        kind = f"{len(self.class_names)} labels (multi-label)" if self.multilabel else f"{len(self.class_names)} classes"
        msg = f"{self.layout} dataset at {self.root}: {kind}, " + ", ".join(parts) + " images"
        if self.ignored:
            msg += " (ignored " + ", ".join(f"{n} {why}" for why, n in sorted(self.ignored.items())) + ")"
        return msg


FileKey = tuple  # (st_dev, st_ino) of an existing file, or ("path", realpath) of one that is not there (yet)


def _file_key(path: str | os.PathLike, st: os.stat_result | None = None) -> FileKey:
    """What identifies a file whatever it is called: its inode (links, hard links, `a/../b`)."""
    try:
        st = st or os.stat(path)
        return (st.st_dev, st.st_ino)
    except (OSError, ValueError):
        return ("path", os.path.realpath(path))


def _list_images(folder: Path, ignored: Counter) -> list[tuple[Path, FileKey]]:
    """Image files under `folder`, following folder links but entering each real folder once.

    Only regular files are listed (a FIFO named p.png would block the decoder, a link to
    /dev/zero would read forever); each comes with its FileKey for de-duplication.
    """
    out = []
    real = Path(os.path.realpath(folder))
    seen_dirs = {_file_key(d) for d in (real, *real.parents)}  # a link to an ancestor is a loop too
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            key = _file_key(os.path.join(dirpath, d))
            if key in seen_dirs:  # `ln -s . loop` (or a link to an ancestor) would list the same files again and again
                ignored["repeated folders (links)"] += 1
            else:
                seen_dirs.add(key)
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.startswith("."):
                ignored["hidden files"] += 1
            elif not is_image_path(name):
                ignored["non-image files"] += 1
            else:
                path = Path(dirpath) / name
                try:
                    st = os.stat(path)
                except OSError:
                    ignored["broken links"] += 1
                    continue
                if stat.S_ISREG(st.st_mode):
                    out.append((path, _file_key(path, st)))
                else:
                    ignored["special files (not regular files)"] += 1
    return out


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


Sample = tuple[str, int, FileKey]  # (path, label, file key) while indexing


def _index_class_folders(root: Path, class_names: list[str], ignored: Counter) -> list[Sample]:
    samples = []
    for label, name in enumerate(class_names):
        if (root / name).is_dir():
            samples += [(str(p), label, key) for p, key in _list_images(root / name, ignored)]
    for p in root.iterdir():
        if p.is_file():
            ignored["files outside class folders"] += 1
    return samples


def _drop_duplicate_files(splits: dict[str, list[Sample]], class_names: list[str], ignored: Counter) -> dict[str, list[tuple[str, int]]]:
    """Each real file once: a second link to a file in the same class and split is skipped; one in
    another class or split is an error (the same image would be trained on and validated on)."""
    first: dict[FileKey, tuple[str, str, int]] = {}  # key -> (split, path, label)
    out: dict[str, list[tuple[str, int]]] = {}
    for split, samples in splits.items():
        kept = out.setdefault(split, [])
        for path, label, key in samples:
            if key not in first:
                first[key] = (split, path, label)
                kept.append((path, label))
                continue
            split0, path0, label0 = first[key]
            if (split0, label0) == (split, label):
                ignored["duplicate links to one file"] += 1
                continue
            where = f"classes {class_names[label0]!r} and {class_names[label]!r}" if label0 != label else f"splits {split0!r} and {split!r}"
            raise DatasetError(
                f"{path} is the same file as {path0} (a link), in {where}: a file can have one class and one split; remove one of them"
            )
    return out


def manifest_text(csv_path: Path) -> str:
    """A CSV manifest's text; DatasetError naming the line when it is not UTF-8."""
    raw = csv_path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DatasetError(f"{csv_path}:{line}: the manifest is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def manifest_split(csv_path: Path, lineno: int, given: str) -> str:
    """A row's split column value as a split name ("all" when empty); DatasetError for another value."""
    if given and given.lower() not in SPLIT_ALIASES:
        choices = ", ".join(SPLIT_ALIASES)
        raise DatasetError(f"{csv_path}:{lineno}: split {given!r} is not one of {choices} (or empty for no split column)")
    return SPLIT_ALIASES[given.lower()] if given else "all"


def check_split_column(csv_path: Path, rows: list[tuple[int, str, str, str]]) -> None:
    """Every row has a split or none has."""
    if "all" in {sp for *_, sp in rows} and len({sp for *_, sp in rows}) > 1:
        line = next(n for n, *_, sp in rows if sp == "all")
        raise DatasetError(f"{csv_path}:{line}: this row has no split while others do; give every row a split (train, val or test) or none")


def _read_manifest(csv_path: Path) -> list[tuple[int, str, str, str]]:
    """(line number, path, label, split or "all") for every row of a CSV manifest."""
    reader = csv.DictReader(io.StringIO(manifest_text(csv_path), newline=""))
    rows: list[tuple[int, str, str, str]] = []
    try:
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        path_col = next((c for c in PATH_COLUMNS if c in cols), None)
        label_col = next((c for c in LABEL_COLUMNS if c in cols), None)
        if path_col is None or label_col is None:
            raise DatasetError(f"{csv_path}: a manifest needs a header with columns 'path' and 'label', found {reader.fieldnames}")
        for row in reader:
            lineno = reader.line_num  # the physical line (blank lines and quoted newlines counted)
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if isinstance(k, str)}
            path, label, given = row.get(path_col, ""), row.get(label_col, ""), row.get("split", "")
            if not path or not label:
                raise DatasetError(f"{csv_path}:{lineno}: empty path or label")
            if "\0" in path or "\0" in label:  # Python >= 3.11's csv reads NUL bytes; 3.10's refused the row
                raise DatasetError(f"{csv_path}:{lineno}: the {'path' if chr(0) in path else 'label'} contains a NUL byte")
            rows.append((lineno, path, label, manifest_split(csv_path, lineno, given)))
    except csv.Error as e:  # a NUL byte, an over-long field, bad quoting in strict dialects
        raise DatasetError(f"{csv_path}:{reader.line_num}: not a readable CSV row ({e})") from None
    check_split_column(csv_path, rows)
    return rows


def _check_manifest_rows(csv_path: Path, rows: list[tuple[int, str, str, str]], keys: list[FileKey]) -> None:
    """Every file once: a repeated row would be counted twice (and may land in train and val), a
    file with two labels or two splits is a contradiction. Errors name both line numbers."""
    # Multi-label manifests list a file once too, with all its labels in one row (label: "a;b").
    first: dict[FileKey, tuple[int, str, str]] = {}
    problems = []
    for (lineno, path, label, split), key in zip(rows, keys):
        if key not in first:
            first[key] = (lineno, label, split)
            continue
        line0, label0, split0 = first[key]
        if label != label0:
            problems.append(f"line {lineno} gives {path} the label {label!r}, line {line0} gave it {label0!r}")
        elif split != split0:
            problems.append(f"line {lineno} puts {path} in split {split!r}, line {line0} put it in {split0!r}")
        else:
            problems.append(f"line {lineno} repeats line {line0} ({path})")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DatasetError(f"{csv_path}: each file may be listed once: " + "; ".join(problems[:5]) + more)


def _check_inside_root(csv_path: Path, rows: list[tuple[int, str, str, str]]) -> None:
    """Manifest paths must stay in the manifest's folder (after `..` and links are resolved)."""
    base = os.path.realpath(csv_path.parent)
    outside = []
    for lineno, path, _, _ in rows:
        real = os.path.realpath(os.path.join(csv_path.parent, path))  # an absolute `path` replaces the folder
        try:
            inside = os.path.commonpath([base, real]) == base
        except ValueError:  # another drive (Windows)
            inside = False
        if not inside:
            outside.append(f"line {lineno}: {path}" + ("" if real == path else f" -> {real}"))
    if outside:
        more = f" (and {len(outside) - 5} more)" if len(outside) > 5 else ""
        raise DatasetError(
            f"{csv_path}: {len(outside)} path(s) lead outside the manifest's folder {base}: "
            + "; ".join(outside[:5])
            + more
            + ". Move the files (or the manifest), or pass --allow-outside-root if the manifest is trusted"
        )


def _index_csv(
    csv_path: Path, class_names: list[str] | None, ignored: Counter, allow_outside_root: bool, task: str, label_sep: str
) -> tuple[list[str], dict[str, list[tuple[str, int]]], np.ndarray | None]:
    # data_multilabel builds on this module's helpers, hence the import here and not at the top.
    from imgcls.data_multilabel import manifest_task, read_multilabel_manifest

    base = csv_path.parent
    targets = None
    if manifest_task(csv_path, task) == "multi-label":
        names, rows, targets = read_multilabel_manifest(csv_path, class_names, label_sep)
        sample_label = list(range(len(rows)))  # a sample's integer is its row of targets
    else:
        rows = _read_manifest(csv_path)
        names = class_names or sorted({label for _, _, label, _ in rows})
        lookup = {n: i for i, n in enumerate(names)}
        for lineno, _, label, _ in rows:
            if label not in lookup:
                raise DatasetError(f"{csv_path}:{lineno}: label {label!r} is not one of the model's classes {names}")
        sample_label = [lookup[label] for _, _, label, _ in rows]
    paths = [Path(path) if os.path.isabs(path) else base / path for _, path, _, _ in rows]
    _check_manifest_rows(csv_path, rows, [_file_key(p) for p in paths])
    used = []
    for row, p, y in zip(rows, paths, sample_label):
        if Path(row[1]).name.startswith("."):
            ignored["hidden files"] += 1
        elif not is_image_path(p):
            ignored["non-image files"] += 1
        else:
            used.append((row, p, y))
    if not allow_outside_root:
        _check_inside_root(csv_path, [row for row, _, _ in used])
    splits: dict[str, list[tuple[str, int]]] = {}
    for (_, _, _, split), p, y in used:
        splits.setdefault(split, []).append((str(p), y))
    return names, splits, targets


def index_dataset(
    path: str | os.PathLike,
    class_names: list[str] | None = None,
    allow_outside_root: bool = False,
    task: str = "single-label",
    label_sep: str = ";",
) -> DatasetIndex:
    """List the images under `path` (see module docstring) with labels; nothing is decoded yet.

    class_names: pin the label order (e.g. a trained model's classes); default is sorted folder
    or label names. Only regular files are listed, each real file once (links are resolved).
    allow_outside_root: let a CSV manifest name files outside its own folder (`../x.png`,
    absolute paths, links out); refused by default. Folder layouts may always link elsewhere.
    task (config.TASKS): "single-label" reads a manifest's `label` column; "multi-label" its labels
    (a `labels` or `label` column split on `label_sep`, or 0/1 columns); "auto" takes multi-label
    for a manifest with a `labels` column or 0/1 columns and no `label` column. Only a CSV
    manifest can be multi-label.
    """
    root = Path(path).expanduser()
    ignored: Counter = Counter()
    targets = None
    if not root.exists():
        raise DatasetError(f"{root}: no such file or folder")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DatasetError(f"{root}: expected a folder of class folders or a .csv manifest")
        names, splits, targets = _index_csv(root, class_names, ignored, allow_outside_root, task, label_sep)
        layout = "csv"
    elif not root.is_dir():
        raise DatasetError(f"{root}: not a folder or a regular .csv file")
    elif task == "multi-label":
        raise DatasetError(f"{root}: multi-label data is read from a CSV manifest (path,labels with labels like 'a;b', or 0/1 columns)")
    else:
        subdirs = _class_dirs(root)
        split_dirs = {SPLIT_ALIASES[d.lower()]: d for d in subdirs if d.lower() in SPLIT_ALIASES}
        if split_dirs and ("train" in split_dirs or len(split_dirs) == len(subdirs)):
            names = class_names or sorted({c for d in split_dirs.values() for c in _class_dirs(root / d)})
            found = {s: _index_class_folders(root / d, names, ignored) for s, d in split_dirs.items()}
            layout = "splits"
        else:
            names = class_names or subdirs
            found = {"all": _index_class_folders(root, names, ignored)}
            layout = "folders"
        splits = _drop_duplicate_files(found, names, ignored)
    if not names:
        raise DatasetError(f"{root}: no class folders found (expected DATA/<class>/<image> or DATA/train/<class>/<image>)")
    if not any(splits.values()):
        raise DatasetError(f"{root}: no image files found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return DatasetIndex(root, layout, list(names), splits, ignored, targets)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): each class split on its own, so every class is in both parts.

    Per class, round(n * val_fraction) images go to validation (at least 1, at most n - 1).
    A class with fewer than 2 images cannot be split and is an error naming the class.
    """
    labels = np.asarray(labels)
    if val_fraction <= 0:
        return np.arange(len(labels)), np.arange(0)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(len(class_names)):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        if len(idx) < 2:
            raise DatasetError(f"class {class_names[c]!r} has {len(idx)} usable image; at least 2 are needed to split off validation")
        idx = rng.permutation(idx)
        n_val = min(len(idx) - 1, max(1, int(round(len(idx) * val_fraction))))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def dataset_fingerprint(paths: list[str], labels: list[int], hashes: list[str], class_names: list[str], root: Path) -> str:
    """sha256 over (relative path, class name, content sha1) of every decoded file, sorted."""
    rows = sorted(f"{os.path.relpath(p, root)}\t{class_names[y]}\t{h}" for p, y, h in zip(paths, labels, hashes))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def load_split(
    samples: list[tuple[str, int]],
    spec: PreprocessSpec,
    cache_dir: str | os.PathLike | None,
    workers: int,
    max_pixels: int,
    progress: bool,
    desc: str,
    targets: np.ndarray | None = None,
    spill_dir: str | os.PathLike | None = None,
) -> tuple[DecodedImages, np.ndarray]:
    """Decode one split's samples; returns the decoded images and their labels: int64 (N,), or
    with multi-label `targets` (DatasetIndex.targets) their multi-hot rows (N, C) float32.
    spill_dir: decode into a temporary file there (`decode_images`)."""
    decoded = decode_images([p for p, _ in samples], spec, cache_dir, workers, max_pixels, progress, desc, spill_dir)
    labels = np.asarray([samples[i][1] for i in decoded.keep], dtype=np.int64)
    if targets is not None:
        return decoded, targets[labels].astype(np.float32).reshape(len(labels), targets.shape[1])
    return decoded, labels
