"""Tests for imgcls.report: the self-contained HTML report of training, `imgcls evaluate` and
`imgcls report` (every image embedded, the sections a reader needs, curves that fit the strategy),
and the per-image pieces it is built from (top losses, confused pairs, the probe's L2 sweep)."""

from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from imgcls.cli import main
from imgcls.metrics import classification_metrics
from imgcls.report import Predictions, read_probe_sweep, top_losses, write_probe_sweep, write_report
from imgcls.report.gallery import confused_pairs

CLASSES = ["circle", "square", "triangle"]
SECTIONS = ("summary", "per-class", "confusion", "training", "losses", "pairs", "calibration", "audit")


def embedded_images(text: str) -> list[Image.Image]:
    """Every <img> of the page, decoded: each must be a data: URI of a readable image."""
    images = []
    for src in re.findall(r"<img [^>]*src=\"([^\"]*)\"", text):
        assert src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")), src[:60]
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.load()
        assert img.width > 0 and img.height > 0
        images.append(img)
    return images


def assert_self_contained(text: str) -> None:
    """Nothing the page would fetch: no scripts, stylesheets, external URLs or relative files."""
    assert "<script" not in text and "<link" not in text and "url(" not in text and "@import" not in text
    assert all(h.startswith("#") for h in re.findall(r"href=\"([^\"]*)\"", text))
    assert all(s.startswith("data:") for s in re.findall(r"src=\"([^\"]*)\"", text))


def section_ids(text: str) -> list[str]:
    return re.findall(r"<section id=\"([a-z-]+)\"", text)


def split_files(data: pathlib.Path, split: str) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for k, name in enumerate(CLASSES):
        files = sorted(p for p in (data / split / name).iterdir() if p.is_file())
        paths += [str(p) for p in files]
        labels += [k] * len(files)
    return paths, np.array(labels)


def crafted_probs(labels: np.ndarray) -> np.ndarray:
    """Right with p 0.8 except three mistakes: two circles taken for squares (p(true) 0.1 and
    0.3), one triangle taken for a circle (p(true) 0.2)."""
    probs = np.full((len(labels), 3), 0.1)
    probs[np.arange(len(labels)), labels] = 0.8
    circles, triangles = np.flatnonzero(labels == 0), np.flatnonzero(labels == 2)
    probs[circles[0]] = [0.1, 0.8, 0.1]
    probs[circles[1]] = [0.3, 0.6, 0.1]
    probs[triangles[0]] = [0.7, 0.1, 0.2]
    return probs


# ----------------------------------------------------------------------------- the per-image pieces


def test_top_losses_are_the_mistakes_with_the_lowest_true_probability():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.45, 0.55], [0.3, 0.7]])
    pred = Predictions(probs, np.array([0, 0, 0, 1, 1]), ["a", "b", "c", "d", "e"])
    losses = top_losses(pred, ["x", "y"], k=5)
    assert [t["path"] for t in losses] == ["c", "b"]  # d and e are right; c has p(true) 0.2 < b's 0.4
    assert losses[0] == {"path": "c", "index": 2, "true": "x", "predicted": "y", "score": 0.8, "true_score": 0.2}
    assert [t["path"] for t in top_losses(pred, ["x", "y"], k=1)] == ["c"]
    with pytest.raises(ValueError, match="differ in length"):
        Predictions(probs, np.array([0, 1]), ["a"])


def test_confused_pairs_show_both_sides_most_frequent_first():
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    probs = np.array([[0.2, 0.8, 0], [0.4, 0.6, 0], [0.9, 0.1, 0], [0.1, 0.9, 0], [0.3, 0.7, 0], [0.6, 0, 0.4], [0, 0, 1]])
    pairs = confused_pairs(Predictions(probs, labels, [f"f{i}" for i in range(7)]), ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("a", "b", 2), ("c", "a", 1)]
    assert [x["path"] for x in pairs[0]["mistakes"]] == ["f0", "f1"]  # the most confident mistake first
    assert [x["path"] for x in pairs[0]["examples"]] == ["f3", "f4"]  # b's images the model got right
    assert [x["path"] for x in pairs[1]["examples"]] == ["f2"]


def test_probe_sweep_round_trip(tmp_path):
    sweep = [
        {"reg": r, "train_loss": 0.1, "train_acc": 1.0, "val_loss": 0.5 - r, "val_acc": 0.75, "chosen": r == 0.01} for r in (1e-3, 1e-2)
    ]
    write_probe_sweep(tmp_path, sweep)
    rows = read_probe_sweep(tmp_path)
    assert [r["l2"] for r in rows] == [0.001, 0.01] and [r["chosen"] for r in rows] == [0.0, 1.0]
    assert rows[1]["val_loss"] == pytest.approx(0.49)
    assert read_probe_sweep(tmp_path / "nowhere") == []


