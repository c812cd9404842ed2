"""The trust toolbox wired in: calibrated probabilities, "unknown" answers, prediction sets and
class balance, through training (fit), Classifier, evaluate, the CLI, the server and ONNX.

The pure functions are tested in test_calibration.py; here, what each front end does with them.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch

from imgcls.config import DataConfig, RunConfig, TrainConfig
from imgcls.evaluate import evaluate
from imgcls.inference.answer import ANSWER_KEYS, answer, postprocess
from imgcls.inference.trust import UNKNOWN_LABEL, Outputs, Trust, fit_trust, trust_metrics
from imgcls.predict import Classifier
from imgcls.runtime import tta_logits
from imgcls.training.balance import resolve_class_balance
from imgcls.training.finetune import fit_linear_head
from imgcls.training.fit import fit
from imgcls.training.loop import epoch_order
from synth import draw_sample, write_images

NAMES = ["circle", "square", "triangle"]


def quiet(_: str) -> None:
    """A `log` callback that drops every message."""


def copy_run(run: pathlib.Path, dest: pathlib.Path, **sections) -> pathlib.Path:
    """A copy of a model folder with model.json's trust sections replaced (None: removed)."""
    shutil.copytree(run, dest)
    meta = json.loads((dest / "model.json").read_text())
    for key, value in sections.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (dest / "model.json").write_text(json.dumps(meta))
    return dest


def model_logits(clf: Classifier, arrays: np.ndarray) -> torch.Tensor:
    """The logits Classifier.predict_arrays post-processes (runner + TTA), (N, C)."""
    return tta_logits(lambda a: clf.runner(a, None), arrays, clf.tta)


