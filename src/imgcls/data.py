"""Dataset indexing, stratified splits and the decoded uint8 cache.

Three layouts are recognised (`index_dataset`):
- class folders       DATA/<class>/**/*.jpg
- split folders       DATA/{train,val|valid|validation,test}/<class>/**/*
- a CSV manifest      path,label[,split] with paths relative to the CSV file
Every image is decoded exactly once (`decode_images`) into a uint8 array at the cache size of the
preprocessing spec; files that cannot be decoded are reported with a reason and left out.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcls.config import DEFAULT_MAX_PIXELS
from imgcls.io import IMAGE_EXTENSIONS, ImageDecodeError, is_image_path, load_image
from imgcls.transforms import PreprocessSpec, resize_image

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
CACHE_VERSION = 1
PATH_COLUMNS = ("path", "filepath", "file", "filename", "image", "image_path")  # first match wins
LABEL_COLUMNS = ("label", "class", "category", "target")


class DatasetError(ValueError):
    """The dataset cannot be used as given (layout, classes, manifest)."""


@dataclass
class DatasetIndex:
    """Image paths and integer labels per split ("all" when DATA has no split folders)."""

    root: Path
    layout: str  # "folders" | "splits" | "csv"
    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]]
    ignored: Counter = field(default_factory=Counter)  # reason -> number of files skipped while listing

    def summary(self) -> str:
        parts = [f"{k}: {len(v)}" for k, v in self.splits.items()]
        msg = f"{self.layout} dataset at {self.root}: {len(self.class_names)} classes, " + ", ".join(parts) + " images"
        if self.ignored:
            msg += " (ignored " + ", ".join(f"{n} {why}" for why, n in sorted(self.ignored.items())) + ")"
        return msg


def _list_images(folder: Path, ignored: Counter) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                ignored["hidden files"] += 1
            elif is_image_path(name):
                out.append(Path(dirpath) / name)
            else:
                ignored["non-image files"] += 1
    return out


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _index_class_folders(root: Path, class_names: list[str], ignored: Counter) -> list[tuple[str, int]]:
    samples = []
    for label, name in enumerate(class_names):
        if (root / name).is_dir():
            samples += [(str(p), label) for p in _list_images(root / name, ignored)]
    for p in root.iterdir():
        if p.is_file():
            ignored["files outside class folders"] += 1
    return samples


def _index_csv(csv_path: Path, class_names: list[str] | None, ignored: Counter) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    base = csv_path.parent
    rows: list[tuple[str, str, str]] = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        path_col = next((c for c in PATH_COLUMNS if c in cols), None)
        label_col = next((c for c in LABEL_COLUMNS if c in cols), None)
        if path_col is None or label_col is None:
            raise DatasetError(f"{csv_path}: a manifest needs a header with columns 'path' and 'label', found {reader.fieldnames}")
        for lineno, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            row["path"], row["label"] = row.get(path_col, ""), row.get(label_col, "")
            if not row.get("path") or not row.get("label"):
                raise DatasetError(f"{csv_path}:{lineno}: empty path or label")
            given = row.get("split", "")
            if given and given.lower() not in SPLIT_ALIASES:
                raise DatasetError(f"{csv_path}:{lineno}: split {given!r} is not one of {', '.join(SPLIT_ALIASES)} (or empty for no split column)")
            rows.append((row["path"], row["label"], SPLIT_ALIASES[given.lower()] if given else "all"))
    if "all" in {sp for _, _, sp in rows} and len({sp for _, _, sp in rows}) > 1:
        line = next(i for i, (_, _, sp) in enumerate(rows, start=2) if sp == "all")
        raise DatasetError(f"{csv_path}:{line}: this row has no split while others do; give every row a split (train, val or test) or none")
    names = class_names or sorted({label for _, label, _ in rows})
    lookup = {n: i for i, n in enumerate(names)}
    splits: dict[str, list[tuple[str, int]]] = {}
    for path, label, split in rows:
        if label not in lookup:
            raise DatasetError(f"{csv_path}: label {label!r} is not one of the model's classes {names}")
        p = Path(path) if os.path.isabs(path) else base / path
        if Path(path).name.startswith("."):
            ignored["hidden files"] += 1
            continue
        if not is_image_path(p):
            ignored["non-image files"] += 1
            continue
        splits.setdefault(split, []).append((str(p), lookup[label]))
    return names, splits


def index_dataset(path: str | os.PathLike, class_names: list[str] | None = None) -> DatasetIndex:
    """List the images under `path` (see module docstring) with labels; nothing is decoded yet.

    class_names: pin the label order (e.g. a trained model's classes); default is sorted folder
    or label names.
    """
    root = Path(path).expanduser()
    ignored: Counter = Counter()
    if not root.exists():
        raise DatasetError(f"{root}: no such file or folder")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DatasetError(f"{root}: expected a folder of class folders or a .csv manifest")
        names, splits = _index_csv(root, class_names, ignored)
        layout = "csv"
    else:
        subdirs = _class_dirs(root)
        split_dirs = {SPLIT_ALIASES[d.lower()]: d for d in subdirs if d.lower() in SPLIT_ALIASES}
        if split_dirs and ("train" in split_dirs or len(split_dirs) == len(subdirs)):
            names = class_names or sorted({c for d in split_dirs.values() for c in _class_dirs(root / d)})
            splits = {s: _index_class_folders(root / d, names, ignored) for s, d in split_dirs.items()}
            layout = "splits"
        else:
            names = class_names or subdirs
            splits = {"all": _index_class_folders(root, names, ignored)}
            layout = "folders"
    if not names:
        raise DatasetError(f"{root}: no class folders found (expected DATA/<class>/<image> or DATA/train/<class>/<image>)")
    if not any(splits.values()):
        raise DatasetError(f"{root}: no image files found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return DatasetIndex(root, layout, list(names), splits, ignored)



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


@dataclass
class DecodedImages:
    """The decode cache: uint8 images (N, S, S, 3) for the files that decoded, in input order."""

    images: np.ndarray
    paths: list[str]  # the decoded files, aligned with images
    keep: np.ndarray  # indices into the input list of the files that decoded
    failures: list[tuple[str, str]]  # (path, reason) for every file left out
    hashes: list[str]  # sha1 of each decoded file's bytes


def _decode_one(args: tuple[str, PreprocessSpec, int]) -> tuple[np.ndarray | None, str, str]:
    path, spec, max_pixels = args
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"cannot read file: {e.strerror or e}", ""
    try:
        img = load_image(data, name=path, max_pixels=max_pixels, draft_size=spec.cache_size)
        return resize_image(img, spec), "", hashlib.sha1(data).hexdigest()
    except ImageDecodeError as e:
        return None, e.reason, ""


def _decode_run(args: tuple[list[str], PreprocessSpec, int]) -> tuple[np.ndarray, list[str], list[str]]:
    """Decode a run of files in one worker task: uint8 (n, S, S, 3) (zeros where a file failed),
    the reasons ("" for a file that decoded) and the sha1 digests.

    One stacked array per run, not one object per image: for small images (CIFAR's 32x32) the
    per-image pickling and bookkeeping in the parent otherwise costs about what the decoding does
    and two workers were no faster than one.
    """
    paths, spec, max_pixels = args
    s = spec.cache_size
    out = np.zeros((len(paths), s, s, 3), dtype=np.uint8)
    reasons, digests = [], []
    for i, p in enumerate(paths):
        arr, reason, digest = _decode_one((p, spec, max_pixels))
        if arr is not None:
            out[i] = arr
        reasons.append(reason)
        digests.append(digest)
    return out, reasons, digests


def _cache_key(paths: list[str], spec: PreprocessSpec, max_pixels: int) -> str:
    h = hashlib.sha256(json.dumps([CACHE_VERSION, spec.to_dict(), max_pixels]).encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:24]


def decode_images(
    paths: list[str],
    spec: PreprocessSpec,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    desc: str = "decode",
) -> DecodedImages:
    """Decode every file once into a uint8 (N, S, S, 3) array at `spec.cache_size`.

    With `cache_dir`, the array is a memory-mapped .npy keyed by the files (path, size, mtime)
    and the spec, so a second run (or `--resume`) maps it back instead of decoding again.
    Decoding runs in `workers` processes (0 = one per core).
    """
    from tqdm.auto import tqdm

    s = spec.cache_size
    key = _cache_key(paths, spec, max_pixels)
    cache_npy = cache_meta = None
    if cache_dir is not None:
        cdir = Path(cache_dir)
        cdir.mkdir(parents=True, exist_ok=True)
        cache_npy, cache_meta = cdir / f"{key}.npy", cdir / f"{key}.json"
        if cache_npy.exists() and cache_meta.exists():
            meta = json.loads(cache_meta.read_text())
            images = np.load(cache_npy, mmap_mode="r", allow_pickle=False)
            keep = np.asarray(meta["keep"], dtype=np.int64)
            return DecodedImages(images, [paths[i] for i in keep], keep, [tuple(f) for f in meta["failures"]], meta["hashes"])

    n = len(paths)
    if cache_npy is not None:
        tmp_npy = cache_npy.with_suffix(f".tmp{os.getpid()}.npy")
        buf = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=(n, s, s, 3))
    else:
        buf = np.empty((n, s, s, 3), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    hashes = [""] * n
    failures: list[tuple[str, str]] = []
    n_proc = min(workers or os.cpu_count() or 1, max(1, n // 64))
    run = max(1, min(256, n // (n_proc * 8)))  # files per worker task; several tasks per worker keep the bar moving
    jobs = [(paths[i : i + run], spec, max_pixels) for i in range(0, n, run)]
    bar = tqdm(total=n, desc=desc, unit="img", disable=None if progress else True, leave=False)
    if n_proc > 1:
        ctx = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else multiprocessing.get_context()
        pool = ctx.Pool(n_proc)
        results = pool.imap(_decode_run, jobs)
    else:
        pool = None
        results = map(_decode_run, jobs)
    try:
        start = 0
        for arrays, reasons, digests in results:
            for j, (reason, digest) in enumerate(zip(reasons, digests)):
                if reason:
                    failures.append((paths[start + j], reason))
                else:
                    ok[start + j], hashes[start + j] = True, digest
            buf[start : start + len(reasons)] = arrays
            start += len(reasons)
            bar.update(len(reasons))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    keep = np.flatnonzero(ok)
    images = buf[keep] if len(keep) < n else buf
    if cache_npy is not None:
        if len(keep) < n:  # compact: the cache holds only decodable images
            del buf
            np.save(tmp_npy, np.ascontiguousarray(images), allow_pickle=False)
        else:
            buf.flush()
            del buf
        os.replace(tmp_npy, cache_npy)
        meta = {"keep": keep.tolist(), "failures": failures, "hashes": [hashes[i] for i in keep], "spec": spec.to_dict()}
        tmp_meta = cache_meta.with_suffix(f".tmp{os.getpid()}")
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, cache_meta)
        images = np.load(cache_npy, mmap_mode="r", allow_pickle=False)
    return DecodedImages(images, [paths[i] for i in keep], keep, failures, [hashes[i] for i in keep])


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
) -> tuple[DecodedImages, np.ndarray]:
    """Decode one split's samples; returns the decoded images and their labels (int64)."""
    decoded = decode_images([p for p, _ in samples], spec, cache_dir, workers, max_pixels, progress, desc)
    labels = np.asarray([samples[i][1] for i in decoded.keep], dtype=np.int64)
    return decoded, labels
