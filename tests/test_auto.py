"""--model auto (imgcls.training.auto): the choice from the data, the candidates it tries where the
data leave it open, what model.json records; and the fine-tune that keeps its probe when it does worse."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
import torch

from conftest import quiet
from imgcls.config import AugmentSpec, DataConfig, ModelConfig, RunConfig, TrainConfig
from imgcls.training import auto
from imgcls.training.auto import DataProfile, choose_model, decide, profile_data
from imgcls.training.fit import fit
from imgcls.training.plan import announce_estimate
from synth import make_class_folders


def profile(side: int, n: int, grey: bool = False, classes: int = 10, pretrained: bool = True, height: int | None = None) -> DataProfile:
    return DataProfile(n, classes, side, height or side, grey, pretrained)


@pytest.mark.parametrize(
    ("p", "model"),
    [
        (profile(8, 1_437, grey=True), "small_cnn"),  # the digits demo: decided from the data, no probe
        (profile(28, 54_000, grey=True), "small_cnn"),  # MNIST
        (profile(32, 45_000), "small_cnn"),  # CIFAR-10
        (profile(48, 3_000, grey=True), "small_cnn"),  # small grey scans
        (profile(500, 1_088, height=375), "efficientnet_lite0"),  # flower photos
        (profile(256, 250, grey=True), "efficientnet_lite0"),  # a few hundred MRI scans
        (profile(64, 300), "efficientnet_lite0"),  # few images
        (profile(100, 1_650), None),  # hand-sign digits: from scratch 99.3%, probe 94.4%: try both
        (profile(64, 24_300), None),  # EuroSAT tiles
        (profile(500, 1_088, pretrained=False), "small_cnn"),  # no weights installed: nothing else to pick
    ],
)
def test_decide_from_the_data(p, model):
    assert decide(p, ModelConfig(name="auto")).model == model


def test_decide_follows_what_the_user_asked_for():
    assert decide(profile(16, 50_000), ModelConfig(name="auto", pretrained=True)).model == "efficientnet_lite0"
    assert decide(profile(16, 50_000), ModelConfig(name="auto", strategy="linear-probe")).model == "efficientnet_lite0"
    with pytest.raises(ValueError, match="--model"):
        decide(profile(16, 50), ModelConfig(name="auto", weights="w.pth"))


def test_profile_reads_size_and_colour_from_headers(tmp_path):
    grey = profile_data(auto.index_dataset(make_class_folders(tmp_path / "g", per_class=5, size=12, mode="L")), 10**8)
    colour = profile_data(auto.index_dataset(make_class_folders(tmp_path / "c", per_class=2, size=40)), 10**8)
    assert (grey.width, grey.height, grey.grey, grey.num_images, grey.num_classes) == (12, 12, True, 15, 3)
    assert (colour.side, colour.grey, colour.num_images) == (40, False, 6)
    assert grey.describe() == "12x12 grey, 15 images, 3 classes"
    assert DataProfile(1088, 17, 500, 375, False, True).describe() == "photos ~500x375, 1,088 images, 17 classes"


def auto_cfg(data: pathlib.Path, out: pathlib.Path, **train) -> RunConfig:
    # fp32: no precision trial (seconds of a test's time on a shared machine)
    train = {"precision": "fp32", **train}
    return RunConfig(data=DataConfig(path=str(data), seed=0), model=ModelConfig(name="auto"), train=TrainConfig(out=str(out), **train))


def test_default_budget_caps_a_first_run_and_says_so(tmp_path):
    data = make_class_folders(tmp_path / "d", per_class=4, size=12, mode="L")
    lines: list[str] = []
    cfg, record = choose_model(auto_cfg(data, tmp_path / "r"), tmp_path / "r", False, lines.append)
    assert cfg.model.name == "small_cnn" and cfg.data.img_size == 16  # tiny images train at 16 px, as the demo does
    assert cfg.train.time_budget == pytest.approx(auto.DEFAULT_BUDGET_MIN, abs=0.1) and cfg.train.epochs == 30  # a cap, not a target
    assert record["default_budget"] and record["candidates"] == [] and record["chosen"] == "small_cnn"
    assert any("--time-budget" in s for s in lines)
    assert lines[0].startswith("auto: 12x12 grey, 12 images, 3 classes -> small_cnn from scratch (fast recipe)")
    cfg, record = choose_model(auto_cfg(data, tmp_path / "r", epochs=2), tmp_path / "r", False, quiet)
    assert cfg.train.time_budget is None and cfg.train.epochs == 2 and not record["default_budget"]  # --epochs: exactly that


def test_tiny_grey_images_train_small_cnn_without_trying_the_probe(tmp_path, monkeypatch):
    data = make_class_folders(tmp_path / "d", per_class=12, size=12, mode="L", seed=3)

    def no_candidates(*a, **k):
        raise AssertionError("the data were clear: no candidate should be tried")

    monkeypatch.setattr(auto, "try_candidates", no_candidates)
    lines: list[str] = []
    run = fit(auto_cfg(data, tmp_path / "run", epochs=1, batch_size=8), progress=False, log=lines.append)
    meta = json.loads((run / "model.json").read_text())
    assert meta["arch"] == "small_cnn" and meta["preprocess"]["img_size"] == 16
    assert meta["auto"]["chosen"] == "small_cnn" and meta["auto"]["candidates"] == [] and "small images" in meta["auto"]["reason"]
    assert meta["auto"]["data"]["grey"] is True and meta["config"]["model"]["name"] == "small_cnn"  # --resume reloads a concrete model
    assert not any(s.startswith("features:") for s in lines)  # no pretrained features computed
    resumed = fit(auto_cfg(data, tmp_path / "run"), resume=True, progress=False, log=quiet)  # the checkpoint's config: small_cnn
    assert json.loads((resumed / "model.json").read_text())["auto"] == meta["auto"]  # the record survives a --resume


def test_few_colour_images_use_the_pretrained_probe(tmp_path):
    data = make_class_folders(tmp_path / "d", per_class=6, size=48, seed=4)
    cfg = auto_cfg(data, tmp_path / "run", epochs=1)
    run = fit(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, img_size=32)), progress=False, log=quiet)
    meta = json.loads((run / "model.json").read_text())
    assert meta["arch"] == "efficientnet_lite0" and meta["strategy"] == "linear-probe" and meta["preprocess"]["img_size"] == 32
    assert meta["auto"]["chosen"] == "efficientnet_lite0" and "few images" in meta["auto"]["reason"]


def test_pretrained_strategy_follows_the_image_count():
    """The probe alone for a few hundred images, then the last blocks too; the user's --strategy wins."""
    cfg = RunConfig(data=DataConfig(path="d"), model=ModelConfig(name="auto"))
    strategy = {n: auto.concrete_config(cfg, "efficientnet_lite0", profile(500, n)).model.strategy for n in (68, 1_360)}
    assert strategy == {68: "linear-probe", 1_360: "fine-tune-last"}
    multilabel = dataclasses.replace(profile(500, 1_360), multilabel=True)
    assert auto.concrete_config(cfg, "efficientnet_lite0", multilabel).model.strategy == "linear-probe"  # the probe alone
    asked = dataclasses.replace(cfg, model=ModelConfig(name="auto", strategy="fine-tune"))
    assert auto.concrete_config(asked, "efficientnet_lite0", profile(500, 1_360)).model.strategy == "fine-tune"
    m = auto.concrete_config(cfg, "efficientnet_lite0", profile(64, 1_360))
    assert m.model.pretrained and m.data.img_size == auto.TINY_PROBE_SIZE  # upscaled for ImageNet features, cheaper than 224
    assert auto.concrete_config(cfg, "efficientnet_lite0", profile(100, 1_360)).data.img_size == auto.SMALL_PROBE_SIZE


