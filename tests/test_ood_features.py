"""Feature-space "unknown" rules (mahalanobis, knn on the pooled pre-logit features): fitted at the
end of training, stored in the model folder (ood.safetensors), applied by predict, evaluate and
the torch runner; the onnx backend falls back to the msp rule stored beside them.

The scores themselves are tested on generated features here too; test_trust.py covers the msp rule.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch

from imgcls import ood
from imgcls.config import DataConfig, RunConfig, TrainConfig
from imgcls.evaluate import evaluate
from imgcls.inference.runners import FeaturesAndLogits, split_features
from imgcls.inference.trust import OOD_FILE, UNKNOWN_LABEL, Trust, logits_only, read_ood_stats
from imgcls.models import create_model
from imgcls.predict import Classifier
from imgcls.runtime import tta_logits
from imgcls.training.fit import fit
from imgcls.transforms import AugmentSpec
from synth import draw_sample, make_split_folders

NAMES = ["circle", "square", "triangle"]


def quiet(_: str) -> None:
    """A `log` callback that drops every message."""


@pytest.fixture(scope="module")
def knn_run(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(run folder, data folder): small_cnn trained 3 epochs with --unknown-method knn."""
    base = tmp_path_factory.mktemp("knn")
    data = make_split_folders(base / "data", per_split={"train": 16, "valid": 8, "test": 8}, size=24, seed=1, ext=".png")
    cfg = RunConfig(
        data=DataConfig(path=str(data), img_size=16, seed=0),
        train=TrainConfig(
            out=str(base / "run"),
            epochs=3,
            batch_size=8,
            augment=AugmentSpec(crop="translate"),
            unknown_method="knn",
            precision="fp32",
            threads=1,
        ),
    )
    return fit(cfg, progress=False, log=quiet), data


def unknown_images(n: int = 16, size: int = 24) -> dict[str, list[np.ndarray]]:
    """Uniform noise, and a class the model never saw (a cross, in a fourth colour)."""
    rng = np.random.default_rng(5)
    return {
        "noise": [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)],
        "held-out class": [np.asarray(draw_sample(3, 4, size, rng)) for _ in range(n)],
    }


def features_of(clf: Classifier, images: list) -> torch.Tensor:
    """Pooled features (N, F) of images, with the classifier's TTA, as its runner computes them."""
    arrays = np.stack([clf.prepare(x) for x in images])
    out = tta_logits(lambda a: clf.runner(a, None), arrays, clf.tta)
    return split_features(out, len(clf.class_names))[0]


# ----------------------------------------------------------------------------- pure parts


def test_feature_scores_rank_an_unseen_cluster_below_the_training_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (3, 16))
    y = rng.integers(0, 3, 300)
    train = centres[y] + rng.normal(0, 1, (300, 16))
    known = centres[rng.integers(0, 3, 100)] + rng.normal(0, 1, (100, 16))
    unseen = rng.normal(0, 4, 16) + rng.normal(0, 1, (100, 16))  # a fourth cluster
    means, precision = ood.fit_mahalanobis(train, y)
    bank = ood.feature_bank(train, size=128)
    maha = ood.auroc(ood.mahalanobis_score(known, means, precision), ood.mahalanobis_score(unseen, means, precision))
    knn = ood.auroc(ood.knn_score(known, bank, 5), ood.knn_score(unseen, bank, 5))
    assert maha > 0.95 and knn > 0.9, (maha, knn)
    assert bank.shape == (128, 16) and torch.allclose(bank.norm(dim=1), torch.ones(128))


def test_features_and_logits_agree_with_the_model():
    torch.manual_seed(0)
    for arch in ("small_cnn", "resnet18"):
        model = create_model(arch, num_classes=3).eval()
        x = torch.randn(2, 3, 32, 32)
        out = FeaturesAndLogits(model)(x)  # (2, F + 3)
        feats, logits = split_features(out, 3)
        assert torch.allclose(logits, model(x), atol=1e-5), arch
        assert torch.allclose(feats, model.forward_head(model.forward_features(x), pre_logits=True)), arch


# ----------------------------------------------------------------------------- fitted in training, applied by every front end


