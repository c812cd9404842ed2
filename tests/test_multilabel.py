"""Multi-label classification: manifests in both forms, the iterative stratified split, thresholds,
temperatures and metrics against hand-computed values, and small_cnn / EfficientNet-Lite0 trained
and evaluated end to end on generated images whose labels are independent shapes."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from imgcls.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from imgcls.data import DatasetError, index_dataset, load_split
from imgcls.evaluate import evaluate
from imgcls.models import get_entry
from imgcls.multilabel import (
    DEFAULT_THRESHOLD,
    MAX_POS_WEIGHT,
    SUMMARY_KEYS,
    choose_thresholds,
    fit_label_temperatures,
    iterative_stratified_split,
    multilabel_metrics,
    pos_weights,
    sigmoid_probs,
    split_label_cell,
)
from imgcls.training.fit import fit
from imgcls.training.multilabel import MultiLabelLoss

SHAPES = ("square", "circle", "bar")


def quiet(_: str) -> None:
    """fit()'s log callback, silenced."""


def draw_multilabel(root: pathlib.Path, n: int, seed: int, size: int = 32, p: float = 0.4) -> pathlib.Path:
    """n images at `size` px with independent labels: a red square, a blue circle and a green bar,
    each present with probability p at a random place on noisy grey; root/data.csv lists them as
    path,labels ("square;bar", "" for none)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    r = size // 6
    rows = []
    for i in range(n):
        arr = np.clip(rng.integers(90, 140) + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        d = ImageDraw.Draw(img)
        present = rng.random(3) < p
        if present[0]:
            x, y = rng.integers(0, size - 2 * r, 2)
            d.rectangle((x, y, x + 2 * r, y + 2 * r), fill=(220, 30, 30))
        if present[1]:
            x, y = rng.integers(0, size - 2 * r, 2)
            d.ellipse((x, y, x + 2 * r, y + 2 * r), fill=(30, 60, 230))
        if present[2]:
            x, y = rng.integers(0, size - 3 * r, 2)
            d.rectangle((x, y, x + 3 * r, y + r // 2 + 1), fill=(30, 200, 40))
        img.save(root / f"{i}.png")
        rows.append(f"{i}.png," + ";".join(s for s, on in zip(SHAPES, present) if on))
    (root / "data.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    return root / "data.csv"


def tiny_images(root: pathlib.Path, n: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / f"{i}.png")


# ----------------------------------------------------------------------------- manifests


def test_split_label_cell() -> None:
    assert split_label_cell(" sea ; sunset;;sea ") == ["sea", "sunset"]
    assert split_label_cell("") == []
    assert split_label_cell("a|b", "|") == ["a", "b"]


def test_labels_column_form(tmp_path: pathlib.Path) -> None:
    tiny_images(tmp_path, 4)
    (tmp_path / "m.csv").write_text("path,labels,split\n0.png,sea;sunset,train\n1.png,,train\n2.png,sea,val\n3.png,desert,val\n")
    index = index_dataset(tmp_path / "m.csv", task="auto")
    assert index.multilabel and index.class_names == ["desert", "sea", "sunset"]
    assert {k: len(v) for k, v in index.splits.items()} == {"train": 2, "val": 2}
    spec = get_entry("small_cnn").default_spec
    _, y = load_split(index.splits["train"], spec, None, 1, 10**8, False, "t", index.targets)
    np.testing.assert_array_equal(y, [[0, 1, 1], [0, 0, 0]])  # the image without labels is kept: "none of them"
    assert y.dtype == np.float32
    _, y = load_split(index.splits["val"], spec, None, 1, 10**8, False, "v", index.targets)
    np.testing.assert_array_equal(y, [[0, 1, 0], [1, 0, 0]])


def test_columns_form_and_separator(tmp_path: pathlib.Path) -> None:
    tiny_images(tmp_path, 3)
    (tmp_path / "c.csv").write_text("path,Mountains,desert\n0.png,1,0\n1.png,1,1\n2.png,0,0\n")
    index = index_dataset(tmp_path / "c.csv", task="auto")
    assert index.class_names == ["Mountains", "desert"]  # the header's order and spelling
    np.testing.assert_array_equal(index.targets, [[1, 0], [1, 1], [0, 0]])
    (tmp_path / "p.csv").write_text("path,labels\n0.png,a|b\n1.png,b\n")
    assert index_dataset(tmp_path / "p.csv", task="auto", label_sep="|").targets.tolist() == [[1, 1], [0, 1]]
    # task multi-label reads a single-label `label` column as one-label lists
    (tmp_path / "s.csv").write_text("path,label\n0.png,a\n1.png,b\n")
    assert not index_dataset(tmp_path / "s.csv", task="auto").multilabel
    assert index_dataset(tmp_path / "s.csv", task="multi-label").targets.tolist() == [[1, 0], [0, 1]]
    with pytest.raises(DatasetError, match="'path' and 'label'"):
        index_dataset(tmp_path / "c.csv")  # the default task stays single-label for callers that know no other


def test_manifest_errors_name_file_and_line(tmp_path: pathlib.Path) -> None:
    tiny_images(tmp_path, 3)
    (tmp_path / "bad01.csv").write_text("path,sea,sky\n0.png,1,0\n1.png,yes,0\n")
    with pytest.raises(DatasetError, match=r"bad01\.csv:3: column 'sea' must be 0 or 1, found 'yes'"):
        index_dataset(tmp_path / "bad01.csv", task="auto")
    (tmp_path / "m.csv").write_text("path,labels\n0.png,sea\n1.png,sea;moon\n")
    with pytest.raises(DatasetError, match=r"m\.csv:3: label 'moon' is not one of the model's labels"):
        index_dataset(tmp_path / "m.csv", class_names=["sea", "sky"], task="multi-label")
    (tmp_path / "cols.csv").write_text("path,sea,moon\n0.png,1,0\n")
    with pytest.raises(
        DatasetError, match=r"cols\.csv: the label columns must be the model's labels .*not known: \['moon'\].*missing: \['sky'\]"
    ):
        index_dataset(tmp_path / "cols.csv", class_names=["sea", "sky"], task="multi-label")
    (tmp_path / "dup.csv").write_text("path,labels\n0.png,sea\n1.png,sky\n0.png,sky\n")
    with pytest.raises(DatasetError, match="line 4 gives .*0.png the label 'sky', line 2 gave it 'sea'"):
        index_dataset(tmp_path / "dup.csv", task="auto")
    (tmp_path / "split.csv").write_text("path,labels,split\n0.png,sea,train\n1.png,sky,\n")
    with pytest.raises(DatasetError, match=r"split\.csv:3: this row has no split"):
        index_dataset(tmp_path / "split.csv", task="auto")
    with pytest.raises(DatasetError, match="multi-label data is read from a CSV manifest"):
        index_dataset(tmp_path, task="multi-label")


# ----------------------------------------------------------------------------- the split


def test_iterative_split_keeps_every_label_in_both_parts() -> None:
    rng = np.random.default_rng(0)
    prevalence = np.array([0.5, 0.2, 0.05, 0.01, 0.3])
    y = (rng.random((300, 5)) < prevalence).astype(np.uint8)
    y[:2, 3], y[2:, 3] = 1, 0  # a label on exactly 2 images: one each side
    names = [f"l{c}" for c in range(5)]
    train, val = iterative_stratified_split(y, 0.2, seed=0, class_names=names)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 300
    assert (y[train].sum(0) > 0).all() and (y[val].sum(0) > 0).all()
    assert abs(len(val) - 60) <= 3
    share_val, share_all = y[val].mean(0), y.mean(0)
    assert np.all(np.abs(share_val - share_all)[[0, 1, 4]] < 0.03)  # the common labels keep their share
    again = iterative_stratified_split(y, 0.2, seed=0, class_names=names)
    assert all(np.array_equal(a, b) for a, b in zip((train, val), again))  # seeded
    assert not np.array_equal(val, iterative_stratified_split(y, 0.2, seed=1, class_names=names)[1])
    y[:, 3] = 0
    y[5, 3] = 1
    with pytest.raises(ValueError, match="'l3' are on 1 image only"):
        iterative_stratified_split(y, 0.2, seed=0, class_names=names)


# ----------------------------------------------------------------------------- thresholds, temperatures, metrics


def test_sigmoid_probs() -> None:
    p = sigmoid_probs(np.array([[0.0, 1000.0, -1000.0, 2.0]]), [1, 1, 1, 2])
    np.testing.assert_allclose(p, [[0.5, 1.0, 0.0, 1 / (1 + math.exp(-1))]])
    np.testing.assert_allclose(sigmoid_probs(np.zeros((2, 3))), 0.5)


def test_choose_thresholds_hand_computed() -> None:
    p = np.array([0.9, 0.8, 0.6, 0.3, 0.2])
    t = np.array([1, 0, 1, 0, 0])
    # F1 at p >= 0.9: 0.667, >= 0.8: 0.5, >= 0.6: 0.8 (best), >= 0.3: 0.667, >= 0.2: 0.571 -> halfway to 0.3
    probs, targets = np.stack([p, p, p], 1), np.stack([t, t, np.zeros(5)], 1)
    np.testing.assert_allclose(choose_thresholds(probs, targets), [0.45, 0.45, DEFAULT_THRESHOLD])
    # precision 1.0 is reached only at p >= 0.9 (halfway to 0.8); 0.6 first at p >= 0.6 (precision 2/3, full recall)
    np.testing.assert_allclose(choose_thresholds(probs[:, :1], targets[:, :1], precision=1.0), [0.85])
    np.testing.assert_allclose(choose_thresholds(probs[:, :1], targets[:, :1], precision=0.6), [0.45])
    with pytest.raises(ValueError, match="precision"):
        choose_thresholds(probs, targets, precision=1.5)


def test_multilabel_metrics_hand_computed() -> None:
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    probs = np.array([[0.9, 0.2, 0.1], [0.4, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.6, 0.1]])
    m = multilabel_metrics(probs, targets, [0.5, 0.5, 0.5], ["a", "b", "c"])
    assert set(m) >= {*SUMMARY_KEYS, "per_label"}
    # predictions [[1,0,0],[0,1,0],[1,0,0],[0,1,0]]: a is right everywhere; b has 1 TP, 1 FP, 1 FN; c never occurs
    assert m["macro_f1"] == pytest.approx((1.0 + 0.5) / 2)  # over the labels that occur
    assert m["micro_f1"] == pytest.approx(0.75)  # TP 3, FP 1, FN 1
    assert m["hamming_loss"] == pytest.approx(2 / 12)
    assert m["subset_accuracy"] == pytest.approx(0.5)
    assert m["label_cardinality"] == pytest.approx(1.0) and m["label_cardinality_true"] == pytest.approx(1.0)
    # AP of b: ranks .7 (+), .6 (-), .3 (+), .2 (-): 0.5 * 1 + 0.5 * 2/3
    assert m["macro_map"] == pytest.approx((1.0 + 0.5 + 0.5 * 2 / 3) / 2)
    # micro: .9+ .7+ .6+ .6- (tied) .4- .3+ ...: 0.25 + 0.25 + 0.25 * 3/4 + 0.25 * 4/6
    assert m["micro_map"] == pytest.approx(0.25 + 0.25 + 0.25 * 0.75 + 0.25 * 4 / 6)
    b = m["per_label"][1]
    assert b == {"label": "b", "precision": 0.5, "recall": 0.5, "f1": 0.5, "ap": pytest.approx(5 / 6), "support": 2, "threshold": 0.5}
    assert m["per_label"][2]["ap"] is None and m["per_label"][2]["support"] == 0
    json.dumps(m)  # JSON-ready


def test_label_temperatures_and_pos_weights() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (4000, 1))
    t = (rng.random((4000, 1)) < 1 / (1 + np.exp(-z))).astype(float)  # calibrated at T = 1
    sep = np.stack([np.r_[np.full(50, 3.0), np.full(50, -3.0)], np.r_[np.ones(50), np.zeros(50)]], 1)
    temps = fit_label_temperatures(np.c_[3 * z, z], np.c_[t, t])
    assert temps[0] == pytest.approx(3.0, rel=0.15)  # logits 3x too sharp
    assert temps[1] == pytest.approx(1.0, abs=0.15)
    assert fit_label_temperatures(sep[:, :1], sep[:, 1:])[0] == 1.0  # all right: no evidence to sharpen on
    y = np.zeros((100, 3))
    y[:50, 0], y[:20, 1], y[:1, 2] = 1, 1, 1
    np.testing.assert_allclose(pos_weights(y, "auto"), [1.0, 4.0, MAX_POS_WEIGHT])
    assert pos_weights(y, "none") is None


def test_multilabel_loss() -> None:
    logits, y = torch.tensor([[2.0, -1.0], [0.5, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    assert float(MultiLabelLoss()(logits, y)) == pytest.approx(float(per.sum(1).mean()))
    w = torch.tensor([1.0, 3.0])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=w, reduction="none").sum(1).mean()
    assert float(MultiLabelLoss(w)(logits, y)) == pytest.approx(float(ref))
    smooth = torch.nn.functional.binary_cross_entropy_with_logits(logits, y * 0.8 + 0.1, reduction="none").sum(1).mean()
    assert float(MultiLabelLoss(label_smoothing=0.2)(logits, y)) == pytest.approx(float(smooth))


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(training manifest, test manifest) of generated three-shape images."""
    base = tmp_path_factory.mktemp("multilabel")
    return draw_multilabel(base / "train", 100, seed=0), draw_multilabel(base / "test", 40, seed=1)