def test_unclear_data_try_both_candidates_and_keep_the_better(tmp_path, monkeypatch):
    """Both candidates are tried (their training stubbed: each is an ordinary fit into its own
    folder), the better one on validation is trained, and model.json says so."""
    monkeypatch.setattr(auto, "FEW_IMAGES", 0)  # 48 px colour images, no longer "few": not clear
    tried: list[tuple[str, RunConfig]] = []

    def fake_run(name, cfg, out, progress, log):
        tried.append((name, cfg))
        assert out.parent == tmp_path / "run" / auto.CANDIDATES_DIR
        out.mkdir(parents=True)
        score = {"efficientnet_lite0": 0.5, "small_cnn": 0.9}[cfg.model.name]
        return {"name": name, "model": cfg.model.name, "strategy": cfg.model.strategy, "val_acc": score, "seconds": 1.0}

    monkeypatch.setattr(auto, "run_candidate", fake_run)
    data = make_class_folders(tmp_path / "d", per_class=8, size=48, seed=5)
    lines: list[str] = []
    run = fit(auto_cfg(data, tmp_path / "run", epochs=1, batch_size=8), progress=False, log=lines.append)
    assert [(n, c.model.name, c.model.strategy) for n, c in tried] == [
        ("linear-probe", "efficientnet_lite0", "linear-probe"),
        ("small_cnn trial", "small_cnn", "auto"),
    ]
    assert tried[0][1].model.pretrained and tried[1][1].train.time_budget is not None  # the trial is time-boxed
    meta = json.loads((run / "model.json").read_text())
    rec = meta["auto"]
    assert [c["val_acc"] for c in rec["candidates"]] == [0.5, 0.9]
    assert (
        rec["chosen"] == "small_cnn" == meta["arch"]
        and "small_cnn trial validated best (0.9000 against linear-probe 0.5000)" in rec["reason"]
    )
    assert not (run / auto.CANDIDATES_DIR).exists()  # the candidates' folders are gone
    assert any(s.startswith("auto: 48x48 colour, 24 images, 3 classes -> small_cnn from scratch") for s in lines)


