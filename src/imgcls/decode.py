"""Decoding a list of image files once into a uint8 array at the model's cache size
(`decode_images`), in worker processes, optionally kept as a memory-mapped cache file.

Files that cannot be decoded are listed with the decoder's reason and left out.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls.atomic import atomic_path, atomic_write_text
from imgcls.config import DEFAULT_MAX_PIXELS
from imgcls.io import ImageDecodeError, load_image, open_image_file
from imgcls.transforms import PreprocessSpec, resize_image

CACHE_VERSION = 1
SPILL_SHARE = 0.5  # a split whose images would take more than this share of the available memory is decoded into a file


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
    spill_dir: str | os.PathLike | None = None,
) -> DecodedImages:
    """Decode every file once into a uint8 (N, S, S, 3) array at `spec.cache_size`.

    With `cache_dir`, the array is a memory-mapped .npy keyed by the files (path, size, mtime)
    and the spec, so a second run (or `--resume`) maps it back instead of decoding again.
    Without it but with `spill_dir`, the array is a memory-mapped file there that is deleted at
    once (the map keeps it until the array is dropped): for data larger than memory (`needs_spill`).
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
        buf = _spill_buffer((n, s, s, 3), spill_dir) if spill_dir is not None else np.empty((n, s, s, 3), dtype=np.uint8)
        ok, hashes, failures = _decode_into(buf, paths, spec, max_pixels, workers, progress, desc)
        keep = np.flatnonzero(ok)
        for j in range(int(np.argmin(ok)) if len(keep) < n else n, len(keep)):  # compact in place: keep[j] >= j, no second array
            buf[j] = buf[keep[j]]
        images = buf[: len(keep)]
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


def decoded_bytes(n: int, spec: PreprocessSpec) -> int:
    """Bytes of the uint8 array `decode_images` makes for n files."""
    return n * spec.cache_size * spec.cache_size * 3


def available_memory() -> int | None:
    """Bytes of memory a new allocation can take (Linux MemAvailable, else the free pages); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def needs_spill(nbytes: int, available: int | None = None) -> bool:
    """Whether an array of `nbytes` should be decoded into a file rather than memory: more than
    SPILL_SHARE of the available memory (MNIST's 60,000 images at 224 px are 11.8 GB; training
    needs room beside them)."""
    available = available_memory() if available is None else available
    return available is not None and nbytes > SPILL_SHARE * available


def _spill_buffer(shape: tuple[int, ...], folder: str | os.PathLike) -> np.ndarray:
    """A writable uint8 memory map of `shape` in a file in `folder`, deleted at once where the
    system allows (POSIX): the map keeps the space, and nothing is left behind after the run."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".decoded-", suffix=".npy", dir=folder)
    os.close(fd)
    buf = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    try:
        os.unlink(tmp)
    except OSError:  # Windows: a mapped file cannot be deleted; it stays as a hidden .decoded-*.npy
        pass
    return buf


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
