"""`run_audit`: every check of `imgcls audit` over one data set, as one JSON-ready document.

The document (also written as audit.json) has these keys:

- "version", "data" (the path given), "root" (absolute folder that "paths" are relative to),
  "layout", "class_names", "splits" ({split: images}), "num_images", "ignored" ({reason: count}
  of files the index skipped), "settings" (features, "feature_size" the feature pass ran at and
  "feature_size_chosen" how, the data's "median_short_side", thresholds), "timings" (s);
- "class_counts" ({class: {split: n, ..., "total": n}}) and "imbalance_ratio" (largest class
  over smallest, null when a class has no image);
- "probe_accuracy": out-of-fold accuracy of the linear probe (null without features);
- "findings": {kind: [entry, ...]} for every kind in FINDING_KINDS, each list possibly empty.
  Every entry has "paths", "labels" (class names), "splits" (lists aligned with each other) and
  "exclude" (the paths that `--exclude-from` leaves out for this finding, often empty), plus the
  figures of its kind:
  unreadable: reason; exact_duplicates: sha1, relation, across_classes, across_splits;
  near_duplicates: relation, across_classes, across_splits, max_hash_bits (pHash bits that differ
  from the first member), min_cosine (feature cosine to the first member, null without features);
  label_issues: given, suggested, self_confidence, suggested_probability, rank;
  outliers: neighbour_similarity, z, nearest_class; tiny: width, height, median_short_side;
  extreme_aspect: width, height, aspect_ratio; dark, bright and near_constant: mean_grey, std_grey;
  blurry: laplacian_var, median_laplacian_var; unusual_mode: mode, format, reason.
- "typical": {"dark" | "bright" | "near_constant": {class: n}}: images past the absolute bound
  (pixels.DARK_MEAN, BRIGHT_MEAN, CONSTANT_STD) but not far from their class's median, i.e. what
  the class looks like (MNIST's black backgrounds, calm water): counted there, not flagged
  (`pixels.unusual_for_class`).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.audit import calibrate
from imgcls.audit import labels as label_checks
from imgcls.audit import neighbours as nb
from imgcls.audit.features import (
    DEFAULT_FEATURE_MODEL,
    PIXELS,
    FeatureExtractor,
    choose_feature_size,
    embedding,
    model_extractor,
    pixel_extractor,
    principal_components,
    probe_inputs,
)
from imgcls.audit.pixels import CONSTANT_STD, PixelStats, pixel_findings, pixel_stats
from imgcls.audit.scan import Header, Sample, header_findings, list_samples, read_header, unsupported_files
from imgcls.config import DEFAULT_MAX_PIXELS
from imgcls.data import DatasetIndex, decode_images, index_dataset
from imgcls.transforms import PreprocessSpec

REPORT_VERSION = 1
NO_FEATURES = "none"
FINDING_KINDS = (
    "unreadable",
    "exact_duplicates",
    "near_duplicates",
    "label_issues",
    "outliers",
    "tiny",
    "extreme_aspect",
    "dark",
    "bright",
    "near_constant",
    "blurry",
    "unusual_mode",
)
# Without features, images are decoded only for the pixel statistics and the hash: a 64 px crop.
PIXEL_ONLY_SPEC = PreprocessSpec(img_size=64, resize_mode="crop", crop_pct=1.0)
DECODE_CHUNK = 2048  # images decoded, measured and embedded at a time: the uint8 array never holds the whole set


@dataclass(frozen=True)
class AuditOptions:
    """What `run_audit` checks and how.

    features: a registered model name (pooled pre-logit features), "pixels" (the images
    themselves at 16 px: no model, for tests), or "none" (no features: no label probe, no
    outliers, near-duplicates by hash only). feature_size: the model's input size for the
    feature pass (None: chosen from the data's median short side, `features.choose_feature_size`;
    0: the model's own). folds: k of the k-fold label probe.
    """

    features: str = DEFAULT_FEATURE_MODEL
    pretrained: bool = True
    feature_size: int | None = None
    folds: int = label_checks.DEFAULT_FOLDS
    seed: int = 0
    duplicates: nb.DuplicateRule = field(default_factory=nb.DuplicateRule)
    outlier_z: float = 4.0
    workers: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    precision: str = "auto"
    batch_size: int | None = None
    allow_outside_root: bool = False  # a CSV manifest may name files outside its folder (see index_dataset)

    @property
    def uses_features(self) -> bool:
        return self.features != NO_FEATURES


@dataclass
class _Measured:
    """What the decode pass produced for the files that decoded (aligned arrays) and for those that did not."""

    ok: np.ndarray  # indices into the samples
    hashes: list[str]
    stats: PixelStats
    features: np.ndarray | None
    failures: dict[int, str]  # sample index -> the decoder's reason
    copy_check: calibrate.CopyCheck | None = None  # with features: how planted copies fared (calibrate.py)


def _extractor(options: AuditOptions, median_short_side: int) -> FeatureExtractor | None:
    if not options.uses_features:
        return None
    if options.features == PIXELS:
        return pixel_extractor()
    size = choose_feature_size(median_short_side) if options.feature_size is None else (options.feature_size or None)
    return model_extractor(options.features, options.pretrained, size, options.precision, options.batch_size)


def _measure(
    samples: list[Sample], extractor: FeatureExtractor | None, options: AuditOptions, progress: bool, native_side: int = 0
) -> _Measured:
    """Decode every file once (in chunks), measure its pixels and compute its features; with
    features, also those of resized, re-encoded copies of a sample (`calibrate`)."""
    from tqdm.auto import tqdm

    spec = extractor.spec if extractor is not None else PIXEL_ONLY_SPEC
    paths = [s.path for s in samples]
    ok, hashes, stats, feats, failures = [], [], [], [], {}
    pick = set(calibrate.sample_rows(len(paths), options.seed).tolist()) if extractor is not None else set()
    copy_rows: list[int] = []
    copies: list[np.ndarray] = []
    n_ok = 0
    desc = "decode + features" if extractor is not None else "decode"
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=None if progress else True)
    for start in range(0, len(paths), DECODE_CHUNK):
        dec = decode_images(paths[start : start + DECODE_CHUNK], spec, None, options.workers, options.max_pixels, progress=False)
        index_of = {p: start + i for i, p in enumerate(paths[start : start + DECODE_CHUNK])}
        failures.update({index_of[p]: reason for p, reason in dec.failures})
        ok.append(start + dec.keep)
        hashes += dec.hashes
        stats.append(pixel_stats(dec.images))
        if extractor is not None and len(dec.keep):
            feats.append(extractor.extract(dec.images).astype(np.float32))
        for j in (j for j, k in enumerate(dec.keep.tolist()) if start + k in pick):
            copy_rows.append(n_ok + j)
            copies.append(calibrate.make_copy(dec.images[j], native_side))
        n_ok += len(dec.keep)
        bar.update(min(DECODE_CHUNK, len(paths) - start))
    bar.close()
    features = np.concatenate(feats) if feats else (np.zeros((0, 1), np.float32) if extractor is not None else None)
    check = None
    if extractor is not None:
        copy_feats = extractor.extract(np.stack(copies)).astype(np.float32) if copies else np.zeros((0, features.shape[1]), np.float32)
        check = calibrate.check_copies(features, np.asarray(copy_rows, np.int64), copy_feats)
    return _Measured(np.concatenate(ok) if ok else np.zeros(0, np.int64), hashes, PixelStats.concat(stats), features, failures, check)


class _Entries:
    """Builds finding entries: paths relative to the root, class names, splits."""

    def __init__(self, samples: list[Sample], class_names: list[str], root: Path) -> None:
        self.samples, self.class_names, self.root = samples, class_names, root

    def rel(self, i: int) -> str:
        return Path(os.path.relpath(os.path.abspath(self.samples[i].path), self.root)).as_posix()

    def entry(self, members: list[int], exclude: list[int] | None = None, **figures: Any) -> dict[str, Any]:
        return {
            "paths": [self.rel(i) for i in members],
            "labels": [self.class_names[self.samples[i].label] for i in members],
            "splits": [self.samples[i].split for i in members],
            **figures,
            "exclude": [self.rel(i) for i in (exclude or [])],
        }


def _duplicate_entries(groups: list[tuple[list[int], dict]], samples: list[Sample], make: _Entries) -> list[dict]:
    """Entries for duplicate groups (sample indices, figures), the most serious relation first."""
    out = []
    for members, figures in groups:
        labels = [samples[i].label for i in members]
        splits = [samples[i].split for i in members]
        out.append(make.entry(members, nb.copies_to_drop(members, labels, splits), **figures, **nb.relation(labels, splits)))
    order = {"across_classes": 0, "across_splits": 1, "within_class": 2}
    return sorted(out, key=lambda e: order[e["relation"]])


def _near_duplicate_groups(m: _Measured, neighbours: nb.Neighbours, embed: np.ndarray | None) -> list[tuple[list[int], dict]]:
    """Near-duplicate groups as sample indices with their figures; groups of byte-identical files only are left to exact_duplicates."""
    from imgcls.audit.pixels import hamming

    out = []
    for group in neighbours.groups:
        if len({m.hashes[g] for g in group}) < 2:
            continue
        bits = np.minimum(
            hamming(m.stats.phash[group[:1], None], m.stats.phash[None, group])[0],
            hamming(m.stats.phash[group[:1], None], m.stats.phash_mirror[None, group])[0],
        )
        figs = {"max_hash_bits": int(bits.max()), "min_cosine": None}
        if embed is not None:
            figs["min_cosine"] = round(float((embed[group] @ embed[group[0]]).min()), 4)
        out.append(([int(m.ok[g]) for g in group], figs))
    return out


def _label_issue_entries(
    m: _Measured,
    components: np.ndarray | None,
    samples: list[Sample],
    class_names: list[str],
    make: _Entries,
    options: AuditOptions,
    progress: bool,
) -> tuple[list[dict], float | None]:
    """Confident-learning label issues from the k-fold probe, and the probe's out-of-fold accuracy."""
    y = np.array([samples[i].label for i in m.ok], np.int64)
    if components is None or len(y) < 2 * len(class_names) or len(set(y.tolist())) < 2:
        return [], None
    probs = label_checks.out_of_fold_probs(probe_inputs(components), y, len(class_names), options.folds, options.seed, progress)
    accuracy = float((probs.argmax(axis=1) == y).mean())
    out = []
    for rank, j in enumerate(label_checks.find_label_issues(y, probs), start=1):
        i, suggested = int(m.ok[j]), int(probs[j].argmax())
        out.append(
            make.entry(
                [i],
                [i],
                given=class_names[y[j]],
                suggested=class_names[suggested],
                self_confidence=round(float(probs[j, y[j]]), 4),
                suggested_probability=round(float(probs[j, suggested]), 4),
                rank=rank,
            )
        )
    return out, accuracy


def _outlier_entries(
    m: _Measured, neighbours: nb.Neighbours, samples: list[Sample], class_names: list[str], make: _Entries, options: AuditOptions
) -> list[dict]:
    if neighbours.knn_similarity is None or len(m.ok) < 20:  # too few images for a typical neighbourhood
        return []
    idx, z = nb.outlier_scores(neighbours.knn_similarity, options.outlier_z)
    return [
        make.entry(
            [int(m.ok[j])],
            neighbour_similarity=round(float(neighbours.knn_similarity[j]), 4),
            z=round(float(z[j]), 2),
            nearest_class=class_names[samples[int(m.ok[neighbours.nearest[j]])].label],
        )
        for j in idx
    ]


def class_counts(index: DatasetIndex) -> tuple[dict[str, dict[str, int]], float | None]:
    """({class: {split: n, "total": n}}, largest class total / smallest; None when a class is empty)."""
    counts = {name: {split: 0 for split in index.splits} for name in index.class_names}
    for split, rows in index.splits.items():
        for y, n in Counter(y for _, y in rows).items():
            counts[index.class_names[y]][split] = n
    for c in counts.values():
        c["total"] = sum(c.values())
    totals = [c["total"] for c in counts.values()]
    return counts, (round(max(totals) / min(totals), 3) if totals and min(totals) > 0 else None)


def _single(
    found: dict[str, list[tuple[int, dict]]],
    kinds: tuple[str, ...],
    make: _Entries,
    map_index: Callable[[int], int],
    exclude: tuple[str, ...] = (),
) -> dict[str, list[dict]]:
    out = {}
    for kind in kinds:
        out[kind] = [make.entry([map_index(i)], [map_index(i)] if kind in exclude else [], **figs) for i, figs in found.get(kind, [])]
    return out


def run_audit(
    data: str | os.PathLike, options: AuditOptions | None = None, progress: bool = True, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Audit the data set at `data` (any layout `imgcls train` reads); returns the report document (module docstring)."""
    from tqdm.auto import tqdm

    options = options or AuditOptions()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    index = index_dataset(data, allow_outside_root=options.allow_outside_root, task="auto")
    if index.multilabel:
        raise ValueError(
            f"{data}: a multi-label manifest (several labels per image); imgcls audit checks single-label data "
            "(one class per image: folders, or a manifest with a 'label' column) and does not audit multi-label sets yet"
        )
    samples = list_samples(index)
    root = Path(os.path.abspath(index.root.parent if index.root.is_file() else index.root))
    make = _Entries(samples, index.class_names, root)
    log(index.summary())
    bar = tqdm(samples, desc="read headers", unit="file", disable=None if progress else True, leave=False)
    headers: list[Header] = [read_header(s.path) for s in bar]
    timings["headers_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    short_sides = sorted(min(h.width, h.height) for h in headers if not h.error and h.width > 0)
    median_short_side = short_sides[len(short_sides) // 2] if short_sides else 0
    extractor = _extractor(options, median_short_side)
    m = _measure(samples, extractor, options, progress, median_short_side)
    if m.copy_check is not None and not m.copy_check.features_find_copies:
        c = m.copy_check
        log(
            f"near-duplicates by hash only: resized copies of {c.sampled} images stood out from every other image in feature space "
            f"for {c.found_share:.0%} of them (median cosine {c.median_cosine:.2f}); these features do not tell copies from look-alikes"
        )
    timings["decode_features_s"] = time.perf_counter() - t

    t = time.perf_counter()
    components = principal_components(m.features) if m.features is not None and len(m.ok) > 1 else None
    embed = embedding(components) if components is not None else None
    comparable = m.stats.std >= CONSTANT_STD  # near-constant images have no content to compare
    neighbours = nb.search(
        m.stats.phash,
        m.stats.thumb,
        embed,
        options.duplicates,
        progress=progress,
        comparable=comparable,
        phash_mirror=m.stats.phash_mirror,
        feature_rules=m.copy_check is None or m.copy_check.features_find_copies,
    )
    timings["compare_s"] = time.perf_counter() - t

    findings: dict[str, list[dict]] = {"unreadable": [make.entry([i], [i], reason=r) for i, r in sorted(m.failures.items())]}
    findings["unreadable"] += [
        {"paths": [Path(os.path.relpath(os.path.abspath(p), root)).as_posix()], "labels": [""], "splits": [""], "reason": r, "exclude": []}
        for p, r in unsupported_files(index)
    ]
    exact = [([int(m.ok[g]) for g in grp], {"sha1": m.hashes[grp[0]]}) for grp in nb.exact_groups(m.hashes)]
    findings["exact_duplicates"] = _duplicate_entries(exact, samples, make)
    findings["near_duplicates"] = _duplicate_entries(_near_duplicate_groups(m, neighbours, embed), samples, make)

    t = time.perf_counter()
    findings["label_issues"], probe_accuracy = _label_issue_entries(m, components, samples, index.class_names, make, options, progress)
    timings["label_probe_s"] = time.perf_counter() - t
    findings["outliers"] = _outlier_entries(m, neighbours, samples, index.class_names, make, options)
    findings.update(_single(header_findings(headers), ("tiny", "extreme_aspect", "unusual_mode"), make, lambda i: i))
    pixel_found, typical = pixel_findings(m.stats, np.array([samples[int(i)].label for i in m.ok], np.int64))
    pixel_kinds = ("dark", "bright", "near_constant", "blurry")
    findings.update(_single(pixel_found, pixel_kinds, make, lambda j: int(m.ok[j]), exclude=("near_constant",)))
    timings["total_s"] = time.perf_counter() - t0

    counts, ratio = class_counts(index)
    return {
        "version": REPORT_VERSION,
        "data": str(data),
        "root": str(root),
        "layout": index.layout,
        "class_names": index.class_names,
        "splits": {k: len(v) for k, v in index.splits.items()},
        "num_images": len(samples),
        "ignored": dict(index.ignored),
        "class_counts": counts,
        "imbalance_ratio": ratio,
        "probe_accuracy": probe_accuracy,
        "settings": {
            **_settings(options, extractor),
            "median_short_side": median_short_side,
            "copy_check": m.copy_check.to_dict() if m.copy_check else None,
        },
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "findings": {kind: findings.get(kind, []) for kind in FINDING_KINDS},
        "typical": {kind: {index.class_names[c]: n for c, n in per_class.items()} for kind, per_class in typical.items()},
    }


def _settings(options: AuditOptions, extractor: FeatureExtractor | None) -> dict[str, Any]:
    from imgcls.audit import pixels, scan

    return {
        "features": extractor.name if extractor else NO_FEATURES,
        "feature_spec": extractor.spec.to_dict() if extractor else None,
        "feature_size": extractor.spec.img_size if extractor else None,
        "feature_size_chosen": "auto (median short side)" if options.feature_size is None else "given",
        "folds": options.folds,
        "seed": options.seed,
        "duplicates": asdict(options.duplicates),
        "outlier_z": options.outlier_z,
        "dark_mean": pixels.DARK_MEAN,
        "bright_mean": pixels.BRIGHT_MEAN,
        "dark_relative": pixels.DARK_RELATIVE,
        "constant_std": pixels.CONSTANT_STD,
        "constant_relative": pixels.CONSTANT_RELATIVE,
        "blur_relative": pixels.BLUR_RELATIVE,
        "tiny_absolute": scan.TINY_ABSOLUTE,
        "tiny_relative": scan.TINY_RELATIVE,
        "extreme_aspect": scan.EXTREME_ASPECT,
    }