@pytest.mark.parametrize(("turned", "rotate"), [(0.88, True), (0.5, None)])
def test_turn_test_verdict_adds_quarter_turns_from_scratch(tmp_path, monkeypatch, turned, rotate):
    """The probe's turn test (training.orientation) decides whether the small_cnn trial and the run
    after it train with quarter turns; model.json keeps the test with the probe's record."""
    from imgcls.training.orientation import TurnTest

    monkeypatch.setattr(auto, "FEW_IMAGES", 0)
    tried: list[RunConfig] = []

    def fake_run(name, cfg, out, progress, log):
        tried.append(cfg)
        out.mkdir(parents=True)
        score = {"efficientnet_lite0": 0.5, "small_cnn": 0.9}[cfg.model.name]
        return {"name": name, "model": cfg.model.name, "strategy": cfg.model.strategy, "val_acc": score, "seconds": 1.0}

    monkeypatch.setattr(auto, "run_candidate", fake_run)
    monkeypatch.setattr(auto, "probe_turn_test", lambda *a: TurnTest(12, 0.9, turned))
    data = make_class_folders(tmp_path / "d", per_class=8, size=48, seed=5)
    lines: list[str] = []
    cfg, record = choose_model(auto_cfg(data, tmp_path / "run", epochs=1), tmp_path / "run", False, lines.append)
    assert tried[1].train.augment.rotate is rotate and cfg.train.augment.rotate is rotate
    assert record["candidates"][0]["turn_test"] == {"images": 12, "upright_acc": 0.9, "turned_acc": turned, "no_upright": bool(rotate)}
    assert any("quarter turns" in s for s in lines) is bool(rotate)
    told = dataclasses.replace(auto_cfg(data, tmp_path / "run", epochs=1), train=TrainConfig(out="x", augment=AugmentSpec(rotate=False)))
    assert auto.concrete_config(told, "small_cnn", profile(64, 24_300), rotate=True).train.augment.rotate is False  # --no-rotate wins


