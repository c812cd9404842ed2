"""Every registered model (shape, NaN, one backward, the common surface, at a tiny size), the
registry's errors, the ResNet/VGG torchvision layout, and checkpoint loading."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import imgcls.models  # noqa: F401  (imports every architecture module, which registers its models)
from imgcls.models.registry import MissingWeightsError, create_model, get_entry, list_models, register_model
from imgcls.models.weights import (
    convert_timm_state_dict,
    fetch_weights,
    load_pretrained_weights,
    load_weights_file,
)
from imgcls.transforms import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec

TINY = 32  # px: every registered model must train at this size (small_cnn's own; ResNet's 1x1 after /32)

# torchvision-layout models: name -> (tiny input side, pooled feature width, torchvision parameter count)
MODELS = {
    "resnet18": (64, 512, 11_689_512),
    "resnet34": (64, 512, 21_797_672),
    "resnet50": (64, 2048, 25_557_032),
    "vgg11_bn": (32, 4096, 132_868_840),
    "vgg16_bn": (32, 4096, 138_365_992),
}


def _state_file(tmp_path: Path, model: torch.nn.Module, name: str) -> Path:
    path = tmp_path / name
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- models ---------------------------------------------------------------------------------


def test_registry_holds_every_architecture() -> None:
    names = list_models()
    assert names == sorted(names) and "small_cnn" in names
    assert set(MODELS) <= set(names) and {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(names)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model(name: str) -> None:
    entry = get_entry(name)
    assert entry.name == name and entry.description and isinstance(entry.default_spec, PreprocessSpec)
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = torch.randn(2, 3, TINY, TINY)  # (B, 3, H, W)
    out = model(x)  # (2, 7)
    assert out.shape == (2, 7) and model.num_classes == 7
    assert torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:  # every trainable weight takes part in the forward pass, and its gradient is finite
        assert p.grad is not None and torch.isfinite(p.grad).all(), n

    model.eval()  # the surface every model shares (STYLE rule 5)
    with torch.no_grad():
        feats = model.forward_features(x)  # (2, C, h, w)
        pooled = model.forward_head(feats, pre_logits=True)  # (2, num_features)
        assert pooled.shape == (2, model.num_features)
        assert torch.equal(model.forward_head(feats), model(x))
        model.reset_classifier(3)
        assert model.num_classes == 3 and model(x).shape == (2, 3)
        assert torch.equal(model.forward_head(feats, pre_logits=True), pooled)  # only the classifier changed


def test_registry_fails_loudly() -> None:
    with pytest.raises(ValueError, match="'small_cnn' is already registered"):
        register_model("small_cnn", PreprocessSpec())(lambda num_classes: torch.nn.Linear(1, num_classes))
    assert get_entry("small_cnn").builder.__name__ == "small_cnn"  # the first registration stands
    with pytest.raises(ValueError, match=r"unknown model 'resnet19'; available: .*resnet18"):
        create_model("resnet19", num_classes=2)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        create_model("small_cnn", num_classes=0)
    with pytest.raises(MissingWeightsError, match="no built-in pretrained weights"):
        create_model("resnet18", num_classes=2, pretrained=True)


@pytest.mark.parametrize("name", list(MODELS))
def test_torchvision_layout_sizes(name: str) -> None:
    size, num_features, num_params = MODELS[name]
    with torch.device("meta"):  # shapes only: no memory, no initialisation of up to 138M parameters
        model = create_model(name, num_classes=7)
        feats = model.forward_features(torch.empty(2, 3, size, size))  # (2, C, H/32, W/32)
    assert sum(p.numel() for p in model.parameters()) == num_params - 1000 * (num_features + 1) + 7 * (num_features + 1)
    assert model.num_features == num_features
    assert feats.shape == (2, 2048 if name == "resnet50" else 512, size // 32, size // 32)


@pytest.mark.parametrize("name", list(MODELS))
def test_default_spec(name: str) -> None:
    spec = get_entry(name).default_spec
    assert spec == PreprocessSpec(img_size=224, crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")
    assert spec.cache_size == 256


def test_resnet18_torchvision_keys() -> None:
    sd = create_model("resnet18", num_classes=1000).state_dict()
    # 6 (stem) + 8 blocks x 12 + 3 downsamples x 6 + 2 (fc) = 122, num_batches_tracked included
    assert len(sd) == 122
    assert list(sd)[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"]
    assert list(sd)[-2:] == ["fc.weight", "fc.bias"]
    expected = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.num_batches_tracked": (),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.1.bn2.running_var": (64,),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_mean": (128,),
        "layer3.1.conv2.weight": (256, 256, 3, 3),
        "layer4.0.downsample.0.weight": (512, 256, 1, 1),
        "layer4.1.bn2.weight": (512,),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert "layer1.0.downsample.0.weight" not in sd and "layer2.2.conv1.weight" not in sd


def test_resnet50_torchvision_keys() -> None:
    model = create_model("resnet50", num_classes=1000)
    sd = model.state_dict()
    # 6 (stem) + 16 bottlenecks x 18 + 4 downsamples x 6 + 2 (fc) = 320
    assert len(sd) == 320
    expected = {
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.bn3.weight": (256,),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv1.weight": (128, 256, 1, 1),
        "layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "layer3.5.bn3.running_var": (1024,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert "layer3.6.conv1.weight" not in sd
    # v1.5: the stride sits on the 3x3 conv
    assert model.layer2[0].conv1.stride == (1, 1) and model.layer2[0].conv2.stride == (2, 2)


def test_resnet34_count_and_zero_init() -> None:
    model = create_model("resnet34", num_classes=10, zero_init_residual=True)
    sd = model.state_dict()
    assert len(sd) == 6 + 16 * 12 + 3 * 6 + 2  # 218
    assert torch.count_nonzero(sd["layer3.5.bn2.weight"]) == 0 and torch.all(sd["layer3.5.bn1.weight"] == 1)
    assert list(sd) == list(create_model("resnet34", num_classes=10).state_dict())


def test_vgg_torchvision_keys() -> None:
    with torch.device("meta"):  # shapes only: skips initialising 138M parameters
        sd16 = create_model("vgg16_bn", num_classes=1000).state_dict()
        sd11 = create_model("vgg11_bn", num_classes=1000).state_dict()
    # 13 conv+BN layers x 7 tensors (w, b, BN w, b, mean, var, count) + 3 Linear x 2 = 97
    assert len(sd16) == 97
    expected = {
        "features.0.weight": (64, 3, 3, 3),
        "features.0.bias": (64,),
        "features.1.running_mean": (64,),
        "features.3.weight": (64, 64, 3, 3),
        "features.7.weight": (128, 64, 3, 3),
        "features.40.weight": (512, 512, 3, 3),
        "features.41.num_batches_tracked": (),
        "classifier.0.weight": (4096, 25088),
        "classifier.3.weight": (4096, 4096),
        "classifier.6.weight": (1000, 4096),
        "classifier.6.bias": (1000,),
    }
    assert {k: tuple(sd16[k].shape) for k in expected} == expected
    assert "features.43.weight" not in sd16
    assert len(sd11) == 8 * 7 + 6  # 62
    assert tuple(sd11["features.25.weight"].shape) == (512, 512, 3, 3)  # last conv
    assert tuple(sd11["features.4.weight"].shape) == (128, 64, 3, 3)


def test_reset_classifier_rejects_zero() -> None:
    model = create_model("resnet18", num_classes=4)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(0)


# --- weights files --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_10() -> torch.nn.Module:
    torch.manual_seed(1)
    model = create_model("resnet18", num_classes=10)
    # non-trivial BN statistics, so a file that silently skipped buffers would change outputs
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    with torch.no_grad():
        assert torch.equal(a.eval()(X64), b.eval()(X64))


@pytest.mark.parametrize("filename", ["w.safetensors", "w.pth"])
def test_roundtrip_file(tmp_path: Path, resnet18_10: torch.nn.Module, filename: str) -> None:
    path = _state_file(tmp_path, resnet18_10, filename)
    fresh = create_model("resnet18", num_classes=10)
    report = load_pretrained_weights(fresh, "resnet18", path)
    assert report.layout == "torchvision" and report.num_tensors == 122 and report.skipped == ()
    _assert_same_outputs(resnet18_10, fresh)


def test_ddp_prefix_and_nested(tmp_path: Path, resnet18_10: torch.nn.Module) -> None:
    sd = resnet18_10.state_dict()
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in sd.items()}, ddp)
    nested = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, "state_dict": dict(sd)}, nested)
    for path in (ddp, nested):
        state = load_weights_file(path)
        assert list(state) == list(sd)
        fresh = create_model("resnet18", num_classes=10)
        load_pretrained_weights(fresh, "resnet18", str(path))
        _assert_same_outputs(resnet18_10, fresh)
    deep = tmp_path / "deep.pth"
    torch.save({"model": {"model_state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}}}, deep)
    assert list(load_weights_file(deep)) == list(sd)


def test_class_count_change_skips_classifier(tmp_path: Path, resnet18_10: torch.nn.Module) -> None:
    path = _state_file(tmp_path, resnet18_10, "w.safetensors")
    model = create_model("resnet18", num_classes=5)
    fc_before = model.fc.weight.detach().clone()
    report = load_pretrained_weights(model, "resnet18", path)
    assert report.skipped == ("fc.weight", "fc.bias") and report.file_num_classes == 10
    assert report.num_tensors == 120 and "classifier not loaded" in report.message
    assert torch.equal(model.fc.weight, fc_before)
    assert torch.equal(model.layer4[1].bn2.running_var, resnet18_10.layer4[1].bn2.running_var)
    # num_classes resets the head first
    model = create_model("resnet18", num_classes=10)
    report = load_pretrained_weights(model, "resnet18", path, num_classes=3)
    assert model.num_classes == 3 and model(X64).shape == (2, 3) and report.skipped


def test_missing_num_batches_tracked_is_filled(tmp_path: Path, resnet18_10: torch.nn.Module) -> None:
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in resnet18_10.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    fresh = create_model("resnet18", num_classes=10)
    load_pretrained_weights(fresh, "resnet18", path)
    _assert_same_outputs(resnet18_10, fresh)


def test_wrong_architecture_names_key(tmp_path: Path, resnet18_10: torch.nn.Module) -> None:
    path = _state_file(tmp_path, resnet18_10, "r18.safetensors")
    with pytest.raises(ValueError, match=r"layer1\.2\.conv1\.weight") as info:
        load_pretrained_weights(create_model("resnet34", num_classes=10), "resnet34", path)
    assert "r18.safetensors" in str(info.value) and "missing keys" in str(info.value)
    with pytest.raises(ValueError, match=r"shape mismatches.*layer1\.0\.conv1\.weight"):
        load_pretrained_weights(create_model("resnet50", num_classes=10), "resnet50", path)


class _Payload:
    """Unpickling this would create a file: the loader must refuse it, not run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_pickled_object_is_refused(tmp_path: Path, resnet18_10: torch.nn.Module) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": resnet18_10.state_dict(), "extra": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="refusing to load .*evil.pth"):
        load_weights_file(path)
    assert not marker.exists()


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights_file(tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_weights_file(garbage)
    garbage_pth = tmp_path / "garbage.pth"
    garbage_pth.write_bytes(b"")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_weights_file(garbage_pth)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(ValueError, match="list.pth holds a list, not a state dict"):
        load_weights_file(listing)
    no_tensors = tmp_path / "meta.pt"
    torch.save({"epoch": 1}, no_tensors)
    with pytest.raises(ValueError, match="meta.pt is not a state dict"):
        load_weights_file(no_tensors)


def _to_timm_vgg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # The inverse of timm's own torchvision->timm filter for VGG.
    out = {}
    for k, v in state.items():
        if k.startswith("classifier.0."):
            k, v = "pre_logits.fc1." + k.split(".")[-1], v.reshape(-1, 512, 7, 7) if v.ndim == 2 else v
        elif k.startswith("classifier.3."):
            k, v = "pre_logits.fc2." + k.split(".")[-1], v.reshape(-1, 4096, 1, 1) if v.ndim == 2 else v
        elif k.startswith("classifier.6."):
            k = "head.fc." + k.split(".")[-1]
        out[k] = v
    return out


def test_timm_vgg_conversion_matches_conv_head() -> None:
    # The 7x7 conv over a 7x7 map equals the Linear over its (C, H, W) flattening.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 512, 7, 7, generator=g, dtype=torch.float64)  # float64: 25088-term sums
    x = torch.randn(2, 512, 7, 7, generator=g, dtype=torch.float64)  # (B, C, 7, 7)
    state = convert_timm_state_dict("vgg16_bn", {"pre_logits.fc1.weight": w, "pre_logits.fc1.bias": torch.zeros(8)})
    assert set(state) == {"classifier.0.weight", "classifier.0.bias"}
    torch.testing.assert_close(F.linear(x.flatten(1), state["classifier.0.weight"]), F.conv2d(x, w).flatten(1))
    resnet_like = {"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}
    assert convert_timm_state_dict("resnet50", resnet_like) == resnet_like


def test_timm_vgg_file_loads(tmp_path: Path) -> None:
    torch.manual_seed(2)
    ours = create_model("vgg11_bn", num_classes=4).eval()
    timm_state = _to_timm_vgg(ours.state_dict())
    assert "pre_logits.fc1.weight" in timm_state and timm_state["pre_logits.fc1.weight"].shape == (4096, 512, 7, 7)
    assert convert_timm_state_dict("vgg11_bn", ours.state_dict()).keys() == ours.state_dict().keys()  # passes through
    path = tmp_path / "timm_vgg11_bn.safetensors"
    save_file({k: v.contiguous() for k, v in timm_state.items()}, str(path))
    del timm_state
    fresh = create_model("vgg11_bn", num_classes=4)
    report = load_pretrained_weights(fresh, "vgg11_bn", path)
    assert report.layout == "timm" and report.num_tensors == 62
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), fresh.eval()(x))


