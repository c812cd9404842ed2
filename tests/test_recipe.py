"""Tests for the fast from-scratch recipe (imgcls.training.recipes), the airbench-style small_cnn,
TTA and the inference-model preparation in imgcls.runtime."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest
import torch
from torch import nn

from imgcls.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from imgcls.models import create_model
from imgcls.runtime import batched_logits, prepare_inference_model, resolve_tta, tta_logits, tta_views
from imgcls.training.optim import build_optimizer, param_groups
from imgcls.training.recipes import Lookahead, Recipe, airbench_lr, fast_batch_size, init_whitening, resolve_recipe, whiten_bias_trains
from imgcls.training.schedule import Schedule, lr_factor
from imgcls.transforms import AugmentSpec, PreprocessSpec
from synth import make_split_folders


def quiet(_: str) -> None:
    """fit()'s log callback, silenced."""


def fast_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The optimizer fit builds for `recipe` when training from scratch."""
    return build_optimizer(recipe, param_groups(model, recipe, "full"))


def schedule_of(recipe: Recipe, steps_per_epoch: int, total_steps: int) -> Schedule:
    return Schedule(recipe.schedule, recipe.warmup_epochs, recipe.warmup_fraction, steps_per_epoch, total_steps)


# ----------------------------------------------------------------------------- the network


@pytest.mark.parametrize("size", [8, 12, 16, 28, 32, 64, 96])
@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_small_cnn_any_size_and_class_count(size, num_classes):
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()
    out.sum().backward()
    assert model.fc.weight.grad is not None and torch.isfinite(model.fc.weight.grad).all()


def test_frozen_parameters_and_bn_settings():
    model = create_model("small_cnn", 10)
    assert model.whiten.weight.shape == (24, 3, 2, 2)
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6
    for bn in bns:
        assert not bn.weight.requires_grad and bn.bias.requires_grad
        assert torch.all(bn.weight == 1) and bn.momentum == pytest.approx(0.4)


def test_whitening_decorrelates_patches():
    torch.manual_seed(0)
    # correlated colour channels, like real images
    base = torch.randn(64, 1, 16, 16)
    x = torch.cat([base + 0.3 * torch.randn(64, 1, 16, 16) for _ in range(3)], dim=1)
    model = create_model("small_cnn", 3)
    model.init_whitening(x, eps=1e-6)
    with torch.no_grad():
        y = nn.functional.conv2d(x, model.whiten.weight[:12])  # (N, 12, 15, 15), no bias
    flat = y.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = flat.T @ flat / len(flat)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])


def test_whitening_on_grey_images_is_finite():
    grey = torch.rand(20, 1, 10, 10).repeat(1, 3, 1, 1)  # decoded greyscale: three equal channels
    model = create_model("small_cnn", 2)
    model.init_whitening(grey)
    assert torch.isfinite(model.whiten.weight).all()
    assert torch.isfinite(model(grey)).all()


def test_whitening_on_grey_images_gives_every_channel_signal_and_trains_in_bf16():
    """Grey images vary in 4 of the 12 patch directions; a filter for one of the other 8 would
    output a constant that BatchNorm turns into exploding gradients (MNIST went to NaN in bf16)."""
    torch.manual_seed(0)
    grey = (torch.rand(64, 1, 16, 16) > 0.7).float().repeat(1, 3, 1, 1) * 4 - 2  # strokes on a flat background
    model = create_model("small_cnn", 3).to(memory_format=torch.channels_last)
    model.init_whitening(grey)
    with torch.no_grad():
        out = nn.functional.conv2d(grey, model.whiten.weight)  # (N, 24, 15, 15)
    assert (out.std(dim=(0, 2, 3)) > 0.1).all()  # no dead channel
    opt = fast_optimizer(model, resolve_recipe(TrainConfig(), ModelConfig(), AugmentSpec(hflip=False), 64))
    labels = torch.randint(0, 3, (64,))
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(grey.contiguous(memory_format=torch.channels_last)).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_init_whitening_from_uint8_cache():
    images = torch.randint(0, 256, (40, 20, 20, 3), dtype=torch.uint8)  # (N, S, S, 3) with S > img_size
    model = create_model("small_cnn", 4)
    before = model.whiten.weight.clone()
    assert init_whitening(model, images, PreprocessSpec(img_size=16, crop_pct=0.8))
    assert not torch.equal(before, model.whiten.weight)
    assert not init_whitening(nn.Linear(2, 2), images, PreprocessSpec(img_size=16))  # no whitening layer: nothing done


# ----------------------------------------------------------------------------- recipe resolution


def test_auto_recipe_is_fast_for_small_cnn_from_scratch():
    r = resolve_recipe(TrainConfig(), ModelConfig(name="small_cnn"), AugmentSpec(), num_train=50_000)
    assert r.name == "fast" and r.optimizer == "sgd" and r.momentum == 0.85 and r.label_smoothing == 0.2
    assert r.schedule == "triangle" and r.lookahead and r.bias_lr_scale == 64 and r.tta == "flip-translate"
    assert r.batch_size == 256 and r.lr == pytest.approx(airbench_lr(256, 0.85)) == pytest.approx(11.5 / 1024 / (1 + 1 / 0.15) * 256)
    assert resolve_recipe(TrainConfig(), ModelConfig(name="resnet18"), AugmentSpec(), 50_000).name == "generic"
    assert resolve_recipe(TrainConfig(), ModelConfig(name="small_cnn", weights="w.pth"), AugmentSpec(), 50_000).name == "generic"
    assert resolve_recipe(TrainConfig(recipe="generic"), ModelConfig(), AugmentSpec(), 50_000).optimizer == "adamw"


def test_user_settings_override_the_recipe():
    given = {"lr": 0.1, "batch_size": 64, "momentum": 0.9, "label_smoothing": 0.0}
    given |= {"schedule": "cosine", "optimizer": "adamw", "weight_decay": 0.01}
    r = resolve_recipe(TrainConfig(**given, warmup_epochs=2), ModelConfig(), AugmentSpec(), 50_000)
    assert r.name == "fast"
    assert {k: getattr(r, k) for k in given} == given
    assert schedule_of(r, steps_per_epoch=10, total_steps=100).warmup_steps == 20


def test_no_flip_training_recommends_translate_tta():
    assert resolve_recipe(TrainConfig(), ModelConfig(), AugmentSpec(hflip=False), 1000).tta == "translate"


def test_fast_batch_size_keeps_16_steps_per_epoch():
    assert fast_batch_size(50_000) == 256
    assert fast_batch_size(1_437) == 64
    assert fast_batch_size(30) == 32
    assert airbench_lr(16, 0.85) == airbench_lr(256, 0.85)  # small batches keep the 256-image rate
    assert airbench_lr(1024, 0.85) == pytest.approx(4 * airbench_lr(256, 0.85))


def test_triangle_schedule():
    assert lr_factor(0, 100, 23, "triangle") == pytest.approx(0.2)
    assert lr_factor(23, 100, 23, "triangle") == pytest.approx(1.0)
    assert lr_factor(100, 100, 23, "triangle") == pytest.approx(0.07)
    f = [lr_factor(s, 100, 23, "triangle") for s in range(101)]
    assert max(f) == pytest.approx(1.0) and all(a <= b for a, b in zip(f[:23], f[1:24])) and all(a >= b for a, b in zip(f[23:], f[24:]))


def test_optimizer_groups_scale_bias_lr_and_keep_decay_per_step():
    model = create_model("small_cnn", 10)
    r = resolve_recipe(TrainConfig(), ModelConfig(), AugmentSpec(), 50_000)
    opt = fast_optimizer(model, r)
    base, norm = opt.param_groups
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    assert norm["lr"] == pytest.approx(64 * base["lr"]) and base["lr"] == pytest.approx(r.lr)
    assert norm["lr"] * norm["weight_decay"] == pytest.approx(base["lr"] * base["weight_decay"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    assert id(model.whiten.weight) not in trainable


def test_whiten_bias_trains_for_the_first_30_percent():
    r = resolve_recipe(TrainConfig(), ModelConfig(), AugmentSpec(), 50_000)
    assert [whiten_bias_trains(r, e, 10) for e in range(10)] == [True] * 3 + [False] * 7
    assert whiten_bias_trains(r, 0, 1)


# ----------------------------------------------------------------------------- lookahead


def test_lookahead_averages_and_resets_the_weights():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    la = Lookahead(model, every=5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    la.update(step=0, total_steps=10, epoch_end=False)  # not an update step
    assert torch.all(model.weight == 1.0)
    la.update(step=4, total_steps=10, epoch_end=False)  # decay 0.95^5 * 0.5^3
    decay = 0.95**5 * 0.5**3
    assert torch.allclose(model.weight, torch.full((1, 2), 1 - decay))
    assert torch.allclose(la.ema["weight"], model.weight)
    with torch.no_grad():
        model.weight.fill_(5.0)
    la.update(step=9, total_steps=10, epoch_end=True)  # last step: the EMA is copied in
    assert torch.allclose(model.weight, torch.full((1, 2), 1 - decay))


# ----------------------------------------------------------------------------- TTA


def test_tta_views_and_weights():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    for mode, n in (("none", 1), ("flip", 2), ("translate", 3), ("flip-translate", 6), ("rotate", 4), ("dihedral", 8)):
        views, weights = tta_views(x, mode)
        assert len(views) == len(weights) == n and sum(weights) == pytest.approx(1.0)
        assert all(v.shape == x.shape for v in views)
    views, _ = tta_views(x.to(torch.uint8), "flip-translate")
    assert all(v.dtype == torch.uint8 for v in views)
    assert torch.equal(views[2], nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")[..., :5, :5].to(torch.uint8))
    turned, _ = tta_views(x, "dihedral")  # the eight symmetries of the square, each once
    assert torch.equal(turned[1], x.rot90(1, dims=(-2, -1))) and torch.equal(turned[4], x.flip(-1))
    assert len({tuple(v[0, 0].flatten().tolist()) for v in turned}) == 8
    with pytest.raises(ValueError):
        tta_views(x, "sideways")


def test_tta_logits_match_batched_logits_and_keep_shapes():
    torch.manual_seed(0)
    model = create_model("small_cnn", 5).eval()
    spec = PreprocessSpec(img_size=16)
    images = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    for mode in ("none", "flip", "translate", "flip-translate", "dihedral"):
        a = batched_logits(model, images, spec, batch_size=4, tta=mode)
        b = tta_logits(lambda arr: batched_logits(model, arr, spec, batch_size=4), images, mode)
        assert a.shape == (7, 5) and torch.allclose(a, b, atol=1e-5)
    flat = np.full((3, 16, 16, 3), 128, dtype=np.uint8)  # a flat image looks the same in every view
    assert torch.allclose(batched_logits(model, flat, spec, tta="flip-translate"), batched_logits(model, flat, spec), atol=1e-5)


def test_resolve_tta():
    assert resolve_tta("auto", {"tta": "translate"}) == "translate"
    assert resolve_tta(None, {}) == "none"
    assert resolve_tta("flip", {"tta": "translate"}) == "flip"
    with pytest.raises(ValueError):
        resolve_tta("sideways", {})


# ----------------------------------------------------------------------------- inference model


def test_prepare_inference_model_converts_once_to_bf16():
    torch.manual_seed(0)
    model = create_model("small_cnn", 3).eval()
    spec = PreprocessSpec(img_size=16)
    images = np.random.default_rng(1).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    ref = batched_logits(model, images, spec)
    fast, amp = prepare_inference_model(model, torch.device("cpu"), torch.bfloat16)
    assert amp is None and all(p.dtype == torch.bfloat16 for p in fast.parameters())
    out = batched_logits(fast, images, spec, amp_dtype=amp)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=0.05, rtol=0.05)
    same, amp32 = prepare_inference_model(create_model("small_cnn", 3), torch.device("cpu"), None)
    assert amp32 is None and all(p.dtype == torch.float32 for p in same.parameters())


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    from imgcls.training.fit import fit

    base = tmp_path_factory.mktemp("fast")
    data = make_split_folders(base / "data", per_split={"train": 16, "valid": 6, "test": 6}, size=24, seed=2)
    train = TrainConfig(out=str(base / "run"), epochs=3, augment=AugmentSpec(crop="translate"))
    cfg = RunConfig(data=DataConfig(path=str(data), img_size=16, seed=0), train=train)
    return fit(cfg, progress=False, log=quiet), data


def test_fit_records_the_recipe_and_tta(fast_run):
    run, _ = fast_run
    meta = json.loads((run / "model.json").read_text())
    assert meta["recipe"]["name"] == "fast" and meta["tta"] == "flip-translate"
    assert meta["config"]["train"]["recipe"] == "auto" and meta["config"]["train"]["lr"] is None  # the request, not the resolution
    assert meta["metrics"]["test"]["accuracy"] >= 0.6  # chance is 1/3


def test_evaluate_and_predict_use_the_same_tta(fast_run):
    from imgcls.evaluate import evaluate
    from imgcls.predict import Classifier

    run, data = fast_run
    m = evaluate(run, data, split="test", progress=False, log=quiet, out_dir=run / "eval-test")
    assert m["tta"] == "flip-translate"
    clf = Classifier.load(run)
    assert clf.tta == "flip-translate"
    preds = [r["label"] for r in clf.predict(m["predictions"]["paths"])]
    names = json.loads((run / "model.json").read_text())["class_names"]
    assert preds == [names[i] for i in m["predictions"]["predicted"]]
    m_none = evaluate(run, data, split="test", tta="none", progress=False, log=quiet, out_dir=run / "eval-none")
    assert m_none["tta"] == "none" and Classifier.load(run, tta="none").tta == "none"


def test_train_one_epoch_follows_the_schedule_and_ends_with_it():
    """The loop sets each step's rate from the Schedule, asks it before every step after the first
    whether the time budget allows another, and stops where a (shortened) schedule ends."""
    from imgcls.training.loop import StepOptions, TrainData, train_one_epoch

    torch.manual_seed(0)
    model = create_model("small_cnn", 3).to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD([{"params": trainable, "lr": 0.01, "initial_lr": 0.01}])
    images = torch.randint(0, 256, (64, 16, 16, 3), dtype=torch.uint8)  # (N, S, S, 3): 8 batches of 8
    data = TrainData(images, torch.randint(0, 3, (64,)), PreprocessSpec(img_size=16), AugmentSpec(crop="translate"), 8)
    options = StepOptions(torch.device("cpu"))
    asked: list[int] = []

    class OutOfTime(Schedule):  # a budget that runs out before step 2
        def keep_going(self, step: int) -> bool:
            asked.append(step)
            return step < 2

    loss_fn = nn.CrossEntropyLoss()
    stats = train_one_epoch(model, opt, loss_fn, data, torch.Generator().manual_seed(0), options, OutOfTime("constant", None, 0.0, 8, 100))
    assert stats.steps == 2 and stats.images == 16 and asked == [1, 2]  # one step always runs

    seen: list[tuple[int, int, bool]] = []

    class Recorded(Lookahead):
        def update(self, step: int, total_steps: int, epoch_end: bool) -> None:
            seen.append((step, total_steps, epoch_end))

    short = Schedule("cosine", None, 0.0, 8, total_steps=3)  # the last, partial epoch of a budgeted run
    stats = train_one_epoch(model, opt, loss_fn, data, torch.Generator().manual_seed(0), options, short, 0, Recorded(model))
    assert stats.steps == 3 and seen == [(0, 3, False), (1, 3, False), (2, 3, True)]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * lr_factor(2, 3, 0, "cosine")) == pytest.approx(0.0025)
    stats = train_one_epoch(model, opt, loss_fn, data, torch.Generator().manual_seed(0), options)  # no schedule: rates left alone
    assert stats.steps == 8 and opt.param_groups[0]["lr"] == pytest.approx(0.0025)


def fake_step_seconds(monkeypatch: pytest.MonkeyPatch, seconds_per_step) -> None:
    """Replace the measured seconds per training step, in the precision trial and in the budget's plan."""
    import imgcls.training.measure as measure_mod
    import imgcls.training.plan as plan_mod

    monkeypatch.setattr(measure_mod, "time_train_steps", seconds_per_step)
    monkeypatch.setattr(plan_mod, "time_train_steps", seconds_per_step)


