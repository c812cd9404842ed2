"""Tests for the fast recipe's options (issue 17): Muon for the conv filters (training.muon), progressive
resizing, selective TTA (runtime.tta_logits), small_cnn's SiLU; their config, CLI flags, model.json
record, and a resume with all of them on that matches an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import imgcls.training.fit as fit_mod
from conftest import quiet
from imgcls.artifact import load_artifact
from imgcls.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from imgcls.models import create_model
from imgcls.runtime import tta_logits
from imgcls.training.checkpoint import CHECKPOINT_FILE, TrainState, load_checkpoint, save_checkpoint
from imgcls.training.fit import fit
from imgcls.training.loop import StepOptions, TrainData, train_one_epoch
from imgcls.training.muon import MuonSGD, orthogonalize
from imgcls.training.optim import build_optimizer, param_groups
from imgcls.training.recipes import resolve_recipe, train_size
from imgcls.transforms import AugmentSpec, PreprocessSpec
from interrupt import interrupt_epoch
from synth import make_class_folders

# ----------------------------------------------------------------------------- Muon


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (8, 8)])
def test_orthogonalize_brings_every_singular_value_near_one(shape, dtype):
    torch.manual_seed(0)
    r = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], r))
    v, _ = torch.linalg.qr(torch.randn(shape[1], r))
    g = u @ torch.diag(torch.logspace(-1, 0, r)) @ v.T  # singular values spread over a decade
    out = orthogonalize(g, dtype=dtype)
    assert out.dtype == torch.float32 and out.shape == g.shape
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.5 and s.max() < 1.3, s  # 3 quintic steps: about [0.7, 1.2], the spread is what Muon removes


def muon_recipe(**kw):
    aug = AugmentSpec(crop="translate").resolve(16)
    return resolve_recipe(TrainConfig(recipe="fast", optimizer="muon", **kw), ModelConfig(), aug, num_train=64)


def test_muon_takes_exactly_the_trainable_conv_filters():
    model = create_model("small_cnn", 3, widths=(8, 16, 16))
    opt = build_optimizer(muon_recipe(), param_groups(model, muon_recipe(), "full"))
    assert isinstance(opt, MuonSGD)
    muon = [g for g in opt.param_groups if g["muon"]]
    assert len(muon) == 1 and muon[0]["lr"] == 0.24 and muon[0]["momentum"] == 0.6 and muon[0]["weight_decay"] == 0.0
    filters = {id(p) for p in model.parameters() if p.ndim == 4 and p.requires_grad}
    assert {id(p) for p in muon[0]["params"]} == filters and id(model.whiten.weight) not in filters  # frozen whitening left out
    sgd = [p for g in opt.param_groups if not g["muon"] for p in g["params"]]
    assert all(p.ndim < 4 for p in sgd) and any(p is model.fc.weight for p in sgd)
    assert not opt.param_groups[0]["muon"] and opt.param_groups[0]["momentum"] == 0.85  # metrics.csv logs the SGD base rate


def toy_problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(32, 3, 8, 8)
    return model, x, (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()  # 4 classes from the input


def toy_optimizer(model: nn.Module) -> MuonSGD:
    filters = [p for p in model.parameters() if p.ndim == 4]
    rest = [p for p in model.parameters() if p.ndim < 4]
    return MuonSGD([{"params": filters, "lr": 0.1, "muon": True, "momentum": 0.6}, {"params": rest, "lr": 0.05}], lr=0.05, momentum=0.85)


def test_muon_decreases_the_loss_and_keeps_filters_at_unit_mean_norm():
    model, x, y = toy_problem()
    opt = toy_optimizer(model)
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    for p in (model[0].weight, model[2].weight):
        assert p.norm().item() == pytest.approx(len(p) ** 0.5, rel=0.15)  # renormalised before each step, moved by about lr since


def test_muon_refuses_a_bias_in_a_muon_group():
    with pytest.raises(ValueError, match="Muon groups take matrices"):
        MuonSGD([{"params": [nn.Parameter(torch.zeros(3))], "muon": True}], lr=0.1, momentum=0.9)


def test_muon_state_survives_a_checkpoint(tmp_path):
    model, x, y = toy_problem()
    opt = toy_optimizer(model)
    for _ in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    cfg = RunConfig(data=DataConfig(path="DATA"), train=TrainConfig(out=str(tmp_path), epochs=2, optimizer="muon"))
    save_checkpoint(tmp_path / CHECKPOINT_FILE, model, opt, TrainState(2, 10, "float32"), cfg.to_dict())
    fresh, _, _ = toy_problem(seed=1)
    fresh_opt = toy_optimizer(fresh)
    load_checkpoint(tmp_path / CHECKPOINT_FILE, fresh, fresh_opt)
    assert fresh_opt.param_groups[0]["muon"] and fresh_opt.param_groups[0]["momentum"] == 0.6
    for m, o in ((model, opt), (fresh, fresh_opt)):  # one more step each: the momentum buffers must agree
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- progressive resizing


def test_train_size_schedule():
    r = dataclasses.replace(muon_recipe(), progressive_resize=0.5)
    assert [train_size(r, e, 5, 32) for e in range(5)] == [24, 24, 24, None, None]
    assert train_size(r, 0, 1, 32) is None  # a one-epoch run trains at the evaluated size
    assert train_size(dataclasses.replace(r, progressive_resize=0.0), 0, 5, 32) is None


def test_a_smaller_train_size_trains_small_batches_and_the_model_still_runs_at_full_size():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 32, 32, 3), dtype=torch.uint8)
    labels = torch.randint(0, 3, (32,))
    spec = PreprocessSpec(img_size=32, resize_mode="crop", crop_pct=1.0, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = create_model("small_cnn", 3, widths=(8, 16, 16))
    seen: list[tuple[int, ...]] = []
    model.whiten.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[-2:])))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    data = TrainData(images, labels, spec, AugmentSpec(crop="translate"), 16, train_size=24)
    stats = train_one_epoch(model, opt, nn.CrossEntropyLoss(), data, torch.Generator().manual_seed(0), StepOptions(torch.device("cpu")))
    assert stats.steps == 2 and seen == [(24, 24), (24, 24)] and math.isfinite(stats.loss)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


# ----------------------------------------------------------------------------- selective TTA


def fake_run(images) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> logits (N, 2) that depend on the view: its mean in the left half against the right."""
    x = torch.as_tensor(images).float()  # (N, S, S, 3)
    half = x.shape[2] // 2
    return torch.stack([x[:, :, :half].mean((1, 2, 3)), x[:, :, half:].mean((1, 2, 3))], 1) / 10