# ----------------------------------------------------------------------------- the page


def test_report_has_every_section_and_embeds_every_image(trained_run, tmp_path):
    from imgcls.audit import AuditOptions, run_audit

    run, data = trained_run
    paths, labels = split_files(data, "test")
    probs = crafted_probs(labels)
    metrics = classification_metrics(probs, labels, CLASSES)
    audit = run_audit(data, AuditOptions(features="none"), progress=False, log=lambda _: None)
    (tmp_path / "audit.json").write_text(json.dumps(audit))
    history = [
        {"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5 + 0.1 * e, "val_loss": 1.1 / e, "val_acc": 0.6, "lr": 0.1 / e}
        for e in (1, 2, 3)
    ]
    out = tmp_path / "report"
    page = write_report(
        out,
        metrics,
        CLASSES,
        history,
        title="crafted",
        predictions=Predictions(probs, labels, paths),
        model_dir=run,
        audit=tmp_path / "audit.json",
    )
    text = page.read_text(encoding="utf-8")
    assert_self_contained(text)
    assert section_ids(text) == list(SECTIONS)
    assert sorted(os.listdir(out)) == [
        "confusion_matrix.png",
        "confusion_matrix.txt",
        "metrics.json",
        "reliability_diagram.png",
        "report.html",
        "training_curves.png",
    ]
    # Top losses, worst first: each card has the thumbnail and the Grad-CAM of the predicted class.
    cards = re.findall(r"<div class=\"card\">(.*?)</div></div>", text, re.S)
    assert len(cards) == 3
    assert [re.search(r"class=\"truth\">(\w+)</span> <span class=\"muted\">p ([\d.]+)</span>", c).groups() for c in cards] == [
        ("circle", "0.100"),
        ("triangle", "0.200"),
        ("circle", "0.300"),
    ]
    assert all(c.count("<img ") == 2 and "Grad-CAM: " in c for c in cards)
    # Confused pairs: circle -> square twice, with squares the model recognised beside them.
    pairs = text[text.index('id="pairs"') : text.index('id="calibration"')]
    assert re.search(r"circle</span> taken for <span class=\"wrong\">square</span>: 2 images", pairs)
    assert pairs.count("<img ") == 2 + 4 + 1 + 4  # mistakes and recognised examples of each pair
    found = [k.replace("_", " ") for k, v in audit["findings"].items() if v]
    assert found and all(f"<td>{k}</td>" in text[text.index('id="audit"') :] for k in found)  # a row per kind with findings
    assert "Nothing found: unreadable" in text  # the empty kinds on one line
    images = embedded_images(text)
    assert len(images) == 3 + 3 * 2 + 11  # confusion matrix, curves, reliability; the cards; the pairs
    thumbs = [im for im in images if im.format == "JPEG"]
    assert thumbs and all(max(im.size) <= 128 for im in thumbs)


def test_report_without_predictions_or_model_keeps_the_rest(tmp_path):
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    metrics = classification_metrics(probs, np.array([0, 1, 1]), ["cat", "dog"])
    text = write_report(tmp_path, metrics, ["cat", "dog"], files=False).read_text()
    assert section_ids(text) == ["summary", "per-class", "confusion", "training"]
    assert "No training history" in text and "dog" in text
    assert os.listdir(tmp_path) == ["report.html"]  # files=False: the page alone
    assert len(embedded_images(text)) == 1  # the confusion matrix


def _probe_model_dir(path: pathlib.Path, strategy: str) -> pathlib.Path:
    path.mkdir()
    (path / "model.json").write_text(json.dumps({"strategy": strategy, "training": {"best_epoch": 1}}))
    return path


@pytest.mark.parametrize("strategy", ["linear-probe", "fine-tune"])
def test_training_section_fits_the_strategy(tmp_path, strategy):
    probs = np.array([[0.8, 0.2], [0.3, 0.7]])
    metrics = classification_metrics(probs, np.array([0, 1]), ["cat", "dog"])
    sweep = [
        {"l2": r, "train_loss": 0.1, "train_acc": 1.0, "val_loss": 0.4, "val_acc": 0.5 + r, "chosen": float(r == 0.1)}
        for r in (1e-4, 1e-3, 1e-2, 1e-1)
    ]
    row = {"epoch": 1.0, "train_loss": 0.2, "train_acc": 0.9, "val_loss": 0.4, "val_acc": 0.6, "lr": 0.0, "epoch_time_s": 3.0}
    history = [row] if strategy == "linear-probe" else [row, {**row, "epoch": 2.0, "val_acc": 0.7}]
    out = tmp_path / "out"
    text = write_report(
        out, metrics, ["cat", "dog"], history, model_dir=_probe_model_dir(tmp_path / "m", strategy), probe_sweep=sweep
    ).read_text()
    training = text[text.index('id="training"') :]
    assert "0.1 (kept)" in training and (out / "probe_sweep.png").is_file()
    if strategy == "linear-probe":  # one row of history: the sweep is the curve, no epoch axes
        assert "Linear probe: the L2 sweep" in training and not (out / "training_curves.png").exists()
        assert training.count("<img ") == 1
    else:
        assert "before fine-tuning" in training and (out / "training_curves.png").is_file()
        assert training.count("<img ") == 2


def test_one_epoch_is_a_table_not_empty_axes(tmp_path):
    probs = np.array([[0.8, 0.2], [0.3, 0.7]])
    metrics = classification_metrics(probs, np.array([0, 1]), ["cat", "dog"])
    history = [{"epoch": 1.0, "train_loss": 0.25, "train_acc": 0.9, "val_loss": float("nan"), "val_acc": float("nan"), "lr": 0.1}]
    text = write_report(tmp_path, metrics, ["cat", "dog"], history).read_text()
    training = text[text.index('id="training"') :]
    assert "One epoch only" in training and "0.2500" in training and "<img " not in training
    assert "val loss" not in training  # no validation split: no empty column either
    assert not (tmp_path / "training_curves.png").exists()


# ----------------------------------------------------------------------------- training, evaluate and `imgcls report`


def test_training_writes_a_self_contained_report(trained_run):
    run, _ = trained_run
    text = (run / "report" / "report.html").read_text(encoding="utf-8")
    assert_self_contained(text)
    ids = section_ids(text)
    assert ids[:5] == ["summary", "per-class", "confusion", "training", "losses"] and "calibration" in ids
    assert "small_cnn" in text and "val split" in text
    assert len(embedded_images(text)) >= 3  # confusion matrix, curves, reliability (and any thumbnails)
    assert (run / "report" / "training_curves.png").is_file() and (run / "report" / "reliability_diagram.png").is_file()


def test_cli_report_writes_one_html_file(capsys, trained_run, tmp_path):
    run, data = trained_run
    out = tmp_path / "reports" / "r.html"
    capsys.readouterr()
    code = main(["report", str(run), str(data), "--out", str(out), "--quiet"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert f"report: {out}" in stdout and "accuracy" in stdout
    assert os.listdir(out.parent) == ["r.html"]
    text = out.read_text(encoding="utf-8")
    assert_self_contained(text)
    assert "test split" in text and section_ids(text)[:4] == ["summary", "per-class", "confusion", "training"]
    embedded_images(text)


def test_cli_report_missing_audit_is_noted_not_fatal(capsys, trained_run, tmp_path):
    run, data = trained_run
    code = main(["report", str(run), str(data), "--out", str(tmp_path / "r.html"), "--quiet", "--audit", str(tmp_path / "none.json")])
    _, err = capsys.readouterr()
    assert code == 0 and "no audit at" in err
    assert 'id="audit"' not in (tmp_path / "r.html").read_text()


def test_linear_probe_run_reports_its_l2_sweep(tmp_path):
    from safetensors.torch import save_file

    from imgcls.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from imgcls.models import create_model
    from imgcls.training.fit import fit
    from synth import make_split_folders

    data = make_split_folders(tmp_path / "data", per_split={"train": 4, "valid": 2}, size=20, seed=3)
    weights = tmp_path / "random_small_cnn.safetensors"  # a probe needs starting weights: random ones, saved as a file
    save_file({k: v.contiguous() for k, v in create_model("small_cnn", num_classes=3).state_dict().items()}, str(weights))
    cfg = RunConfig(
        data=DataConfig(path=str(data), img_size=16, seed=0),
        model=ModelConfig(name="small_cnn", weights=str(weights), strategy="linear-probe"),
        train=TrainConfig(out=str(tmp_path / "run"), precision="fp32"),
    )
    run = fit(cfg, progress=False, log=lambda _: None)
    sweep = read_probe_sweep(run)
    assert len(sweep) == 4 and sum(r["chosen"] for r in sweep) == 1  # every L2 strength tried, the kept one marked
    text = (run / "report" / "report.html").read_text(encoding="utf-8")
    training = text[text.index('id="training"') : text.index('id="losses"')]
    assert "linear-probe" in training and "Linear probe: the L2 sweep" in training and "(kept)" in training
    assert (run / "report" / "probe_sweep.png").is_file() and not (run / "report" / "training_curves.png").exists()
