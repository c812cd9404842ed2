"""Whether the labels of a data set depend on which way up its images are (`turn_test`).

Satellite tiles, microscopy, textures and top-down scans have no upright: a tile turned by a
quarter is still the same class, so training on random quarter turns (`AugmentSpec.rotate`) and
averaging the eight symmetric views at test time (TTA "dihedral") teaches the network what the data
already allow (EuroSAT, small_cnn in 7 minutes: 97.8-98.1 % test without, 98.3 % with, bench/RESULTS.md).
Photos, digits and signs have an upright (a 6 turned is a 9), and there the turns would cost.

`--model auto` decides from the pretrained linear probe it trains anyway as a candidate: the probe
predicts a sample of the validation images as they are and turned by 90, 180 and 270 degrees.
ImageNet features are not invariant to turns, but a probe fitted on upright photos loses much of
its accuracy on turned ones, while on data without an upright the turned views keep it (the
figures of each data set are in bench/RESULTS.md). The data count as having no upright when the
turned views' error is at most TURN_ERROR_RATIO times the upright error plus TURN_ERROR_SLACK.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.data import DatasetIndex
from imgcls.io import ImageDecodeError

TURN_SAMPLE = 2000  # validation images the test predicts, 4 views each (EuroSAT: 6.5 s per 1,000 at 96 px)
TURN_ERROR_RATIO, TURN_ERROR_SLACK = 1.5, 0.01  # see the module docstring


@dataclass(frozen=True)
class TurnTest:
    """The probe's accuracy on a sample of validation images as they are and turned, and the verdict."""

    images: int
    upright_acc: float
    turned_acc: float  # mean over the turns by 90, 180 and 270 degrees

    @property
    def no_upright(self) -> bool:
        allowed = TURN_ERROR_RATIO * (1 - self.upright_acc) + TURN_ERROR_SLACK
        return self.images > 0 and 1 - self.turned_acc <= allowed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "no_upright": self.no_upright}

    def describe(self) -> str:
        verdict = "no upright: quarter turns added to training (--rotate)" if self.no_upright else "an upright: no turns"
        return f"turned {self.turned_acc:.3f} against upright {self.upright_acc:.3f} on {self.images} images -> {verdict}"


def validation_rows(model_dir: Path, index: DatasetIndex) -> list[tuple[str, int]]:
    """The (path, label) rows of the validation split that the run in `model_dir` recorded in split.json."""
    split = json.loads((model_dir / "split.json").read_text(encoding="utf-8")).get("val", [])
    root = index.root.parent if index.layout == "csv" else index.root
    labels = {os.path.normpath(p): y for name, rows in index.splits.items() if name != "test" for p, y in rows}
    rows = []
    for rel in split:
        path = os.path.normpath(root / rel)
        if path in labels:
            rows.append((path, labels[path]))
    return rows


def turn_test(model_dir: Path, rows: list[tuple[str, int]], sample: int = TURN_SAMPLE, seed: int = 0) -> TurnTest:
    """Predict up to `sample` of `rows` (a seeded random subset) with the model in `model_dir`, as
    they are and turned by 90, 180 and 270 degrees, without TTA; the accuracies."""
    from imgcls.predict import Classifier

    clf = Classifier.load(model_dir, tta="none", compile="off")
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(rows))[:sample]
    arrays, labels = [], []
    for i in picks:
        path, y = rows[int(i)]
        try:
            arrays.append(clf.prepare(path))
        except (ImageDecodeError, OSError):
            continue  # training reported it
        labels.append(y)
    if not arrays:
        return TurnTest(0, float("nan"), float("nan"))
    x, y = np.stack(arrays), np.asarray(labels)
    accs = [float((clf.predict_arrays(np.ascontiguousarray(np.rot90(x, k, axes=(1, 2)))).argmax(1) == y).mean()) for k in range(4)]
    return TurnTest(len(y), accs[0], float(np.mean(accs[1:])))