# --- downloads ------------------------------------------------------------------------------


@pytest.fixture()
def tiny_file(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    path = src / "tiny.safetensors"
    save_file({"w": torch.arange(12.0).reshape(3, 4)}, str(path))
    return path


def test_fetch_file_url_checks_digest(tmp_path: Path, tiny_file: Path) -> None:
    cache = tmp_path / "cache"
    digest = _sha256(tiny_file)
    got = fetch_weights(tiny_file.as_uri(), digest, cache, progress=False)
    assert got.parent == cache and got.name.endswith("tiny.safetensors") and _sha256(got) == digest
    assert torch.equal(load_weights_file(got)["w"], torch.arange(12.0).reshape(3, 4))
    tiny_file.unlink()  # the cached copy is reused, no second read of the source
    assert fetch_weights(tiny_file.as_uri(), digest.upper(), cache, progress=False) == got

    other = tmp_path / "cache2"
    save_file({"w": torch.zeros(2)}, str(tiny_file))
    bad = "0" * 64
    with pytest.raises(ValueError, match=f"expected {bad}.*has {_sha256(tiny_file)}"):
        fetch_weights(tiny_file.as_uri(), bad, other, progress=False)
    assert list(other.iterdir()) == []  # neither the temp file nor a target left behind
    with pytest.raises(ValueError, match="64 hex"):
        fetch_weights(tiny_file.as_uri(), "abc", other, progress=False)
    with pytest.raises(ValueError, match="scheme"):
        fetch_weights("ftp://example.com/w.pth", None, other, progress=False)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


def test_fetch_http_and_load(tmp_path: Path, resnet18_10: torch.nn.Module) -> None:
    served = tmp_path / "served"
    served.mkdir()
    path = _state_file(served, resnet18_10, "resnet18-demo.safetensors")
    digest = _sha256(path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        cache = tmp_path / "cache"
        got = fetch_weights(f"{base}/resnet18-demo.safetensors", digest, cache, progress=False, timeout=10)
        assert _sha256(got) == digest
        with pytest.raises(OSError, match="HTTP 404"):
            fetch_weights(f"{base}/missing.pth", None, cache, progress=False, timeout=10)
        fresh = create_model("resnet18", num_classes=10)
        report = load_pretrained_weights(fresh, "resnet18", f"{base}/resnet18-demo.safetensors", sha256=digest, cache_dir=cache)
        assert report.path == got
        _assert_same_outputs(resnet18_10, fresh)
        assert sorted(p.name for p in cache.iterdir()) == [got.name]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_local_sha256_mismatch(tmp_path: Path, tiny_file: Path) -> None:
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        load_pretrained_weights(create_model("resnet18", num_classes=2), "resnet18", tiny_file, sha256="1" * 64)