def check_run(run: pathlib.Path, test_csv: pathlib.Path, min_map: float) -> dict:
    meta = json.loads((run / "model.json").read_text())
    assert meta["task"] == "multi-label" and sorted(meta["class_names"]) == sorted(SHAPES)
    assert len(meta["thresholds"]) == 3 and all(0 < t < 1 for t in meta["thresholds"])
    assert len(meta["label_temperatures"]) == 3 and meta["split"]["method"] == "iterative-stratified"
    assert meta["class_balance"] is None
    m = evaluate(run, test_csv, progress=False, log=quiet)
    assert {*SUMMARY_KEYS, "per_label"} <= set(m)
    # chance: a label's AP is its prevalence, about 0.4
    assert m["macro_map"] >= min_map, m
    assert m["hamming_loss"] < 0.25
    page = pathlib.Path(m["report"])
    assert page.name == "report.html" and "Precision-recall per label" in page.read_text()
    assert "Precision-recall per label" in (run / "report" / "report.html").read_text()  # training's report, on validation
    return m


def test_small_cnn_from_scratch_end_to_end(shapes, tmp_path: pathlib.Path, capsys) -> None:
    train_csv, test_csv = shapes
    cfg = RunConfig(
        data=DataConfig(path=str(train_csv), img_size=20, seed=0, val_fraction=0.25),
        model=ModelConfig(name="small_cnn"),
        train=TrainConfig(out=str(tmp_path / "run"), epochs=6, batch_size=16, threads=1),
    )
    run = fit(cfg, progress=False, log=quiet)
    meta = json.loads((run / "model.json").read_text())
    assert meta["recipe"]["label_smoothing"] == 0.0  # the fast recipe's softmax smoothing is off
    check_run(run, test_csv, min_map=0.8)
    from imgcls.cli import main

    assert main(["evaluate", str(run), str(test_csv), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"macro_map", "micro_map", "macro_f1", "micro_f1", "hamming_loss", "subset_accuracy", "per_label"} <= set(out)
    assert set(out["per_label"][0]) == {"label", "precision", "recall", "f1", "ap", "support", "threshold"}


def test_efficientnet_linear_probe_end_to_end(shapes, tmp_path: pathlib.Path) -> None:
    train_csv, test_csv = shapes
    cfg = RunConfig(
        data=DataConfig(path=str(train_csv), img_size=32, seed=0, val_fraction=0.25),
        model=ModelConfig(name="efficientnet_lite0", pretrained=True, strategy="linear-probe"),
        train=TrainConfig(out=str(tmp_path / "run"), label_precision=0.9, pos_weight="auto"),
    )
    run = fit(cfg, progress=False, log=quiet)
    check_run(run, test_csv, min_map=0.8)
