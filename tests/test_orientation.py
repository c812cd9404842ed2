"""The turn test of --model auto (imgcls.training.orientation): a model's accuracy on validation
images turned by quarter turns tells data without an upright (the class is the colour) from data
with one (the class is where a bar is: at the top or at the bottom)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgcls.config import AugmentSpec, DataConfig, ModelConfig, RunConfig, TrainConfig
from imgcls.data import index_dataset
from imgcls.training.fit import fit
from imgcls.training.orientation import TurnTest, turn_test, validation_rows


def write_set(root, kind: str, per_class: int = 24, size: int = 16, seed: int = 0):
    """kind "colour": red or blue noise (no upright); "bar": a bright bar at the top or the bottom."""
    rng = np.random.default_rng(seed)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(60, 120, (size, size, 3)).astype(np.uint8)
            if kind == "colour":
                arr[..., 0 if label == "a" else 2] += 120
            else:
                rows = slice(1, 5) if label == "a" else slice(size - 5, size - 1)
                arr[rows, 2 : size - 2] = 250
            Image.fromarray(arr).save(root / label / f"{i}.png")
    return root


def train(data, out):
    cfg = RunConfig(
        data=DataConfig(path=str(data), img_size=16, val_fraction=0.25, seed=0),
        model=ModelConfig(name="small_cnn"),
        train=TrainConfig(out=str(out), epochs=8, batch_size=16, precision="fp32", augment=AugmentSpec(hflip=False, crop="none")),
    )
    return fit(cfg, progress=False, log=lambda s: None)


@pytest.mark.parametrize(("kind", "no_upright"), [("colour", True), ("bar", False)])
def test_turn_test_tells_data_without_an_upright(tmp_path, kind, no_upright):
    data = write_set(tmp_path / "d", kind)
    run = train(data, tmp_path / "run")
    rows = validation_rows(run, index_dataset(data))
    assert len(rows) == 12 and all(y in (0, 1) for _, y in rows)
    res = turn_test(run, rows)
    assert res.images == 12 and res.upright_acc >= 0.9
    assert res.no_upright is no_upright, res
    if kind == "bar":
        assert res.turned_acc <= 0.75  # turned by 180 degrees the bar is on the other side: the other class


def test_turn_verdict_rule():
    assert TurnTest(1000, 0.94, 0.92).no_upright  # EuroSAT-like: the turned error within 1.5x + 1 point
    assert not TurnTest(1000, 0.97, 0.80).no_upright  # photos turned on their side
    assert not TurnTest(0, float("nan"), float("nan")).no_upright
    d = TurnTest(10, 1.0, 1.0).to_dict()
    assert d == {"images": 10, "upright_acc": 1.0, "turned_acc": 1.0, "no_upright": True}