def overconfident_logits(n: int = 600, c: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model that is right ~70% of the time and says so with ~99% confidence."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, c, n))
    z = rng.normal(0, 1, (n, c))
    z[np.arange(n), pred] += 8.0
    return z, y


# ----------------------------------------------------------------------------- pure parts


def test_fit_trust_undoes_overconfidence_and_keeps_what_answers_need():
    z, y = overconfident_logits()
    s = fit_trust(z, y)
    c, u, k = s["calibration"], s["unknown"], s["conformal"]
    assert c["fitted_on"] == "val" and c["n"] == 600
    assert c["temperature"] > 2 and c["nll_after"] < c["nll_before"] and c["ece_after"] < c["ece_before"]
    trust = Trust.from_meta(s)
    assert trust.temperature == c["temperature"] and trust.unknown_threshold == u["threshold"] and u["method"] == "msp"
    assert np.mean(postprocess(torch.from_numpy(z), trust).known) >= 0.95  # accepts 95% of the images it was fitted on
    assert k["n"] == 600 and k["scores"] == sorted(k["scores"]) and k["qhat"] == pytest.approx(trust.qhat(0.9))
    small = fit_trust(z, y, max_scores=100)["conformal"]
    assert small["n"] == len(small["scores"]) == 100  # a random subset beyond the cap


def test_postprocess_divides_by_the_temperature_and_applies_the_threshold():
    z = torch.tensor([[4.0, 0.0, 0.0], [0.3, 0.2, 0.1], [0.0, 0.0, 9.0]])
    plain = postprocess(z)
    assert np.allclose(plain.probs, torch.softmax(z, 1).numpy()) and plain.known.all()
    trust = Trust(temperature=2.0, unknown_threshold=0.5)
    out = postprocess(z, trust)
    assert np.allclose(out.probs, torch.softmax(z / 2, 1).numpy(), atol=1e-6)
    assert (out.probs.argmax(1) == plain.probs.argmax(1)).all()  # a temperature never changes the top class
    assert out.known.tolist() == [True, False, True]  # msp of the middle row is ~0.35
    assert out[1:].known.tolist() == [False, True] and len(out[1:]) == 2  # the batcher's slices keep both together
    energy = Trust(temperature=1.0, unknown_method="energy", unknown_threshold=3.0)
    assert postprocess(z, energy).known.tolist() == [True, False, True]  # logsumexp: 4.3, 1.4, 9.0


def test_trust_from_meta_and_the_threshold_override():
    bare = Trust.from_meta({"class_names": NAMES})
    assert bare.temperature == 1.0 and bare.unknown_threshold is None
    with pytest.raises(ValueError, match="no conformal scores"):
        bare.qhat(0.9)
    meta = {
        "calibration": {"temperature": 1.5},
        "unknown": {"method": "msp", "threshold": 0.6},
        "conformal": {"method": "aps", "scores": [0.9, 0.5, 0.7]},
    }
    t = Trust.from_meta(meta)
    assert (t.temperature, t.unknown_threshold) == (1.5, 0.6) and t.conformal_scores.tolist() == [0.5, 0.7, 0.9]
    assert Trust.from_meta(meta, unknown_threshold=0).unknown_threshold is None  # 0: off
    assert Trust.from_meta(meta, unknown_threshold=0.8).unknown_threshold == 0.8
    assert Trust.from_meta({}, unknown_threshold=0.3).unknown_threshold == 0.3  # a model without a rule gets msp
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Trust.from_meta(meta, unknown_threshold=1.5)
    with pytest.raises(ValueError, match="needs at least 9"):
        t.qhat(0.9)  # three scores are too few for 90%
    with pytest.raises(ValueError, match="temperature"):
        Trust.from_meta({"calibration": {"temperature": -1}})
    with pytest.raises(ValueError, match="knn"):
        Trust.from_meta({"unknown": {"method": "knn", "threshold": 0.1}})


def test_answer_says_unknown_with_the_best_guess_and_adds_the_set():
    p = np.array([0.5, 0.3, 0.2])
    known = answer(p, NAMES, 2, "a.png", probabilities=False)
    assert tuple(known) == ANSWER_KEYS and known["label"] == "circle"
    unk = answer(p, NAMES, 2, "a.png", probabilities=False, known=False, set_indices=[0, 1])
    assert unk["label"] == UNKNOWN_LABEL and unk["score"] == 0.5
    assert unk["best_guess"] == {"label": "circle", "score": 0.5} and unk["top_k"][0]["label"] == "circle"
    assert unk["set"] == ["circle", "square"]


def test_conformal_sets_cover_at_the_target_rate():
    # Labels drawn from the model's own (calibrated) probabilities: exchangeable calibration and test rows.
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(6, 0.7), 6000)
    y = np.array([rng.choice(6, p=p) for p in probs])
    scores = fit_trust(np.log(probs[:2000]), y[:2000])["conformal"]["scores"]
    trust = Trust(conformal_scores=np.asarray(scores))
    for coverage in (0.8, 0.9, 0.95):
        sets = trust.sets(probs[2000:], trust.qhat(coverage))
        covered = np.mean([t in s for t, s in zip(y[2000:], sets)])
        assert coverage - 0.02 <= covered <= coverage + 0.04, (coverage, covered)
    m = trust_metrics(torch.from_numpy(np.log(probs[2000:])), y[2000:], trust, coverage=0.9)
    assert m["coverage_target"] == 0.9 and 0.88 <= m["coverage"] <= 0.94 and 1 <= m["mean_set_size"] <= 6


def test_class_balance_decisions():
    ten_to_one = torch.tensor([0] * 100 + [1] * 10 + [2] * 10)
    auto = resolve_class_balance("auto", ten_to_one, 3)
    assert auto.mode == "weights" and auto.ratio == 10.0 and auto.counts == (100, 10, 10)
    w = auto.loss_weights()
    assert w[1] == pytest.approx(10 * w[0]) and w[1] == w[2]
    assert "class weights" in auto.describe() and "over 3x" in auto.describe()
    assert auto.to_dict()["mode"] == "weights" and auto.to_dict()["weights"] == pytest.approx(w.tolist())
    mild = resolve_class_balance("auto", torch.tensor([0] * 20 + [1] * 10), 2)
    assert mild.mode == "none" and mild.loss_weights() is None and not mild.on
    assert resolve_class_balance("none", ten_to_one, 3).loss_weights() is None
    sampler = resolve_class_balance("sampler", ten_to_one, 3)
    assert sampler.loss_weights() is None and sampler.probe_weights() is not None
    sw = sampler.sample_weights(ten_to_one)
    order = epoch_order(len(ten_to_one), torch.Generator().manual_seed(0), sw)
    shares = np.bincount(ten_to_one[order].numpy(), minlength=3) / len(order)
    assert len(order) == 120 and np.all(np.abs(shares - 1 / 3) < 0.12)  # every class about a third, not 83% / 8% / 8%
    assert torch.equal(order, epoch_order(120, torch.Generator().manual_seed(0), sw))  # the epoch's generator replays it