def test_short_budget_keeps_the_winning_candidate(tmp_path, monkeypatch):
    """Both candidates really trained; the time left in a short budget would not train a better
    model, so the winner is moved into the run folder as it is: loadable, predicting, its model.json
    saying which candidate it is, and no second run."""
    import imgcls

    monkeypatch.setattr(auto, "FEW_IMAGES", 0)  # not clear from the data: both candidates
    data = make_class_folders(tmp_path / "d", per_class=8, size=48, seed=5)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "bad_files.csv").write_text("stale\n")  # left by an earlier run: removed
    lines: list[str] = []
    cfg = auto_cfg(data, tmp_path / "run", epochs=2, batch_size=8, time_budget=0.05)
    run = fit(cfg, progress=False, log=lines.append, overwrite=True)
    meta = json.loads((run / "model.json").read_text())
    rec = meta["auto"]
    assert [c["name"] for c in rec["candidates"]] == ["linear-probe", "small_cnn trial"]
    best = max(rec["candidates"], key=lambda c: c["val_acc"])
    assert rec["kept_candidate"] == best["name"] and meta["arch"] == best["model"] == rec["chosen"]
    assert meta["config"]["train"]["out"] == str(run) and "dir" not in best
    assert not (run / auto.CANDIDATES_DIR).exists() and not (run / "bad_files.csv").exists()
    assert any(s.startswith("auto: kept the ") for s in lines)
    assert len(imgcls.load(str(run)).predict(str(next(data.rglob("*.png"))))["top_k"]) >= 1


def test_from_scratch_size_and_flips_follow_the_data():
    """28 px trains at 28 (not upscaled to 32); small grey scans (digits, letters) are not mirrored;
    colour thumbnails keep small_cnn's 32 px and their flips; the user's --img-size wins."""
    cfg = RunConfig(data=DataConfig(path="d"), model=ModelConfig(name="auto"))
    mnist = auto.concrete_config(cfg, "small_cnn", profile(28, 54_000, grey=True))
    assert mnist.data.img_size == 28 and mnist.train.augment.hflip is False
    cifar = auto.concrete_config(cfg, "small_cnn", profile(32, 45_000))
    assert cifar.data.img_size is None and cifar.train.augment.hflip is True
    assert auto.concrete_config(cfg, "small_cnn", profile(24, 5_000)).data.img_size == 24
    given = dataclasses.replace(cfg, data=DataConfig(path="d", img_size=32))
    assert auto.concrete_config(given, "small_cnn", profile(28, 54_000, grey=True)).data.img_size == 32


def test_keep_candidate_rule():
    probe = {"model": "efficientnet_lite0", "seconds": 60.0}
    trial = {"model": "small_cnn", "seconds": 60.0}
    assert auto.keep_candidate(probe, 100) and not auto.keep_candidate(probe, 130)  # a probe again and an epoch
    assert auto.keep_candidate(trial, 70) and not auto.keep_candidate(trial, 80)


def test_explicit_model_is_unchanged(tmp_path):
    from imgcls.cli import build_parser

    assert build_parser().parse_args(["train", "d", "--out", "r"]).model == "auto"
    cfg = RunConfig(data=DataConfig(path="d"), model=ModelConfig(name="small_cnn"), train=TrainConfig(out="r"))
    assert choose_model(cfg, tmp_path, False, quiet) == (cfg, None)  # nothing read, nothing decided, no default budget


