"""Likely label errors: out-of-fold probabilities of a linear probe, then confident learning.

The probe is softmax regression on the (PCA-reduced, standardised) features, fitted k times,
each time on all folds but one, so every image is scored by a probe that never saw its label.

Confident learning (Northcutt, Jiang and Chuang, JAIR 2021) then decides which labels to
doubt, as cleanlab's `filter.find_label_issues(labels, pred_probs)` does with its defaults
(filter_by="prune_by_noise_rate", ranked by self-confidence), written out here in numpy:

1. per-class threshold t_j = the mean probability of class j over the images labelled j;
2. confident joint C[i][j]: images labelled i whose probability of some class reaches that
   class's threshold, counted under j (the most probable such class when several reach it);
   the diagonal is at least 1, then each row is rescaled to the number of images labelled i
   and rounded with the row totals kept;
3. for each labelled class i and each other class j, the C[i][j] images labelled i with the
   largest margin p_j - p_i are flagged ("prune by noise rate");
4. an image whose most probable class is its label is never flagged;
5. flagged images are ranked by self-confidence p_label, lowest first; the suggested label is
   the most probable class.
cleanlab itself is not a dependency: it would bring pandas and more for these forty lines.
"""

from __future__ import annotations

import numpy as np

from imgcls.audit.features import one_thread

DEFAULT_FOLDS = 5
SMALL_PROBLEM = 20_000_000  # images x dimensions x classes below which the probe runs on one thread


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold number (0..folds-1) of each image; each class is dealt out over the folds in turn."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(labels), np.int64)
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        out[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)  # the next class starts where this one ended, so folds stay even in size
    return out


def fit_softmax(
    x: np.ndarray, y: np.ndarray, num_classes: int, l2: float | None = None, max_iter: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: F821
    """Multinomial logistic regression by full-batch L-BFGS: (W (D, K), b (K,)).

    l2 None: 1 / n, the mean-loss form of scikit-learn's default LogisticRegression(C=1).
    """
    import torch
    import torch.nn.functional as F

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # (n, D)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    lam = 1.0 / max(1, len(yt)) if l2 is None else l2
    w = torch.zeros(xt.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, yt) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def out_of_fold_probs(
    x: np.ndarray, labels: np.ndarray, num_classes: int, folds: int = DEFAULT_FOLDS, seed: int = 0, progress: bool = False
) -> np.ndarray:
    """(N, K) class probabilities, each row from a probe fitted without that image's fold."""

    labels = np.asarray(labels)
    if x.shape[0] * x.shape[1] * num_classes < SMALL_PROBLEM:  # small products: one thread (see one_thread)
        with one_thread():
            return _out_of_fold_probs(x, labels, num_classes, folds, seed, progress)
    return _out_of_fold_probs(x, labels, num_classes, folds, seed, progress)


def _out_of_fold_probs(x: np.ndarray, labels: np.ndarray, num_classes: int, folds: int, seed: int, progress: bool) -> np.ndarray:
    import torch
    from tqdm.auto import tqdm

    folds = max(2, min(folds, len(labels)))
    fold = stratified_folds(labels, folds, seed)
    probs = np.zeros((len(labels), num_classes), np.float32)
    for f in tqdm(range(folds), desc="label probe", unit="fold", disable=None if progress else True, leave=False):
        test, train = fold == f, fold != f
        if not test.any() or not train.any():
            continue
        w, b = fit_softmax(x[train], labels[train], num_classes)
        logits = torch.from_numpy(np.ascontiguousarray(x[test], dtype=np.float32)) @ w + b  # (n_test, K)
        probs[test] = torch.softmax(logits, dim=1).numpy()
    return probs


def round_keeping_row_totals(m: np.ndarray) -> np.ndarray:
    """Round each row to integers that keep the row's (rounded) sum: round every entry, then move
    the entries that rounding moved furthest by one until the sum is right (cleanlab's rule)."""
    out = np.zeros(m.shape, np.int64)
    for r, row in enumerate(np.asarray(m, np.float64)):
        ints = np.round(row)
        total = np.round(row.sum())
        while ints.sum() != total:
            step = 1.0 if ints.sum() < total else -1.0
            changes = min(int(abs(total - ints.sum())), len(row))
            ints[np.argsort(row - ints)[:: -int(step)][:changes]] += step
        out[r] = ints
    return out


def confident_joint(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Calibrated confident joint (K, K), rows = given label, columns = likely true label (steps 1-2)."""
    k = probs.shape[1]
    counts = np.bincount(labels, minlength=k)
    thresholds = np.array([probs[labels == c, c].mean() if counts[c] else 1.0 for c in range(k)])
    confident = probs >= thresholds - 1e-6  # (N, K)
    n_conf = confident.sum(axis=1)
    guess = np.where(n_conf > 1, probs.argmax(axis=1), confident.argmax(axis=1))
    some = n_conf > 0
    joint = np.zeros((k, k), np.float64)
    np.add.at(joint, (labels[some], guess[some]), 1.0)
    joint[np.arange(k), np.arange(k)] = np.maximum(joint.diagonal(), 1.0)
    joint = joint / joint.sum(axis=1, keepdims=True) * counts[:, None]  # each row sums to its label count
    return round_keeping_row_totals(joint)


def _keep_one_per_class(joint: np.ndarray) -> np.ndarray:
    """Raise the diagonal to at least 1, taking the difference evenly from the row's non-zero
    off-diagonal counts (cleanlab's min_examples_per_class=1); rows keep their totals."""
    m = joint.astype(np.float64)
    diag = m.diagonal().copy()
    raised = np.maximum(diag, 1.0)
    nonzero_off = np.maximum(np.count_nonzero(m, axis=1) - 1.0, 1.0)
    m = np.clip(m - ((raised - diag) / nonzero_off)[:, None], 0.0, None)
    m[np.arange(len(m)), np.arange(len(m))] = raised
    return np.floor(m).astype(np.int64)  # cleanlab truncates here too (a no-op when no diagonal was 0)


def find_label_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Indices of likely label errors, the least self-confident first (steps 1-5 above)."""
    labels = np.asarray(labels, np.int64)
    joint = _keep_one_per_class(confident_joint(labels, probs))
    k = probs.shape[1]
    flagged = np.zeros(len(labels), bool)
    for given in range(k):
        members = np.flatnonzero(labels == given)
        if len(members) <= 1:
            continue
        for true in range(k):
            n_prune = int(joint[given, true])
            if true == given or n_prune <= 0:
                continue
            margin = probs[members, true] - probs[members, given]
            flagged[members[np.argsort(-margin, kind="stable")[:n_prune]]] = True
    flagged &= probs.argmax(axis=1) != labels
    idx = np.flatnonzero(flagged)
    return idx[np.argsort(probs[idx, labels[idx]], kind="stable")]