def test_weighted_linear_probe_recovers_the_rare_class():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, 8, generator=g), torch.randn(30, 8, generator=g) + 0.5])  # overlapping blobs
    y = torch.tensor([0] * 300 + [1] * 30)
    xv = torch.cat([torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + 0.5])
    yv = torch.tensor([0] * 200 + [1] * 200)
    head = torch.nn.Linear(8, 2)
    recall = {}
    for name, w in (("plain", None), ("weighted", resolve_class_balance("weights", y, 2).probe_weights())):
        fit_linear_head(head, x, y, xv, yv, log=quiet, class_weights=w)
        recall[name] = float((head(xv[yv == 1]).argmax(1) == 1).float().mean())
    assert recall["weighted"] > recall["plain"] + 0.2


# ----------------------------------------------------------------------------- through training


def test_fit_records_the_calibration_that_predict_applies(trained_run, tmp_path):
    run, data = trained_run
    meta = json.loads((run / "model.json").read_text())
    c = meta["calibration"]
    assert c["fitted_on"] == "val" and c["n"] == 18 and c["nll_after"] <= c["nll_before"] + 1e-12
    assert meta["unknown"]["method"] == "msp" and meta["conformal"]["n"] == 18
    assert meta["class_balance"]["mode"] == "none" and meta["class_balance"]["counts"] == [16, 16, 16]
    val = meta["metrics"]["val"]  # computed from the same validation logits, after the temperature
    assert val["log_loss"] == pytest.approx(c["nll_after"], rel=1e-4) and val["ece"] == pytest.approx(c["ece_after"], abs=1e-6)
    assert val["ece_uncalibrated"] == pytest.approx(c["ece_before"], abs=1e-6) and val["temperature"] == c["temperature"]
    assert val["unknown"]["accepted"] >= 0.95
    # A temperature set by hand: predict's probabilities are softmax(logits / T), the top class unchanged.
    hot = Classifier.load(copy_run(run, tmp_path / "t3", calibration={"temperature": 3.0}), precision="fp32")
    files = sorted(str(p) for p in (data / "test").rglob("*") if p.is_file())
    arrays = np.stack([hot.prepare(f) for f in files])
    z = model_logits(hot, arrays)
    assert np.allclose(hot.predict_arrays(arrays), torch.softmax(z / 3.0, 1).numpy(), atol=1e-6)
    plain = torch.softmax(z, 1).numpy()
    assert (hot.predict_arrays(arrays).argmax(1) == plain.argmax(1)).all()
    assert hot.predict(files[0])["score"] < plain[0].max() - 0.01  # T = 3 softens a confident answer