def test_selective_tta_is_full_tta_at_one_plain_at_zero_and_mixes_the_least_confident_in_between():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (10, 8, 8, 3), dtype=torch.uint8).numpy()
    plain, full = fake_run(images), tta_logits(fake_run, images, "flip-translate")
    assert not torch.allclose(plain, full)
    torch.testing.assert_close(tta_logits(fake_run, images, "flip-translate", select=1.0), full)
    torch.testing.assert_close(tta_logits(fake_run, images, "flip-translate", select=0.0), plain)
    mixed = tta_logits(fake_run, images, "flip-translate", select=0.3)
    least = set(plain.softmax(1).amax(1).argsort()[:3].tolist())  # ceil(0.3 * 10) least confident images
    for i in range(10):
        torch.testing.assert_close(mixed[i], full[i] if i in least else plain[i])


def test_selective_tta_reads_confidence_from_the_logit_columns_only():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8).numpy()

    def with_features(a) -> torch.Tensor:  # (N, F + C): 3 feature columns, then the logits
        logits = fake_run(a)
        features = torch.as_tensor(a).float().mean((1, 2)) * 100  # (N, 3): large, a softmax over them would pick other images
        return torch.cat([features, logits], 1)

    mixed = tta_logits(with_features, images, "flip", select=0.5, logit_cols=2)
    least = set(fake_run(images).softmax(1).amax(1).argsort()[:3].tolist())
    full, plain = tta_logits(with_features, images, "flip"), with_features(images)
    for i in range(6):
        torch.testing.assert_close(mixed[i], full[i] if i in least else plain[i])


# ----------------------------------------------------------------------------- config, CLI


def test_config_refuses_out_of_range_options():
    with pytest.raises(ValueError, match="progressive_resize"):
        TrainConfig(progressive_resize=1.0)
    with pytest.raises(ValueError, match="tta_select"):
        TrainConfig(tta_select=1.5)
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(activation="relu6")
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")


def test_cli_flags_reach_the_config():
    from imgcls.cli.commands import _run_config
    from imgcls.cli.parsers import build_parser

    argv = ["train", "DATA", "--out", "RUN", "--optimizer", "muon", "--activation", "silu", "--tta-select", "0.25", "--progressive-resize"]
    cfg = _run_config(build_parser().parse_args(argv))
    assert (cfg.train.optimizer, cfg.model.activation, cfg.train.tta_select, cfg.train.progressive_resize) == ("muon", "silu", 0.25, 0.5)
    cfg = _run_config(build_parser().parse_args(["train", "DATA", "--out", "RUN", "--progressive-resize", "0.3"]))
    assert cfg.train.progressive_resize == 0.3 and cfg.train.tta_select is None and cfg.model.activation is None


# ----------------------------------------------------------------------------- a run with every option, and its resume