def test_fit_stores_the_feature_statistics_in_the_model_folder(knn_run):
    run, _ = knn_run
    meta = json.loads((run / "model.json").read_text())
    u = meta["unknown"]
    assert u["method"] == "knn" and u["file"] == OOD_FILE and u["fallback"]["method"] == "msp"
    assert u["train_images"] == 48 and u["tensors"]["ood.bank"][0] == 48  # every training image (under the bank size)
    assert (run / OOD_FILE).read_bytes()[:8] != b"\x80\x04" and (run / OOD_FILE).stat().st_size > 0  # safetensors, not a pickle
    stats = read_ood_stats(run, meta)
    assert list(stats) == ["ood.bank"] and list(stats["ood.bank"].shape) == u["tensors"]["ood.bank"]
    assert torch.allclose(stats["ood.bank"].norm(dim=1), torch.ones(48), atol=1e-5)  # normalised features
    trust = Trust.from_meta(meta, stats=stats)
    assert trust.uses_features and torch.equal(trust.detector.bank, stats["ood.bank"]) and trust.unknown_threshold == u["threshold"]
    # Validation images score at or above the threshold as often as "accept" says.
    clf = Classifier.load(run, precision="fp32")
    val = sorted(p for p in (knn_run[1] / "valid").rglob("*.png"))
    assert np.mean(trust.known_scores(None, features_of(clf, val)) >= u["threshold"]) >= 0.95


def test_knn_rule_ranks_noise_and_a_held_out_class_below_known_images(knn_run):
    run, data = knn_run
    clf = Classifier.load(run, precision="fp32")
    assert clf.runner.features and clf.trust.unknown_method == "knn"
    known = sorted(str(p) for p in (data / "test").rglob("*.png"))
    s_known = clf.trust.known_scores(None, features_of(clf, known))
    train = sorted(str(p) for p in (data / "train").rglob("*.png"))
    train_feats = features_of(clf, train)
    train_labels = np.repeat(np.arange(3), 16)  # class folders in sorted order, 16 images each
    means, precision = ood.fit_mahalanobis(train_feats, train_labels)
    for name, images in unknown_images().items():
        feats = features_of(clf, images)
        knn = ood.auroc(s_known, clf.trust.known_scores(None, feats))
        maha = ood.auroc(ood.mahalanobis_score(features_of(clf, known), means, precision), ood.mahalanobis_score(feats, means, precision))
        assert knn > 0.6 and maha > 0.6, (name, knn, maha)


def test_predict_and_evaluate_answer_unknown_with_the_feature_rule(knn_run, tmp_path):
    run, data = knn_run
    clf = Classifier.load(run, precision="fp32")
    known = sorted(str(p) for p in (data / "test").rglob("*.png"))
    noise = unknown_images()["noise"]
    rate = {k: np.mean([r["label"] == UNKNOWN_LABEL for r in clf.predict(v)]) for k, v in (("noise", noise), ("known", known))}
    assert rate["noise"] >= 0.5 and rate["noise"] > rate["known"] + 0.25, rate
    r = next(r for r in clf.predict(noise) if r["label"] == UNKNOWN_LABEL)
    assert r["best_guess"]["label"] in NAMES and r["best_guess"]["score"] == r["score"]
    off = Classifier.load(run, precision="fp32", unknown_threshold=0)
    assert not off.runner.features and all(r["label"] in NAMES for r in off.predict(noise))
    m = evaluate(run, data, split="test", out_dir=tmp_path / "ev", precision="fp32", progress=False, log=quiet)
    assert m["unknown"]["method"] == "knn" and m["unknown"]["accepted"] >= 0.75 and m["accuracy"] >= 0.8


def test_a_model_folder_without_its_statistics_says_what_is_missing(knn_run, tmp_path):
    run, _ = knn_run
    bare = pathlib.Path(shutil.copytree(run, tmp_path / "m"))
    (bare / OOD_FILE).unlink()
    with pytest.raises(ValueError, match=OOD_FILE):
        Classifier.load(bare, precision="fp32")
    assert Classifier.load(bare, precision="fp32", unknown_threshold=0).trust.unknown_threshold is None  # 0: the rule is off
    (bare / OOD_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        Classifier.load(bare, precision="fp32")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        Classifier.load(run, precision="fp32", unknown_threshold=1.5)  # knn scores a cosine similarity


def test_logits_only_backends_fall_back_to_the_stored_msp_rule(knn_run, tmp_path):
    run, data = knn_run
    meta = json.loads((run / "model.json").read_text())
    fallback, note = logits_only(meta)
    assert fallback["unknown"]["method"] == "msp" and fallback["unknown"]["threshold"] == meta["unknown"]["fallback"]["threshold"]
    assert "onnx" in note and "msp" in note and logits_only(fallback) == (fallback, None)
    pytest.importorskip("onnxruntime")
    from imgcls.export import export_onnx

    model = pathlib.Path(shutil.copytree(run, tmp_path / "m"))
    export_onnx(model, model / "model.onnx", log=quiet)
    lines: list[str] = []
    onnx_clf = Classifier.load(model, backend="onnx", log=lines.append)
    assert onnx_clf.trust.unknown_method == "msp" and any("fallback" in line for line in lines)
    known = sorted(str(p) for p in (data / "test").rglob("*.png"))
    assert {r["label"] for r in onnx_clf.predict(known)} <= {*NAMES, UNKNOWN_LABEL}
