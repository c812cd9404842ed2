"""imgcls.config: every validation error, the to_dict/from_dict round trip, and no torch on import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from imgcls.config import (
    COMPILE_MODES,
    CROPS,
    OPTIMIZERS,
    PRECISIONS,
    RECIPES,
    RESIZE_MODES,
    SCHEDULES,
    STRATEGIES,
    TTA_CHOICES,
    TTA_MODES,
    AugmentSpec,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)

# (config class, keyword arguments, words the error must contain)
INVALID = [
    (AugmentSpec, {"crop": "zoom"}, "crop must be one of"),
    (AugmentSpec, {"translate": -0.1}, "translate must be in [0, 0.5]"),
    (AugmentSpec, {"translate": 0.6}, "translate must be in [0, 0.5]"),
    (AugmentSpec, {"color_jitter": 1.5}, "color_jitter must be in [0, 1]"),
    (AugmentSpec, {"rrc_scale": (0.0, 1.0)}, "rrc_scale must satisfy"),
    (AugmentSpec, {"rrc_scale": (0.8, 0.5)}, "rrc_scale must satisfy"),
    (AugmentSpec, {"rrc_scale": (0.5, 1.2)}, "rrc_scale must satisfy"),
    (AugmentSpec, {"rrc_ratio": (0.0, 1.0)}, "rrc_ratio must satisfy"),
    (AugmentSpec, {"rrc_ratio": (1.5, 0.75)}, "rrc_ratio must satisfy"),
    (DataConfig, {"path": "d", "val_fraction": 1.0}, "val_fraction must be in [0, 1)"),
    (DataConfig, {"path": "d", "val_fraction": -0.1}, "val_fraction must be in [0, 1)"),
    (DataConfig, {"path": "d", "img_size": 3}, "img_size must be in [4, 4096]"),
    (DataConfig, {"path": "d", "img_size": 5000}, "img_size must be in [4, 4096]"),
    (DataConfig, {"path": "d", "resize_mode": "stretch"}, "resize_mode must be one of"),
    (DataConfig, {"path": "d", "crop_pct": 0.05}, "crop_pct must be in [0.1, 1.0]"),
    (DataConfig, {"path": "d", "crop_pct": 1.1}, "crop_pct must be in [0.1, 1.0]"),
    (DataConfig, {"path": "d", "workers": -1}, "workers must be >= 0"),
    (DataConfig, {"path": "d", "max_pixels": 0}, "max_pixels must be >= 1"),
    (ModelConfig, {"strategy": "distill"}, "strategy must be one of"),
    (ModelConfig, {"pretrained": True, "weights": "w.pth"}, "either pretrained or weights"),
    (TrainConfig, {"epochs": 0}, "epochs must be >= 1"),
    (TrainConfig, {"time_budget": 0}, "time_budget must be > 0"),
    (TrainConfig, {"recipe": "slow"}, "recipe must be one of"),
    (TrainConfig, {"batch_size": 1}, "batch_size must be >= 2"),
    (TrainConfig, {"optimizer": "adam"}, "optimizer must be one of"),
    (TrainConfig, {"schedule": "step"}, "schedule must be one of"),
    (TrainConfig, {"lr": 0.0}, "lr must be > 0"),
    (TrainConfig, {"momentum": 1.0}, "momentum must be in [0, 1)"),
    (TrainConfig, {"weight_decay": -1e-4}, "weight_decay must be >= 0"),
    (TrainConfig, {"warmup_epochs": -1}, "warmup_epochs must be >= 0"),
    (TrainConfig, {"label_smoothing": 1.0}, "label_smoothing must be in [0, 1)"),
    (TrainConfig, {"grad_clip": -1.0}, "grad_clip must be >= 0"),
    (TrainConfig, {"threads": -2}, "threads must be >= 0"),
    (TrainConfig, {"precision": "fp16"}, "precision must be one of"),
    (TrainConfig, {"patience": -1}, "patience must be >= 0"),
]


@pytest.mark.parametrize("cls,kwargs,message", INVALID, ids=[f"{c.__name__}:{m.split()[0]}" for c, _, m in INVALID])
def test_each_validation_error(cls, kwargs, message):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    assert message in str(info.value)
    # the message shows the offending value (or, for the pair rule, both names)
    bad = next(v for k, v in kwargs.items() if k != "path")
    assert repr(bad) in str(info.value) or str(bad) in str(info.value) or "pretrained" in str(info.value)


@pytest.mark.parametrize(
    "cls,field,choices",
    [
        (AugmentSpec, "crop", CROPS),
        (ModelConfig, "strategy", STRATEGIES),
        (TrainConfig, "recipe", RECIPES),
        (TrainConfig, "optimizer", OPTIMIZERS),
        (TrainConfig, "schedule", SCHEDULES),
        (TrainConfig, "precision", PRECISIONS),
    ],
)
def test_every_listed_choice_is_accepted(cls, field, choices):
    for choice in choices:
        assert getattr(cls(**{field: choice}), field) == choice


def test_every_resize_mode_is_accepted():
    assert [DataConfig(path="d", resize_mode=m).resize_mode for m in RESIZE_MODES] == list(RESIZE_MODES)


def test_choice_lists_are_spelled_once_and_consistent():
    assert TTA_CHOICES == ("auto", *TTA_MODES) and "none" in TTA_MODES
    assert "auto" in COMPILE_MODES and "auto" in CROPS and "auto" in RECIPES
    for choices in (OPTIMIZERS, SCHEDULES, RECIPES, STRATEGIES, PRECISIONS, TTA_MODES, COMPILE_MODES, CROPS, RESIZE_MODES):
        assert isinstance(choices, tuple) and len(set(choices)) == len(choices)


def test_configs_are_frozen():
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.epochs = 3  # type: ignore[misc]


def test_augment_resolves_auto_crop_by_size():
    assert AugmentSpec().resolve(32).crop == "translate"
    assert AugmentSpec().resolve(96).crop == "rrc"
    assert AugmentSpec(crop="none").resolve(224).crop == "none"


def full_config() -> RunConfig:
    """A RunConfig with the fields away from their defaults, so a field lost on the way shows in the round trip."""
    return RunConfig(
        data=DataConfig(
            path="data/x",
            img_size=48,
            resize_mode="pad",
            crop_pct=0.9,
            val_fraction=0.2,
            seed=7,
            cache_dir="cache",
            workers=3,
            max_pixels=1234,
        ),
        model=ModelConfig(name="resnet18", weights="w.pth", weights_sha256="ab" * 32, strategy="fine-tune"),
        train=TrainConfig(
            out="runs/y",
            epochs=4,
            time_budget=2.5,
            recipe="generic",
            batch_size=16,
            lr=0.01,
            optimizer="sgd",
            weight_decay=1e-4,
            momentum=0.8,
            schedule="onecycle",
            warmup_epochs=0.5,
            label_smoothing=0.1,
            grad_clip=1.0,
            precision="fp32",
            channels_last=False,
            compile=True,
            patience=0,
            deterministic=True,
            threads=2,
            device="cpu",
            augment=AugmentSpec(hflip=False, crop="rrc", translate=0.1, rrc_scale=(0.5, 0.9), rrc_ratio=(0.8, 1.25), color_jitter=0.3),
        ),
    )


def test_to_dict_from_dict_round_trip_through_json():
    cfg = full_config()
    d = json.loads(json.dumps(cfg.to_dict()))  # what model.json and the checkpoint hold
    back = RunConfig.from_dict(d)
    assert back == cfg
    assert isinstance(back.train.augment.rrc_scale, tuple) and back.train.augment.rrc_scale == (0.5, 0.9)
    assert back.to_dict() == cfg.to_dict()
    assert RunConfig.from_dict({"data": {"path": "p"}}) == RunConfig(data=DataConfig(path="p"))  # missing sections: defaults


def test_from_dict_names_unknown_keys():
    d = full_config().to_dict()
    d["train"]["warp_speed"] = 9
    with pytest.raises(ValueError, match=r"'train' has unknown keys \['warp_speed'\]"):
        RunConfig.from_dict(d)
    d = full_config().to_dict()
    d["train"]["augment"]["mixup"] = 0.2
    with pytest.raises(ValueError, match=r"'train.augment' has unknown keys \['mixup'\]"):
        RunConfig.from_dict(d)
    with pytest.raises(ValueError, match=r"config has unknown keys \['serve'\]"):
        RunConfig.from_dict({"data": {"path": "p"}, "serve": {}})
    with pytest.raises(ValueError, match="'data' section"):
        RunConfig.from_dict({"train": {}})
    with pytest.raises(ValueError, match="lr must be > 0"):  # values are validated on the way back in
        RunConfig.from_dict({"data": {"path": "p"}, "train": {"lr": -1}})


def test_import_does_not_import_torch():
    code = "import sys, imgcls.config; assert 'torch' not in sys.modules, 'imgcls.config imported torch'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_unknown_method_auto_is_knn_for_pretrained_networks_and_msp_otherwise():
    from imgcls.config import resolve_unknown_method

    assert resolve_unknown_method("auto", pretrained=True) == "knn"
    assert resolve_unknown_method("auto", pretrained=False) == "msp"
    assert resolve_unknown_method("energy", pretrained=True) == "energy"
