"""Duplicates and outliers: which images are (nearly) the same, and which are like no other.

Exact duplicates share the file's SHA-1. Near-duplicates (a resized, re-encoded or slightly
cropped copy) are found by comparing every image with every other, in blocks of rows, on two
signals: the 64-bit perceptual hash (bits that differ) and, when features were computed, the
cosine similarity of the PCA-reduced, centred features. The same pass keeps each image's k
most similar neighbours for the outlier score. 60,000 images are 1.8e9 pairs: about 10 s for the
hashes (numpy popcount) and as much for a 128-dimensional matrix product on 2 cores.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from imgcls.audit.pixels import hamming, mirror_signatures

SPLIT_KEEP_ORDER = ("test", "val", "all", "train")  # which copy of a duplicate to keep: the evaluation one


@dataclass(frozen=True)
class DuplicateRule:
    """When two images count as near-duplicates: any of

    1. at most `max_bits` of the 64 pHash bits differ (imagehash's usual cut for "the same picture"
       is about 5-10), the grey 16 px signatures correlate at least `min_signature_corr` (the
       hash alone matches plain or simple images too easily: a sky and a sky, two digits "1"), and
       the pair stands out from the image's neighbourhood: 1 - correlation at most `neighbour_ratio`
       x (1 - its `k`-th highest signature correlation), or the correlation is at least
       `identical_corr`. This is Lowe's ratio test (2004), calibrated by the data itself: in a
       dense cluster of look-alikes (MNIST's 7,877 "1"s, one stroke each) a copy cannot be told
       from a neighbour, while in a sparse one it is far closer than anything else. Measured on
       2,000 MNIST images against 30,000 others with 200 resized + re-encoded copies planted:
       6,431 candidate pairs from the hash and correlation alone (the 4,783 false groups of
       the full set), 2 left at ratio 0.2 and 19 at 0.3, while 194 and 198 of the 200 copies stayed
       (those lost were "1"s); on CIFAR-10 the copies' ratio was at most 0.014;
    2. with features: at most `max_bits_with_features` bits differ and the cosine is at least
       `min_cosine_with_hash`;
    3. with features: the cosine is at least `min_cosine` and at most `max_bits_cosine` bits differ
       (a pair of unrelated pictures differs in about 32 +- 4 bits).
    Rules 2 and 3 also take the ratio test of rule 1, on the features: 1 - cosine at most
    `feature_neighbour_ratio` x (1 - the cosine of the image's k-th most similar image), or a cosine
    of at least `identical_cosine`. Without it, the full MNIST audit grouped 45,561 of 70,000
    digits into 9,113 "near-duplicate" groups (look-alike strokes: cosine >= 0.92, few bits apart).

    Hash distances are the smaller of the distance to the other image and to its mirror image
    (pHash is not mirror-invariant: a mirrored copy differs in about 32 bits), and correlations the
    larger of the two, so mirrored copies are found by every rule.

    Measured with efficientnet_lite0 at 128 px. On 326 Oxford flower photos with 10 resized +
    re-encoded copies and 10 centre crops (5 % off each side) planted: copies had cosine 0.99-1.0
    and 0-4 bits, crops cosine 0.88-0.99 and 4-18 bits; among the originals, the pairs above
    cosine 0.92 were the same flower shot twice (0.92-0.95, 20-34 bits) or identical files, while
    different flowers of one class reached 0.90 (30 bits). All 20 planted copies were found, and
    no pair of different pictures. On 1,000 CIFAR-10 images (32 px, upscaled) no two originals
    reached cosine 0.92, but a copy resized to 26 px and re-encoded kept its hash (0-2 bits) while
    its cosine fell to 0.66-0.96: rule 1 is what finds those. On the 27,000 EuroSAT tiles, the
    cosine alone grouped different tiles of one texture (dense housing, forest, shrubland: cosine
    0.91-0.93, 34-40 bits apart, groups of up to 17, looked at one by one), hence the bit bound on rule 3.
    """

    max_bits: int = 6
    min_signature_corr: float = 0.95
    neighbour_ratio: float = 0.25
    identical_corr: float = 0.999
    max_bits_with_features: int = 12
    min_cosine_with_hash: float = 0.85
    min_cosine: float = 0.92
    max_bits_cosine: int = 26
    feature_neighbour_ratio: float = 0.5
    identical_cosine: float = 0.995


class StarGroups:
    """Groups of near-duplicates, each a leader and the images that match the leader itself.

    Rows are visited in index order: an image not yet in a group leads one, taking every later
    image that matches it and is in no group. Matches are not followed further, so a group never
    chains a-b-c-...: a transitive closure (union-find) joined 4,489 EuroSAT tiles of water and
    forest into one "group" whose members had cosine 0.22 to each other.
    """

    def __init__(self, n: int) -> None:
        self.leader = np.full(n, -1, np.int64)

    def claim(self, i: int, matches: np.ndarray) -> None:
        """Row i and its matches (indices > i): i leads the free matches unless i is in a group already."""
        if self.leader[i] >= 0 or len(matches) == 0:
            return
        free = matches[self.leader[matches] < 0]
        if len(free):
            self.leader[i] = i
            self.leader[free] = i

    def groups(self) -> list[list[int]]:
        members: dict[int, list[int]] = defaultdict(list)
        for i in np.flatnonzero(self.leader >= 0).tolist():
            members[int(self.leader[i])].append(i)
        return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])


@dataclass
class Neighbours:
    """Groups of near-duplicates and, with features, each image's neighbourhood."""

    groups: list[list[int]]  # each a leader and the images that match it (StarGroups), sorted
    knn_similarity: np.ndarray | None  # (N,) mean cosine to the k most similar other images
    nearest: np.ndarray | None  # (N,) index of the most similar other image


def search(
    phash: np.ndarray,
    signature: np.ndarray,
    embed: np.ndarray | None,
    rule: DuplicateRule,
    k: int = 10,
    block: int = 1024,
    progress: bool = False,
    comparable: np.ndarray | None = None,
    phash_mirror: np.ndarray | None = None,
    feature_rules: bool = True,
) -> Neighbours:
    """Compare every image with every other (see the module docstring); blocks of `block` rows.

    Pairs are grouped as they are found (a pair list could hold n^2 entries when thousands of
    blank images all match each other). comparable: (N,) bool, the images that may be near-
    duplicates; near-constant images are left out (a blank tile has no content to compare, and
    every tile of calm water or dense forest "matches" every other). phash_mirror: the hashes of the
    mirrored images (pixels.PixelStats.phash_mirror), to find mirrored copies too.
    """
    import torch
    from tqdm.auto import tqdm

    n = len(phash)
    mirrored = mirror_signatures(signature) if phash_mirror is not None else None
    sets = StarGroups(n)
    k = max(1, min(k, n - 1))
    knn = np.zeros(n, np.float32) if embed is not None and n > 1 else None
    nearest = np.zeros(n, np.int64) if knn is not None else None
    e = torch.from_numpy(embed) if knn is not None else None
    bar = tqdm(total=n, desc="compare pairs", unit="img", disable=None if progress else True, leave=False)
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        bits = hamming(phash[rows, None], phash[None, :])  # (b, N) uint8
        if phash_mirror is not None:
            bits = np.minimum(bits, hamming(phash[rows, None], phash_mirror[None, :]))
        close = _hash_matches(bits, rows, signature, mirrored, rule, k)
        if e is not None:
            sim = e[rows] @ e.T  # (b, N) cosine
            sim[torch.arange(sim.shape[0]), torch.arange(rows.start, rows.stop)] = -2.0  # not its own neighbour
            top = sim.topk(k, dim=1)
            knn[rows] = top.values.mean(dim=1).numpy()
            nearest[rows] = top.indices[:, 0].numpy()
        if e is not None and feature_rules:
            cos = sim.numpy()
            by_features = ((bits <= rule.max_bits_with_features) & (cos >= rule.min_cosine_with_hash)) | (
                (bits <= rule.max_bits_cosine) & (cos >= rule.min_cosine)
            )
            # Lowe's ratio test in feature space too: a pair must stand out from the row's k-th neighbour
            kth_gap = np.maximum(1.0 - top.values[:, -1].numpy(), 0.0)[:, None]  # (b, 1)
            by_features &= ((1.0 - cos) <= rule.feature_neighbour_ratio * kth_gap) | (cos >= rule.identical_cosine)
            close |= by_features
        if comparable is not None:
            close &= comparable[rows, None] & comparable[None, :]
        for r in range(close.shape[0]):
            i = start + r
            later = np.flatnonzero(close[r, i + 1 :]) + i + 1
            sets.claim(i, later)
        bar.update(rows.stop - rows.start)
    bar.close()
    return Neighbours(sets.groups(), knn, nearest)


def _hash_matches(
    bits: np.ndarray, rows: slice, signature: np.ndarray, mirrored: np.ndarray | None, rule: DuplicateRule, k: int
) -> np.ndarray:
    """Rule 1 of DuplicateRule for a block of rows: (b, N) bool."""
    import torch

    close = bits <= rule.max_bits
    ci, cj = np.nonzero(close)
    if len(ci) == 0:
        return close
    corr = np.einsum("nd,nd->n", signature[ci + rows.start], signature[cj])  # only the hash matches are checked
    if mirrored is not None:
        corr = np.maximum(corr, np.einsum("nd,nd->n", signature[ci + rows.start], mirrored[cj]))
    # The k-th highest correlation of each row with a candidate (its own 1.0 is the first of k + 1).
    need = np.unique(ci)
    sims = torch.from_numpy(signature[need + rows.start]) @ torch.from_numpy(signature).T  # (m, N)
    kth = np.zeros(close.shape[0], np.float32)
    kth[need] = sims.topk(min(k + 1, sims.shape[1]), dim=1).values[:, -1].numpy()
    stands_out = (1.0 - corr) <= rule.neighbour_ratio * np.maximum(1.0 - kth[ci], 0.0)
    keep = (corr >= rule.min_signature_corr) & (stands_out | (corr >= rule.identical_corr))
    close[ci[~keep], cj[~keep]] = False
    return close


def exact_groups(hashes: list[str]) -> list[list[int]]:
    """Indices sharing a content hash, groups of two or more ("" hashes are skipped)."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        if h:
            by_hash[h].append(i)
    return sorted((m for m in by_hash.values() if len(m) > 1), key=lambda m: m[0])


def relation(labels: list[int], splits: list[str]) -> dict:
    """How a duplicate group's members relate: the most serious relation and both flags.

    across_classes: the same picture carries two labels (at most one can be right);
    across_splits: a picture is both trained on and evaluated on (leakage);
    within_class: copies with one label in one split (they only weigh that picture more).
    """
    across_classes, across_splits = len(set(labels)) > 1, len(set(splits)) > 1
    worst = "across_classes" if across_classes else "across_splits" if across_splits else "within_class"
    return {"relation": worst, "across_classes": across_classes, "across_splits": across_splits}


def copies_to_drop(members: list[int], labels: list[int], splits: list[str]) -> list[int]:
    """Which members of a duplicate group training should leave out.

    Conflicting labels: all of them (no way to know which label is right). Otherwise one copy
    is kept, the one in the evaluation split if there is one (test, then val), so the test set
    stays as it was and only training copies are dropped.
    """
    if len(set(labels)) > 1:
        return list(members)
    keep = min(range(len(members)), key=lambda t: (SPLIT_KEEP_ORDER.index(splits[t]) if splits[t] in SPLIT_KEEP_ORDER else 9, members[t]))
    return [m for t, m in enumerate(members) if t != keep]


def outlier_scores(knn_similarity: np.ndarray, z_threshold: float = 4.0, max_fraction: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(indices of outliers, most isolated first; robust z-scores of every image).

    z = (median - s) / (1.4826 MAD) of the neighbourhood similarity s: how many robust standard
    deviations an image sits further from its nearest neighbours than a typical image. Images with
    z above `z_threshold` are outliers, at most `max_fraction` of the data set (the most isolated).
    """
    s = knn_similarity.astype(np.float64)
    med = np.median(s)
    mad = 1.4826 * np.median(np.abs(s - med))
    z = (med - s) / max(mad, 1e-6)
    idx = np.flatnonzero(z > z_threshold)
    idx = idx[np.argsort(-z[idx], kind="stable")][: max(1, int(max_fraction * len(s)))] if len(idx) else idx
    return idx, z