def test_time_budget_behind_plan_shortens_the_decay_instead_of_stopping_at_peak_lr(tmp_path, monkeypatch):
    """The plan is measured on a few steps; when the run then goes slower (a busy machine), the
    schedule is shortened as it goes so that the learning rate still ends near zero, within the budget."""
    import time

    import imgcls.training.loop as loop_mod
    from imgcls.training.fit import fit

    data = make_split_folders(tmp_path / "data", per_split={"train": 40, "valid": 4}, size=16, seed=0)
    fake_step_seconds(monkeypatch, lambda *a, **k: 1e-4)  # the plan believes steps are nearly free
    real_step = loop_mod.train_transform

    def slow_transform(*a, **k):  # ...and each step then takes 40 ms
        time.sleep(0.04)
        return real_step(*a, **k)

    monkeypatch.setattr(loop_mod, "train_transform", slow_transform)
    cfg = RunConfig(
        data=DataConfig(path=str(data), img_size=16, seed=0),
        train=TrainConfig(
            out=str(tmp_path / "run"), time_budget=0.25, batch_size=16, epochs=1000, patience=0, threads=1
        ),  # threads: no re-check trial
    )
    t0 = time.perf_counter()
    run = fit(cfg, progress=False, log=quiet)
    wall = time.perf_counter() - t0
    assert wall < 0.25 * 60 + 3
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    lrs = [float(r.split(",")[header.index("lr")]) for r in rows[1:]]
    assert len(lrs) >= 3
    assert lrs[-1] < 0.1 * max(lrs), lrs  # the decay ran to its end
    meta = json.loads((run / "model.json").read_text())
    assert meta["training"]["epochs_run"] == len(lrs)