def options_cfg(data: pathlib.Path, out: pathlib.Path) -> RunConfig:
    train = TrainConfig(
        out=str(out),
        epochs=3,
        batch_size=16,
        precision="fp32",
        deterministic=True,
        optimizer="muon",
        progressive_resize=0.6,
        tta_select=0.5,
        label_smoothing=0.1,
        augment=AugmentSpec(crop="translate", color_jitter=0.1),
    )
    return RunConfig(data=DataConfig(path=str(data), img_size=16, val_fraction=0.25), model=ModelConfig(activation="silu"), train=train)


@pytest.fixture(scope="module")
def options_run(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path, list[int | None]]:
    base = tmp_path_factory.mktemp("options")
    data = make_class_folders(base / "data", per_class=10, size=16, seed=7)
    sizes: list[int | None] = []
    real = fit_mod.train_one_epoch

    def recorded(*args, **kwargs):
        sizes.append(args[3].train_size)  # the epoch's TrainData
        return real(*args, **kwargs)

    fit_mod.train_one_epoch = recorded
    try:
        run = fit(options_cfg(data, base / "a"), progress=False, log=quiet)
    finally:
        fit_mod.train_one_epoch = real
    return data, run, sizes


def test_options_are_recorded_and_the_model_loads_back(options_run):
    _, run, sizes = options_run
    assert sizes == [12, 12, None]  # ceil(0.6 * 3) epochs at 3/4 of 16 px, the last at 16 px
    meta = json.loads((run / "model.json").read_text())
    recipe = meta["recipe"]
    assert (recipe["optimizer"], recipe["muon_lr"], recipe["muon_momentum"]) == ("muon", 0.24, 0.6)
    assert (recipe["progressive_resize"], recipe["tta_select"], recipe["label_smoothing"]) == (0.6, 0.5, 0.1)
    assert meta["tta_select"] == 0.5 and meta["model_kwargs"] == {"activation": "silu"} and meta["augment"]["color_jitter"] == 0.1
    model, _ = load_artifact(run)
    assert any(isinstance(m, nn.SiLU) for m in model.modules()) and not any(isinstance(m, nn.GELU) for m in model.modules())
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, meta["num_classes"] if "num_classes" in meta else len(meta["class_names"]))


def test_resume_with_muon_and_progressive_resizing_matches_an_uninterrupted_run(options_run, tmp_path, monkeypatch):
    data, run_a, _ = options_run
    out_b = tmp_path / "b"
    interrupt_epoch(monkeypatch, 3)  # the third epoch, the first at full size
    with pytest.raises(KeyboardInterrupt):
        fit(options_cfg(data, out_b), progress=False, log=quiet)
    monkeypatch.undo()
    fit(options_cfg(data, out_b), resume=True, progress=False, log=quiet)
    a, b = load_file(str(run_a / "model.safetensors")), load_file(str(out_b / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6)


def test_evaluate_and_predict_use_the_recorded_tta_select(options_run, tmp_path, monkeypatch):
    import numpy as np

    import imgcls.evaluate as evaluate_mod
    import imgcls.predict as predict_mod
    from imgcls.predict import Classifier

    data, run, _ = options_run
    seen: list[float] = []
    real_batched, real_tta = evaluate_mod.batched_logits, predict_mod.tta_logits

    def batched(*args, **kwargs):
        seen.append(kwargs["tta_select"])
        return real_batched(*args, **kwargs)

    def tta(run_fn, images, mode, select=1.0, logit_cols=None):
        seen.append(select)
        return real_tta(run_fn, images, mode, select, logit_cols)

    monkeypatch.setattr(evaluate_mod, "batched_logits", batched)
    monkeypatch.setattr(predict_mod, "tta_logits", tta)
    metrics = evaluate_mod.evaluate(run, data, out_dir=tmp_path / "eval", compile="off", log=quiet)
    probs = Classifier.load(run, precision="fp32").predict_arrays(np.zeros((3, 16, 16, 3), dtype=np.uint8))
    assert seen == [0.5, 0.5] and 0 <= metrics["accuracy"] <= 1 and np.allclose(probs.sum(1), 1, atol=1e-4)


def test_muon_refuses_pretrained_weights():
    with pytest.raises(ValueError, match="from scratch"):
        resolve_recipe(TrainConfig(optimizer="muon"), ModelConfig(name="small_cnn", weights="w.safetensors"), AugmentSpec(), 100)


def test_model_auto_keeps_the_activation_for_small_cnn():
    from imgcls.training.auto import DataProfile, concrete_config

    cfg = RunConfig(data=DataConfig(path="DATA"), model=ModelConfig(name="auto", activation="silu"))
    assert concrete_config(cfg, "small_cnn", DataProfile(50_000, 10, 32, 32, False, True)).model.activation == "silu"
