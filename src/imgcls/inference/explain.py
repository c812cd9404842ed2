"""Grad-CAM explanations: which parts of an image made the model choose a class.

`explain_image(model, meta_or_spec, image)` returns an `Explanation` whose `map` is an (H, W)
float32 array in [0, 1] at the ORIGINAL image's size (or at most `max_side` pixels a side), and
whose `overlay` is the image with the map drawn over it; `explain_images` does a batch in one
forward and backward pass (the report's top losses). `Explainer.load(MODEL)` does the same from
a model folder; `explain_files` writes overlay PNGs (and the raw maps as .npy) for `imgcls
explain` and `imgcls predict --explain`; `UploadExplainer` builds the "explanation" field of
the server's answers (POST /v1/predict?explain=true).

Grad-CAM (Selvaraju et al., 2017) reads the activation A (C, h, w) of a target layer and the
gradient g of the class's logit with respect to it, and keeps relu(sum_c w_c A_c) with a weight
w_c per channel; here the weights are Grad-CAM++'s, which found the evidence better on the
pointing game in tests/test_explain.py (numbers in `class_activation_map`). The target layer
(`imgcls.inference.targets`) is the last conv block before global pooling, `forward_features`'
output, except for VGG (its last ReLU, before the final max-pool: 14 x 14 at 224 px instead of
7 x 7, as the Grad-CAM paper used for VGG-16), small_cnn (its second block) and inputs so small
that this layer has fewer than 7 cells a side (then the deepest stage that has them).

The image passes through exactly what `Classifier` does (io.load_image with the same JPEG draft,
transforms.resize_image, the evaluation centre crop), in fp32, eval mode, one view (no TTA), and
the map is taken back through that geometry: with resize_mode "crop" the model never sees the
sides of a non-square image, so there the map is 0 and the overlay shows the image dimmed, not
coloured; "squash" stretches the map back to the image's aspect; "pad" drops the padding.
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from imgcls.atomic import atomic_path
from imgcls.config import DEFAULT_MAX_PIXELS
from imgcls.inference.targets import FEATURES, default_target_layer
from imgcls.io import ImageDecodeError, ImageSource, load_image, open_image_file
from imgcls.transforms import PreprocessSpec, eval_transform, resize_image, to_batch

OVERLAY_ALPHA = 0.45  # weight of the heat colours over the photo
DIM_UNSEEN = 0.35  # brightness left to the parts of the image the model never saw (crop mode)
COLORMAP = "jet"

# A box in fractions of the image's width and height, (u0, v0, u1, v1): the region of the image
# that the model's input square shows. It may reach outside [0, 1] (pad mode) or cut into it (crop).
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Explanation:
    """One image explained for one class.

    map: (H, W) float32 in [0, 1] at the original image's size (after EXIF rotation), 1 at the
    strongest evidence; 0 where the model saw nothing (outside the centre crop).
    overlay: the image with the map drawn over it (the unseen parts dimmed), same size.
    """

    label: str
    score: float  # softmax probability of `label` (fp32, one view, no TTA)
    class_index: int
    map: np.ndarray
    overlay: Image.Image


# ----------------------------------------------------------------------------- the class activation map


def _activation_and_logits(model: nn.Module, x: torch.Tensor, layer: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(target activation (1, C, h, w), logits (1, num_classes)) from one forward pass."""
    if layer is None or layer == FEATURES:  # every model here: forward == forward_head(forward_features(x))
        feats = model.forward_features(x)
        return feats, model.forward_head(feats)
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"target layer {layer!r} ran {len(captured)} times in one forward pass; pick a layer that runs once")
    return captured[0], logits