def test_generic_batch_shrinks_for_large_inputs_on_cpu_only():
    from imgcls.training.recipes import generic_batch_size

    assert generic_batch_size(32, "cpu") == 128 and generic_batch_size(64, "cpu") == 128
    assert generic_batch_size(96, "cpu") == 32 and generic_batch_size(224, "cpu") == 32
    assert generic_batch_size(224, "cuda") == 128
    r = resolve_recipe(TrainConfig(), ModelConfig(name="resnet18"), AugmentSpec(), 5000, img_size=224, device_type="cpu")
    assert r.batch_size == 32
    assert resolve_recipe(TrainConfig(batch_size=100), ModelConfig(name="resnet18"), AugmentSpec(), 5000, img_size=224).batch_size == 100


def test_time_budget_narrows_small_cnn_when_the_full_width_gets_too_few_epochs(tmp_path, monkeypatch):
    """Under a budget that buys the full network fewer than MIN_BUDGET_EPOCHS (or the --epochs cap),
    fit trains the widest narrower small_cnn that gets them; the widths go into model.json and the
    checkpoint, so the model folder loads and --resume rebuilds the same network."""
    from imgcls.artifact import load_artifact
    from imgcls.training.checkpoint import read_checkpoint
    from imgcls.training.fit import fit

    data = make_split_folders(tmp_path / "data", per_split={"train": 40, "valid": 4}, size=16, seed=0)

    def step_seconds(model, *args, **kwargs):  # the full width looks slow, narrower ones free
        # 120 images, 8 steps an epoch at 1.45 s: ~2.2 of the 3 capped epochs fit the 30 s budget,
        # and the next width (1.78x fewer FLOPs) could reach 3, so it is timed, and wins
        return 1.45 if model.blocks[0].conv1.out_channels == 64 else 1e-4

    fake_step_seconds(monkeypatch, step_seconds)
    lines: list[str] = []
    cfg = RunConfig(
        data=DataConfig(path=str(data), img_size=16, seed=0),
        train=TrainConfig(out=str(tmp_path / "run"), time_budget=0.5, batch_size=16, epochs=3),
    )
    run = fit(cfg, progress=False, log=lines.append)
    meta = json.loads((run / "model.json").read_text())
    assert meta["model_kwargs"] == {"widths": [48, 192, 192]}, [s for s in lines if "budget" in s]
    assert any("narrowed to widths [48, 192, 192]" in s for s in lines)
    model, _ = load_artifact(run)
    assert model.blocks[0].conv1.out_channels == 48
    assert read_checkpoint(run)[1].model_kwargs == {"widths": [48, 192, 192]}

    # the same budget with the cap already binding at full width: no narrowing
    fake_step_seconds(monkeypatch, lambda *a, **k: 1e-4)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out=str(tmp_path / "run2")))
    meta = json.loads((fit(cfg, progress=False, log=quiet) / "model.json").read_text())
    assert meta["model_kwargs"] == {}