def test_fine_tune_keeps_the_probe_when_fine_tuning_is_worse(tmp_path):
    """A learning rate of 10 wrecks the network in one epoch; the probe it started from is kept."""
    from imgcls.artifact import load_artifact
    from imgcls.models import create_model

    data = make_class_folders(tmp_path / "d", per_class=10, size=32, seed=6)
    cfg = RunConfig(
        data=DataConfig(path=str(data), img_size=32, val_fraction=0.3, seed=0),
        model=ModelConfig(name="efficientnet_lite0", pretrained=True, strategy="fine-tune"),
        train=TrainConfig(out=str(tmp_path / "run"), epochs=1, lr=10.0, warmup_epochs=0.0, batch_size=7, precision="fp32"),
    )
    lines: list[str] = []
    run = fit(cfg, progress=False, log=lines.append)
    meta = json.loads((run / "model.json").read_text())
    assert meta["training"]["kept"] == "linear-probe" and meta["training"]["best_epoch"] == 0
    assert any("keeping the probe's model" in s for s in lines)
    kept, _ = load_artifact(run)
    start = create_model("efficientnet_lite0", num_classes=3, pretrained=True).state_dict()
    head = "_fc."
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in start.items() if not k.startswith(head))  # the frozen backbone
    assert meta["metrics"]["val"]["accuracy"] >= 0.9  # the probe's score, not the wrecked epoch's


def test_long_runs_announce_their_estimate():
    lines: list[str] = []
    announce_estimate(90.0, 3, 30.0, lines.append)
    assert lines == []  # short: nothing to say
    announce_estimate(3000.0, 30, 100.0, lines.append, "; --time-budget MINUTES caps it")
    assert lines == ["estimate: this run takes about 50.0 minutes (30.0 epochs of about 100s); --time-budget MINUTES caps it"]


def ftl_cfg(tmp_path: pathlib.Path, **train) -> RunConfig:
    data = make_class_folders(tmp_path / "d", per_class=10, size=32, seed=7)
    return RunConfig(
        data=DataConfig(path=str(data), img_size=32, val_fraction=0.3, seed=0),
        model=ModelConfig(name="efficientnet_lite0", pretrained=True, strategy="fine-tune-last"),
        train=TrainConfig(out=str(tmp_path / "run"), precision="fp32", **train),
    )


def test_fine_tune_last_trains_the_last_blocks_on_cached_activations(tmp_path):
    from imgcls.artifact import load_artifact
    from imgcls.models import create_model
    from imgcls.report import read_history
    from imgcls.training.partial import TAIL_BLOCKS

    lines: list[str] = []
    run = fit(ftl_cfg(tmp_path, epochs=2), progress=False, log=lines.append)
    assert any(s.startswith("fine-tune-last: cached early-block activations (112, 2, 2) of 51 images") for s in lines)  # 21 x 2 + 9
    assert sum("last blocks:" in s for s in lines) == 2
    assert [r["epoch"] for r in read_history(run)] == [1, 2, 3]  # the probe, then two epochs of the last blocks
    meta = json.loads((run / "model.json").read_text())
    assert meta["strategy"] == "fine-tune-last" and meta["training"]["kept"] in ("linear-probe", "epoch 2", "epoch 3")
    kept, _ = load_artifact(run)
    start = create_model("efficientnet_lite0", num_classes=3, pretrained=True).state_dict()
    first_tail = len(kept._blocks) - TAIL_BLOCKS
    early = [k for k in start if k.startswith(("_conv_stem", "_bn0")) or (k.startswith("_blocks.") and int(k.split(".")[1]) < first_tail)]
    assert early and all(torch.equal(kept.state_dict()[k], start[k]) for k in early)  # frozen, BatchNorm statistics too


def test_fine_tune_last_keeps_the_probe_when_worse(tmp_path):
    lines: list[str] = []
    run = fit(ftl_cfg(tmp_path, epochs=1, lr=10.0), progress=False, log=lines.append)
    meta = json.loads((run / "model.json").read_text())
    assert meta["training"]["kept"] == "linear-probe" and any("keeping the probe's model" in s for s in lines)
    assert meta["metrics"]["val"]["accuracy"] >= 0.9