def mislabeled_val_folders(root: pathlib.Path, seed: int) -> pathlib.Path:
    """train/ with 16 clean images per class; val/ with 8 per class, half of them another class's shape:
    the trained model is sure of those and wrong, i.e. over-confident on validation."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(NAMES):
        write_images(root / "train" / name, label, 3, 16, 16, rng, "RGB", ".png")
        (root / "val" / name).mkdir(parents=True)
        for i in range(8):
            draw_sample(label if i % 2 else (label + 1) % 3, 3, 16, rng).save(root / "val" / name / f"{i:03d}.png")
    return root


def test_fit_calibrates_an_overconfident_model(tmp_path):
    # Over seeds 3-8 this gave T 1.4-2.1, ECE 0.15-0.27 -> 0.03-0.16, NLL lower by 0.01-0.07.
    data = mislabeled_val_folders(tmp_path / "data", seed=3)
    cfg = RunConfig(
        data=DataConfig(path=str(data), img_size=16),
        train=TrainConfig(out=str(tmp_path / "run"), epochs=8, recipe="generic", batch_size=8, label_smoothing=0.0, precision="fp32"),
    )
    lines: list[str] = []
    run = fit(cfg, progress=False, log=lines.append)
    meta = json.loads((run / "model.json").read_text())
    c = meta["calibration"]
    assert c["temperature"] > 1.2 and c["nll_after"] < c["nll_before"] and c["ece_after"] < c["ece_before"] and c["n"] == 24
    assert any(line.startswith("calibrated on 24 validation images") for line in lines)
    assert meta["metrics"]["val"]["ece"] < meta["metrics"]["val"]["ece_uncalibrated"]


def test_noise_is_answered_unknown_more_often_than_known_images(trained_run):
    run, data = trained_run
    clf = Classifier.load(run, precision="fp32")
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(20)]
    known = sorted(str(p) for p in (data / "test").rglob("*") if p.is_file())
    rate = {
        name: np.mean([r["label"] == UNKNOWN_LABEL for r in clf.predict(items)]) for name, items in (("noise", noise), ("known", known))
    }
    assert rate["noise"] >= 0.5 and rate["noise"] > rate["known"] + 0.25, rate
    r = next(r for r in clf.predict(noise) if r["label"] == UNKNOWN_LABEL)
    assert r["best_guess"]["label"] in NAMES and r["best_guess"]["score"] == r["score"]
    off = Classifier.load(run, precision="fp32", unknown_threshold=0)
    assert all(r["label"] in NAMES for r in off.predict(noise))


def test_evaluate_reports_calibration_unknown_and_sets(trained_run, tmp_path):
    run, data = trained_run
    m = evaluate(run, data, split="test", out_dir=tmp_path / "ev", precision="fp32", progress=False, log=quiet, coverage=0.8)
    assert {"ece", "ece_uncalibrated", "temperature", "coverage", "mean_set_size", "coverage_target"} <= set(m)
    assert m["coverage_target"] == 0.8 and 1 <= m["mean_set_size"] <= 3
    u = m["unknown"]
    assert u["method"] == "msp" and 0 <= u["accepted"] <= 1 and u["num_accepted"] == round(u["accepted"] * 18)
    # The same sets and verdicts as Classifier.predict gives image by image.
    clf = Classifier.load(run, precision="fp32")
    answers = clf.predict(m["predictions"]["paths"], coverage=0.8)
    truth = [NAMES[i] for i in m["predictions"]["labels"]]
    assert m["coverage"] == pytest.approx(np.mean([t in a["set"] for t, a in zip(truth, answers)]))
    assert m["mean_set_size"] == pytest.approx(np.mean([len(a["set"]) for a in answers]))
    assert u["num_accepted"] == sum(a["label"] != UNKNOWN_LABEL for a in answers)
    assert m["coverage"] >= 0.6  # a target of 0.8 from 18 validation scores, measured on 18 images
    bare = copy_run(run, tmp_path / "bare", conformal=None)
    with pytest.raises(ValueError, match="no conformal scores"):
        evaluate(bare, data, split="test", out_dir=tmp_path / "ev2", progress=False, log=quiet, coverage=0.9)


def imbalanced_folders(root: pathlib.Path, counts: dict[str, int], seed: int) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(NAMES):
        write_images(root / "train" / name, label, 3, counts[name], 16, rng, "RGB", ".png")
        write_images(root / "val" / name, label, 3, 4, 16, rng, "RGB", ".png")
    return root


def test_a_10_to_1_set_is_weighted_by_default(tmp_path):
    # The generic recipe (AdamW): with the fast recipe's large SGD steps, 3 images of a class
    # weighted 10x made 3-epoch runs unstable (balanced accuracy 0.33-0.75 against 0.83-1.0
    # unweighted over 3 seeds), while at 20+ images per class weights won (see training/balance.py).
    data = imbalanced_folders(tmp_path / "data", {"circle": 30, "square": 3, "triangle": 3}, seed=4)
    runs, logs = {}, {}
    for mode in ("auto", "none", "sampler"):
        cfg = RunConfig(
            data=DataConfig(path=str(data), img_size=16),
            train=TrainConfig(out=str(tmp_path / mode), epochs=3, batch_size=8, recipe="generic", precision="fp32", class_balance=mode),
        )
        logs[mode] = []
        runs[mode] = json.loads((fit(cfg, progress=False, log=logs[mode].append) / "model.json").read_text())
    cb = runs["auto"]["class_balance"]
    assert cb["mode"] == "weights" and cb["requested"] == "auto" and cb["ratio"] == 10.0 and cb["counts"] == [30, 3, 3]
    assert cb["weights"][1] == pytest.approx(10 * cb["weights"][0])
    assert any("class balance" in line and "class weights in the loss" in line for line in logs["auto"])
    assert runs["none"]["class_balance"]["mode"] == "none" and runs["none"]["class_balance"]["weights"] is None
    assert runs["sampler"]["class_balance"]["mode"] == "sampler" and runs["sampler"]["class_balance"]["weights"] is None
    assert any("batches drawn with every class equally likely" in line for line in logs["sampler"])
    bal = {mode: runs[mode]["metrics"]["val"]["balanced_accuracy"] for mode in runs}
    assert bal["auto"] >= bal["none"] - 0.05, bal  # on shapes this easy both may be perfect; weighting must not hurt
    assert bal["sampler"] >= 0.5, bal  # it trains (chance is 1/3)


# ----------------------------------------------------------------------------- front ends


def test_cli_predict_shows_unknown_and_sets(trained_run, tmp_path, capsys):
    from imgcls.cli import main

    run, data = trained_run
    files = sorted(str(p) for p in (data / "test" / "circle").iterdir())[:4]
    assert main(["predict", str(run), *files, "--json", "--coverage", "0.8", "--unknown-threshold", "0.999", "--compile", "off"]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert all(r["label"] == UNKNOWN_LABEL and r["best_guess"]["label"] in NAMES and r["set"] for r in results)
    assert "answered 'unknown'" in captured.err
    assert main(["predict", str(run), *files, "--unknown-threshold", "0.999", "--compile", "off"]) == 0
    assert "unknown (best guess: " in capsys.readouterr().out
    bare = copy_run(run, tmp_path / "bare", conformal=None)
    assert main(["predict", str(bare), files[0], "--coverage", "0.9"]) == 2
    assert "no conformal scores" in capsys.readouterr().err


def test_server_answers_unknown_and_sets(trained_run):
    from fastapi.testclient import TestClient

    from imgcls.serve import create_app

    run, data = trained_run
    clf = Classifier.load(run, precision="fp32", unknown_threshold=0.999)
    blob = next((data / "test" / "square").iterdir()).read_bytes()
    with TestClient(create_app(clf)) as client:
        r = client.post("/v1/predict?coverage=0.8", files={"file": ("a.png", blob, "image/png")})
        assert r.status_code == 200, r.text
        (p,) = r.json()["predictions"]
        expected = clf.predict(blob, coverage=0.8)
        assert p["label"] == UNKNOWN_LABEL and p["best_guess"] == pytest.approx(expected["best_guess"]) and p["set"] == expected["set"]
        plain = client.post("/v1/predict", files={"file": ("a.png", blob, "image/png")}).json()["predictions"][0]
        assert "set" not in plain
        assert client.post("/v1/predict?coverage=0.999", files={"file": ("a.png", blob, "image/png")}).status_code == 400
        assert client.get("/v1/model").json()["calibration"]["unknown"] == {"method": "msp", "threshold": 0.999}


def test_onnx_backend_applies_the_same_calibration(trained_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from imgcls.export import export_onnx

    run, data = trained_run
    meta = json.loads((run / "model.json").read_text())
    model = copy_run(run, tmp_path / "m", calibration={"temperature": 2.5}, unknown={"method": "msp", "threshold": 0.6})
    export_onnx(model, model / "model.onnx", log=quiet)
    torch_clf = Classifier.load(model, precision="fp32")
    onnx_clf = Classifier.load(model, backend="onnx")
    assert onnx_clf.trust.temperature == 2.5 and onnx_clf.trust.unknown_threshold == 0.6
    assert len(onnx_clf.trust.conformal_scores) == meta["conformal"]["n"]
    files = sorted(str(p) for p in (data / "test").rglob("*") if p.is_file())
    arrays = np.stack([torch_clf.prepare(f) for f in files])
    a, b = torch_clf.infer_arrays(arrays), onnx_clf.infer_arrays(arrays)
    assert np.allclose(a.probs, b.probs, atol=1e-4) and (a.known == b.known).all()
    assert not np.allclose(a.probs, torch.softmax(model_logits(torch_clf, arrays), 1).numpy(), atol=1e-3)  # T = 2.5 applied
    assert [r["set"] for r in torch_clf.predict(files, coverage=0.8)] == [r["set"] for r in onnx_clf.predict(files, coverage=0.8)]


def test_outputs_of_plain_probabilities_accept_everything():
    out = Outputs.of(np.full((2, 3), 1 / 3))
    assert out.known.tolist() == [True, True] and Outputs.of(out) is out
