"""Decoding a list of image files once into a uint8 array at the model's cache size
(`decode_images`), in worker processes, optionally kept as a memory-mapped cache file.

Files that cannot be decoded are listed with the decoder's reason and left out.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls.atomic import atomic_path, atomic_write_text
from imgcls.config import DEFAULT_MAX_PIXELS
from imgcls.io import ImageDecodeError, load_image, open_image_file
from imgcls.transforms import PreprocessSpec, resize_image

CACHE_VERSION = 1


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
        with open_image_file(path) as f:  # regular files only: a FIFO or /dev/zero is refused unread
            data = f.read()
    except ImageDecodeError as e:
        return None, e.reason, ""
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
    if cache_npy is None:
        buf = np.empty((n, s, s, 3), dtype=np.uint8)
        ok, hashes, failures = _decode_into(buf, paths, spec, max_pixels, workers, progress, desc)
        keep = np.flatnonzero(ok)
        images = buf[keep] if len(keep) < n else buf
        return DecodedImages(images, [paths[i] for i in keep], keep, failures, [hashes[i] for i in keep])
    # Decoded straight into the memory-mapped temp file; it becomes the cache only when complete,
    # so a run killed mid-decode leaves neither a partial cache nor a stray temp file.
    with atomic_path(cache_npy) as tmp_npy:
        buf = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=(n, s, s, 3))
        ok, hashes, failures = _decode_into(buf, paths, spec, max_pixels, workers, progress, desc)
        keep = np.flatnonzero(ok)
        if len(keep) < n:  # compact: the cache holds only decodable images
            images = buf[keep]  # (K, S, S, 3) copy, so the map can be dropped before the file is rewritten
            del buf
            with open(tmp_npy, "wb") as f:  # a file object: given a path, np.save appends ".npy" to the temp name
                np.save(f, images, allow_pickle=False)
            del images
        else:
            buf.flush()
            del buf
    meta = {"keep": keep.tolist(), "failures": failures, "hashes": [hashes[i] for i in keep], "spec": spec.to_dict()}
    atomic_write_text(cache_meta, json.dumps(meta))
    images = np.load(cache_npy, mmap_mode="r", allow_pickle=False)
    return DecodedImages(images, [paths[i] for i in keep], keep, failures, [hashes[i] for i in keep])


def _decode_into(
    buf: np.ndarray, paths: list[str], spec: PreprocessSpec, max_pixels: int, workers: int, progress: bool, desc: str
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Decode `paths` into `buf` (N, S, S, 3) uint8 in `workers` processes: (ok mask, content hashes, failures)."""
    from tqdm.auto import tqdm

    n = len(paths)
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
    return ok, hashes, failures