def class_activation_maps(
    model: nn.Module, x: torch.Tensor, targets: Sequence[int | None] | None = None, layer: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM++ of normalised inputs x (N, 3, S, S) -> (cams (N, h, w) float32 >= 0, probabilities (N, K)).

    targets: a class index per image, None (in the list or for all) for its top class. layer None
    reads `forward_features`' output. The model must be in fp32; it runs in eval mode with
    autocast off and its weights untouched (the gradient goes to the activation only, never to a
    parameter's .grad). One forward and one backward for the batch: in eval mode every image's
    logits depend on that image alone, so the gradient of their sum is each image's own.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            x = x.clone()  # a tensor made under a caller's inference_mode cannot enter autograd
            act, logits = _activation_and_logits(model, x, layer)  # (N, C, h, w), (N, K)
            top = logits.detach().argmax(1)  # (N,)
            k = torch.tensor([int(top[i]) if t is None else t for i, t in enumerate(targets or [None] * len(x))], device=x.device)
            (grad,) = torch.autograd.grad(logits.gather(1, k[:, None]).sum(), act)  # (N, C, h, w)
    finally:
        model.train(was_training)
    act = act.detach().float()
    grad = grad.float()
    # Grad-CAM++ (Chattopadhay et al., 2018): per-pixel weights alpha = g^2 / (2 g^2 + sum(A) g^3),
    # then channel weight w_c = sum(alpha * relu(g)), instead of Grad-CAM's mean gradient. On the
    # pointing game of tests/test_explain.py (small_cnn, blocks.1, 60 images per training) the
    # peak fell inside the patch for 72-75 % of images against 38-40 % at 48 px input (within
    # 4 px: 97-98 % against 72-78 %), 90-92 % against 78-87 % at 64 px, 30-38 % against 3-7 % at
    # 32 px; one narrower model of six runs favoured Grad-CAM (87 % against 67 %).
    g2 = grad.pow(2)
    denom = 2 * g2 + act.sum(dim=(2, 3), keepdim=True) * grad.pow(3)  # (N, C, h, w)
    alpha = torch.where((grad != 0) & (denom > 0), g2 / denom.clamp_min(1e-12), torch.zeros_like(g2))
    weights = (alpha * torch.relu(grad)).sum(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
    cams = torch.relu((weights * act).sum(dim=1))  # (N, h, w)
    probs = torch.softmax(logits.detach().float(), dim=1)  # (N, K)
    return cams.cpu().numpy(), probs.cpu().numpy()


def class_activation_map(
    model: nn.Module, x: torch.Tensor, target: int | None = None, layer: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`class_activation_maps` of one input x (1, 3, S, S) -> (cam (h, w), probabilities (K,))."""
    cams, probs = class_activation_maps(model, x, [target], layer)
    return cams[0], probs[0]


# ----------------------------------------------------------------------------- geometry: model input -> original image


def input_box(width: int, height: int, spec: PreprocessSpec) -> Box:
    """The region of a width x height image that the model's input square shows, as fractions.

    Mirrors `transforms.resize_image` (crop / squash / pad to the cache square, side S) and the
    evaluation centre crop of img_size out of it: cache pixel x shows image fraction (x - a) / b.
    """
    s, size = spec.cache_size, spec.img_size
    off = (s - size) // 2  # transforms.center_crop
    if spec.resize_mode == "squash":
        ax, bx, ay, by = 0.0, s, 0.0, s
    elif spec.resize_mode == "crop":
        scale = s / min(width, height)
        nw, nh = max(s, round(width * scale)), max(s, round(height * scale))
        ax, bx, ay, by = -((nw - s) // 2), nw, -((nh - s) // 2), nh
    else:  # pad
        scale = s / max(width, height)
        nw, nh = max(1, round(width * scale)), max(1, round(height * scale))
        ax, bx, ay, by = (s - nw) // 2, nw, (s - nh) // 2, nh
    return (off - ax) / bx, (off - ay) / by, (off + size - ax) / bx, (off + size - ay) / by


def _resample_matrix(n_out: int, n_in: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """(n_out, n_in) bilinear weights taking n_in cells spread over [lo, hi] (fractions of the
    image) to the centres of n_out image pixels, and which pixels [lo, hi] covers at all."""
    centre = (np.arange(n_out) + 0.5) / n_out  # pixel centres as fractions of the image
    t = (centre - lo) / (hi - lo)  # position in the model input, 0..1 where it is seen
    visible = (t >= 0) & (t <= 1)
    f = np.clip(t * n_in - 0.5, 0, n_in - 1)  # cell coordinate, cell centres at 0.5 / n_in (align_corners=False)
    i0 = np.floor(f).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (f - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1 - w1)
    np.add.at(m, (rows, i1), w1)
    m[~visible] = 0
    return m, visible


def map_to_image(cam: np.ndarray, box: Box, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Low-resolution cam (h, w) over the model input -> (map (height, width) float32 in [0, 1],
    seen (height, width) bool): bilinear, separable (two small matrix products, so a 20 MP photo
    costs no (H, W, 2) sampling grid), 0 outside the region the model saw, scaled to max 1."""
    u0, v0, u1, v1 = box
    rx, seen_x = _resample_matrix(width, cam.shape[1], u0, u1)  # (W, w)
    ry, seen_y = _resample_matrix(height, cam.shape[0], v0, v1)  # (H, h)
    heat = ry @ cam.astype(np.float32) @ rx.T  # (H, W)
    peak = float(heat.max())
    heat = heat / peak if peak > 0 else np.zeros_like(heat)
    return np.clip(heat, 0.0, 1.0).astype(np.float32), seen_y[:, None] & seen_x[None, :]


def overlay_heatmap(image: Image.Image, heat: np.ndarray, seen: np.ndarray | None = None, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The RGB image with `heat` (H, W) in [0, 1] coloured over it (matplotlib's jet), and the
    parts not `seen` by the model dimmed instead of coloured."""
    from matplotlib import colormaps  # only here: importing matplotlib costs ~0.3 s

    lut = (colormaps[COLORMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)  # (256, 3)
    colours = Image.fromarray(lut[np.rint(heat * 255).astype(np.uint8)], "RGB")  # (H, W, 3): uint8 end to end, no float copy
    out = Image.blend(image.convert("RGB"), colours, alpha)
    if seen is not None and not seen.all():
        dim = Image.eval(image.convert("RGB"), lambda v: int(v * DIM_UNSEEN))
        out = Image.composite(out, dim, Image.fromarray(seen.astype(np.uint8) * 255, "L"))
    return out


# ----------------------------------------------------------------------------- one image


def _decode_pair(
    source: ImageSource, spec: PreprocessSpec, max_pixels: int, max_side: int | None = None
) -> tuple[Image.Image, Image.Image]:
    """(the image to draw the map on, the image `Classifier.prepare` would resize): the latter
    with the same JPEG draft (DCT-scaled decoding), so the model sees the pixels `imgcls predict`
    sees. The former is the full image, or with max_side at most that many pixels a side (a JPEG
    is then decoded at a reduced scale as well), so a large photo costs no full-size map."""
    full = load_image(source, max_pixels=max_pixels, draft_size=max_side)
    seen = full
    if isinstance(source, (str, os.PathLike)):
        with open_image_file(source) as f:
            head = f.read(3)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        head = bytes(source[:3])
    else:  # a PIL image or an array is used as it is, never drafted
        head = b""
    if head == b"\xff\xd8\xff":  # a JPEG: predict decodes it drafted
        seen = load_image(source, max_pixels=max_pixels, draft_size=spec.cache_size)
    if max_side is not None and max(full.size) > max_side:
        scale = max_side / max(full.size)
        size = (max(1, round(full.width * scale)), max(1, round(full.height * scale)))
        full = full.resize(size, Image.Resampling.BILINEAR)  # a new image: `seen` (maybe the same object) is left as it is
    return full, seen


def _spec_and_names(model: nn.Module, meta_or_spec: dict[str, Any] | PreprocessSpec) -> tuple[PreprocessSpec, list[str]]:
    if isinstance(meta_or_spec, PreprocessSpec):
        return meta_or_spec, [str(i) for i in range(model.num_classes)]
    return PreprocessSpec.from_dict(meta_or_spec["preprocess"]), list(meta_or_spec["class_names"])


def resolve_target(target: int | str | None, class_names: Sequence[str]) -> int | None:
    """A class index, a label or None (the top class) -> index or None; a clear error otherwise."""
    if target is None:
        return None
    if isinstance(target, str):
        if target in class_names:
            return list(class_names).index(target)
        shown = ", ".join(class_names[:20]) + (f", ... ({len(class_names)} in all)" if len(class_names) > 20 else "")
        raise ValueError(f"unknown class {target!r}; the model's classes are: {shown}")
    if not 0 <= int(target) < len(class_names):
        raise ValueError(f"class index {target} out of range for {len(class_names)} classes")
    return int(target)


def explain_images(
    model: nn.Module,
    meta_or_spec: dict[str, Any] | PreprocessSpec,
    images: Sequence[ImageSource],
    targets: Sequence[int | str | None] | None = None,
    layer: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    batch_size: int = 16,
) -> list[Explanation]:
    """Grad-CAM++ for images (paths, bytes, PIL images or arrays), each for its class.

    meta_or_spec: the model folder's metadata (class names, preprocessing) or a bare
    PreprocessSpec (labels are then the class indices as strings). targets: a label, an index or
    None (the predicted class) per image; None for all. layer: a module name (or FEATURES) to read
    instead of the default target (see `targets.target_layer`). max_side: the map and overlay at most this
    many pixels a side instead of at the image's size (the model's input is the same).
    batch_size images share one forward and backward pass. Raises io.ImageDecodeError for an
    unreadable image.
    """
    spec, class_names = _spec_and_names(model, meta_or_spec)
    indices = [resolve_target(t, class_names) for t in (targets if targets is not None else [None] * len(images))]
    if len(indices) != len(images):
        raise ValueError(f"{len(indices)} targets for {len(images)} images")
    param = next(model.parameters())
    if param.dtype != torch.float32:
        raise ValueError(f"explain needs the model in float32, got {param.dtype} (load it with artifact.load_artifact)")
    layer = layer if layer is not None else default_target_layer(model, spec.img_size)
    out = []
    for start in range(0, len(images), batch_size):
        pairs = [_decode_pair(img, spec, max_pixels, max_side) for img in images[start : start + batch_size]]
        x = eval_transform(to_batch([resize_image(seen, spec) for _, seen in pairs]), spec).to(param.device)  # (n, 3, S, S)
        cams, probs = class_activation_maps(model, x, indices[start : start + batch_size], layer)  # (n, h, w), (n, K)
        for (full, seen_by_model), cam, p, index in zip(pairs, cams, probs, indices[start : start + batch_size]):
            k = int(p.argmax()) if index is None else index
            heat, seen = map_to_image(cam, input_box(*seen_by_model.size, spec), *full.size)
            out.append(Explanation(class_names[k], float(p[k]), k, heat, overlay_heatmap(full, heat, seen)))
    return out


def explain_image(
    model: nn.Module,
    meta_or_spec: dict[str, Any] | PreprocessSpec,
    image: ImageSource,
    target: int | str | None = None,
    layer: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
) -> Explanation:
    """Grad-CAM++ for one image and one class: `explain_images` of [image] (see there)."""
    return explain_images(model, meta_or_spec, [image], [target], layer, max_pixels, max_side)[0]


class Explainer:
    """A model folder loaded in fp32 for explanations: `Explainer.load(MODEL).explain(image)`."""

    def __init__(self, model: nn.Module, meta: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.model = model.eval()
        self.meta = meta
        self.class_names: list[str] = list(meta["class_names"])
        self.max_pixels = max_pixels

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", **kwargs: Any) -> Explainer:
        """A model folder written by `imgcls train`, or "imagenet[:ARCH]" as `Classifier.load` takes it."""
        from imgcls.artifact import load_artifact
        from imgcls.predict import DEFAULT_IMAGENET_MODEL, PRETRAINED_PREFIX

        s = os.fspath(path)
        if (s == PRETRAINED_PREFIX or s.startswith(PRETRAINED_PREFIX + ":")) and not Path(s).exists():
            from imgcls.models import create_model, get_entry
            from imgcls.models.imagenet import imagenet_class_names

            arch = s.partition(":")[2] or DEFAULT_IMAGENET_MODEL
            entry = get_entry(arch)
            model = create_model(arch, num_classes=entry.pretrained_classes, pretrained=True).to(device)
            meta = {"arch": arch, "class_names": imagenet_class_names(), "preprocess": entry.default_spec.to_dict(), "source": s}
            return cls(model, meta, **kwargs)
        model, meta = load_artifact(path, device=device)
        return cls(model, {**meta, "source": s}, **kwargs)

    def class_index(self, label: str | int | None) -> int | None:
        """Check a label up front (before any image is read); None stays None."""
        return resolve_target(label, self.class_names)

    def explain(self, image: ImageSource, target: int | str | None = None, max_side: int | None = None) -> Explanation:
        """`explain_image` with this model: the map and overlay at the image's size, or at most max_side px a side."""
        return explain_image(self.model, self.meta, image, target, max_pixels=self.max_pixels, max_side=max_side)

    def explain_many(
        self, images: Sequence[ImageSource], targets: Sequence[int | str | None] | None = None, max_side: int | None = None
    ) -> list[Explanation]:
        """`explain_images` with this model: a batch per forward and backward pass."""
        return explain_images(self.model, self.meta, images, targets, max_pixels=self.max_pixels, max_side=max_side)


# ----------------------------------------------------------------------------- the server's answers

OVERLAY_MAX_SIDE = 512  # px: the overlay in an HTTP answer (base64 PNG), enough for the page's 380 px preview
UNAVAILABLE = "explanations need the model folder (safetensors weights), not a bare ONNX file: serve the model folder"


def overlay_png(overlay: Image.Image, max_side: int = OVERLAY_MAX_SIDE) -> tuple[bytes, tuple[int, int]]:
    """The overlay as PNG bytes, at most max_side px on its longer side, and its (width, height)."""
    img = overlay.convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), img.size


class UploadExplainer:
    """`explain(image bytes, label)` -> the "explanation" field of an HTTP answer:
    {"target", "overlay_png_base64", "width", "height"}.

    The model folder (`source`: the served Classifier's meta["source"]) is loaded in fp32 on the
    first call, a copy apart from the served model, whose bf16 weights and shared forward hooks
    cannot carry gradients safely. Call it from one thread at a time (the server gives it one).
    """

    def __init__(self, source: str | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.source, self.max_pixels = source, max_pixels
        self._explainer: Explainer | None = None

    @property
    def available(self) -> bool:
        """False when there is no model folder to load (a bare .onnx file, or a Classifier built without a source)."""
        return bool(self.source) and Path(str(self.source)).suffix.lower() != ".onnx"

    def _load(self) -> Explainer:
        if self._explainer is None:
            if not self.available:
                raise ValueError(UNAVAILABLE)
            self._explainer = Explainer.load(str(self.source), max_pixels=self.max_pixels)
        return self._explainer

    def __call__(self, image: ImageSource, label: str) -> dict[str, Any]:
        png, (width, height) = overlay_png(self._load().explain(image, label, max_side=OVERLAY_MAX_SIDE).overlay)
        return {"target": label, "overlay_png_base64": base64.b64encode(png).decode("ascii"), "width": width, "height": height}


# ----------------------------------------------------------------------------- files, for the CLI

_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


def _safe_folder(label: str) -> str:
    name = _UNSAFE.sub("_", label).strip() or "_"
    return "_" if name in (".", "..") else name


def output_stem(path: str, label: str, by_class: bool, taken: set[str]) -> str:
    """'photos/dog.2000.jpg' -> 'dog.2000' (or 'LABEL/dog.2000' when by_class), with -2, -3 ...
    added when that name is taken (compared case-insensitively, as macOS and Windows do)."""
    stem = Path(path).stem or "image"
    base = f"{_safe_folder(label)}/{stem}" if by_class else stem
    name, n = base, 1
    while name.casefold() in taken:
        n += 1
        name = f"{base}-{n}"
    taken.add(name.casefold())
    return name


def _inputs_inside(paths: Sequence[str], out: Path) -> set[str]:
    """Output names (casefolded, no suffix) that would land on one of the input files."""
    root, names = out.resolve(), set()
    for p in paths:
        rp = Path(p).resolve()
        if rp.suffix.lower() in (".png", ".npy") and rp.is_relative_to(root):
            names.add(rp.relative_to(root).with_suffix("").as_posix().casefold())
    return names


def explain_files(
    explainer: Explainer,
    paths: Sequence[str],
    out_dir: str | os.PathLike,
    target: str | None = None,
    save_maps: bool = False,
    log: Callable[[dict[str, Any]], None] | None = None,
    labels: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Explain each image file and write OUT/<name>.png (and OUT/<name>.npy with save_maps).

    Names follow the input's file name (dog.2000.jpg -> dog.2000.png); when two inputs share a
    name, every output goes to a folder per explained class (OUT/<label>/dog.2000.png). Returns
    one dict per input: path, label, score, overlay (and map), or path and error for an
    unreadable image; `log` gets each as it is done. labels: one class per path to explain
    (`imgcls predict --explain`: the predicted one), instead of `target` for all.
    """
    index = explainer.class_index(target)  # an unknown label fails before any image is read
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} images")
    targets = [explainer.class_index(label) for label in labels] if labels is not None else [index] * len(paths)
    out = Path(out_dir)
    stems = [Path(p).stem.casefold() for p in paths]
    by_class = len(set(stems)) < len(stems)
    taken = _inputs_inside(paths, out)  # never write an overlay over an input image
    results = []
    for p, k in zip(paths, targets):
        try:
            e = explainer.explain(p, k)
        except ImageDecodeError as err:
            results.append({"path": p, "error": err.reason or str(err)})
        else:
            name = output_stem(p, e.label, by_class, taken)
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            r = {"path": p, "label": e.label, "score": e.score, "overlay": str(out / f"{name}.png")}
            with atomic_path(r["overlay"]) as tmp:
                e.overlay.save(tmp, format="PNG")
            if save_maps:
                r["map"] = str(out / f"{name}.npy")
                with atomic_path(r["map"]) as tmp, open(tmp, "wb") as f:
                    np.save(f, e.map)
            results.append(r)
        if log is not None:
            log(results[-1])
    return results
