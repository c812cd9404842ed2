"""Export: a model folder -> a self-describing ONNX file, checked against torch on real images.

The graph takes the normalised float32 batch (B, 3, H, W) named "input" (B dynamic) and returns
"logits"; a multi-label model's graph also returns "probabilities", sigmoid(logits / T) with its
per-label temperatures, for users of the file outside imgcls, and its metadata holds "task",
"thresholds" and "label_temperatures" (imgcls's runner reads the logits and applies those, as
torch predict does; the parity check compares both outputs with torch). Class names, the
preprocessing spec, arch, imgcls version, the calibration ("calibration", "unknown", "conformal":
`inference.trust`) and the TTA mode live in the ONNX metadata, so a .onnx file alone is enough
to predict (`inference.runners.OnnxRunner`, which also runs the parity check here). This module
only exports; loading a model for prediction never calls it. onnx and onnxruntime are the
optional extra `imgcls[onnx]` and are imported only inside functions.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

import imgcls
from imgcls.artifact import load_artifact, resolve_artifact_dir, spec_of
from imgcls.atomic import atomic_path
from imgcls.inference.runners import INPUT_NAME, JSON_KEYS, ONNX_FORMAT, OUTPUT_NAME, PROBS_NAME, OnnxRunner
from imgcls.inference.runners import ONNX_FILE as ONNX_FILE  # the default output; `imgcls export` names it from here
from imgcls.inference.trust import MULTI_LABEL, Trust
from imgcls.io import ImageDecodeError, is_image_path, load_image
from imgcls.runtime import batch_slices, batched_logits
from imgcls.transforms import PreprocessSpec, eval_transform, resize_image, to_batch

DEFAULT_OPSET = 17
QUANTIZE_CHOICES = ("int8",)
MAX_CHECK_IMAGES = 1000  # parity / accuracy images: enough to catch a broken op, seconds on a CPU
N_SYNTHETIC = 8
# The ops that hold the weights and the time, plus the activations after them: with Clip/Relu in
# the list the quantizer folds ReLU6 into the conv's output range. Without them a conv output such
# as EfficientNet-Lite's stem (about +-80) gets one uint8 scale that leaves ~10 levels for the
# [0, 6] ReLU6 keeps; pretrained Lite0's int8 top-1 agreed with fp32 on 9 of 14 photos, 12 with.
# A BatchNorm left after a max-pool (small_cnn) stays float.
QUANT_OPS = ["Conv", "Gemm", "MatMul", "Clip", "Relu"]


class ExportError(ValueError):
    """The exported graph disagrees with torch, or the export cannot be done as asked."""


def _import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ExportError('ONNX export and the onnx backend need onnx and onnxruntime: pip install "imgcls[onnx]"') from None
    return onnx, onnxruntime


def onnx_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """model.json -> the ONNX metadata_props (strings; JSON for JSON_KEYS) that make a .onnx self-describing."""
    keep = {
        "arch": meta["arch"],
        "class_names": list(meta["class_names"]),
        "preprocess": spec_of(meta).to_dict(),
        "imgcls_version": imgcls.__version__,
    }
    keys = ("calibration", "unknown", "conformal", "tta", "task", "thresholds", "label_temperatures")
    for key in keys:  # temperature, "unknown" rule, conformal scores; the default TTA mode; multi-label thresholds
        if meta.get(key) is not None:
            keep[key] = meta[key]
    return {"format": ONNX_FORMAT, **{k: json.dumps(v) if k in JSON_KEYS else str(v) for k, v in keep.items()}}


def _set_metadata(model: Any, props: dict[str, str]) -> None:
    model.ClearField("metadata_props")
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


class CheckImages(NamedTuple):
    images: np.ndarray  # uint8 (N, S, S, 3), prepared like predict's inputs
    labels: np.ndarray | None
    source: str
    real: bool  # False: synthetic noise, fit for parity but not for calibration or accuracy


def _prepare_paths(paths: list[str], spec: PreprocessSpec) -> tuple[np.ndarray, list[int]]:
    """Decode + resize like predict/evaluate; returns (N, S, S, 3) uint8 and the indices kept."""

    def one(p: str) -> np.ndarray | None:
        try:
            return resize_image(load_image(p, draft_size=spec.cache_size), spec)
        except ImageDecodeError:
            return None

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as ex:  # Pillow releases the GIL while decoding
        arrays = list(ex.map(one, paths))
    keep = [i for i, a in enumerate(arrays) if a is not None]
    s = spec.cache_size
    return (np.stack([arrays[i] for i in keep]) if keep else np.zeros((0, s, s, 3), np.uint8)), keep


def _evenly(items: list[Any], n: int) -> list[Any]:
    # A fixed, evenly spaced subset: split lists are ordered by class, so a prefix would not be.
    if len(items) <= n:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def check_images(
    model_dir: Path,
    meta: dict[str, Any],
    spec: PreprocessSpec,
    data: str | os.PathLike | None = None,
    need_labels: bool = False,
    max_images: int = MAX_CHECK_IMAGES,
) -> CheckImages:
    """Images for the parity check and the int8 accuracy, prepared as predict prepares its inputs.

    `data` (any dataset layout, or a plain folder of images) wins when given; else the validation
    (or test) split recorded in split.json; else a few synthetic noise images.
    """
    paths: list[str] = []
    labels: list[int] | None = None
    source = ""
    if data is not None:
        from imgcls.data import DatasetError, index_dataset  # imported here: data is optional for an export

        try:
            index = index_dataset(data, class_names=list(meta["class_names"]))
            name = next(s for s in ("val", "test", "all", "train") if index.splits.get(s))
            samples = _evenly(index.splits[name], max_images)
            paths, labels, source = [p for p, _ in samples], [y for _, y in samples], f"{data} ({name} split)"
        except (DatasetError, StopIteration):  # not labeled the model's way: use its images, unlabeled
            root = Path(data)
            found = sorted(str(f) for f in root.rglob("*") if f.is_file() and is_image_path(f)) if root.is_dir() else []
            paths = _evenly(found, max_images)
            source = f"{data} (unlabeled)"
    elif (model_dir / "split.json").is_file() and meta.get("dataset", {}).get("root"):
        splits = json.loads((model_dir / "split.json").read_text(encoding="utf-8"))
        name = next((s for s in ("val", "test") if splits.get(s)), None)
        root = Path(meta["dataset"]["root"])
        base = root.parent if root.suffix.lower() == ".csv" else root  # split.json paths are relative to the CSV's folder
        if name:
            rel = _evenly(splits[name], max_images)
            paths, source = [os.path.normpath(base / r) for r in rel], f"{name} split of {root} (split.json)"
            if need_labels:
                outside = meta.get("config", {}).get("data", {}).get("allow_outside_root", False)
                labels = _split_labels(root, paths, list(meta["class_names"]), outside)
    images, keep = _prepare_paths(paths, spec)
    if len(images):
        kept_labels = np.asarray([labels[i] for i in keep]) if labels is not None else None
        return CheckImages(images, kept_labels, f"{len(images)} images from {source}", True)
    rng = np.random.default_rng(0)
    s = spec.cache_size
    images = rng.integers(0, 256, size=(N_SYNTHETIC, s, s, 3), dtype=np.uint8)
    where = f" in {source}" if source else ""
    why = f"no readable validation images{where}; pass --data DIR for real ones"
    return CheckImages(images, None, f"{N_SYNTHETIC} synthetic noise images ({why})", False)


def _split_labels(root: Path, paths: list[str], class_names: list[str], allow_outside_root: bool = False) -> list[int] | None:
    """Labels of split.json paths, by indexing the dataset again; None if it moved or changed."""
    from imgcls.data import DatasetError, index_dataset

    try:
        index = index_dataset(root, class_names=class_names, allow_outside_root=allow_outside_root)
    except DatasetError:
        return None
    lookup = {os.path.normpath(p): y for samples in index.splits.values() for p, y in samples}
    labels = [lookup.get(p) for p in paths]
    return None if any(y is None for y in labels) else labels  # type: ignore[return-value]


class _WithSigmoid(torch.nn.Module):
    """A multi-label model's export: (logits, sigmoid(logits / T)) with its per-label temperatures T (C,)."""

    def __init__(self, model: torch.nn.Module, temperatures: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("temperatures", torch.as_tensor(temperatures, dtype=torch.float32).reshape(1, -1))  # (1, C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.model(x)  # (B, C)
        return z, torch.sigmoid(z / self.temperatures)


def _decisions(probs: np.ndarray, trust: Trust) -> np.ndarray:
    """What a prediction decides, to count agreement: the top class (N,), or a multi-label
    model's labels at or above their thresholds (N, C)."""
    return probs >= trust.thresholds if trust.multilabel else probs.argmax(1)


def _probs(logits: torch.Tensor, trust: Trust) -> np.ndarray:
    """Probabilities compared by the parity check: softmax without temperature, or a multi-label model's calibrated sigmoids."""
    return trust.apply(logits).probs if trust.multilabel else torch.softmax(logits, 1).numpy()


def _export_graph(model: torch.nn.Module, spec: PreprocessSpec, opset: int) -> Any:
    onnx, _ = _import_onnx()
    outputs = [OUTPUT_NAME, PROBS_NAME] if isinstance(model, _WithSigmoid) else [OUTPUT_NAME]
    x = torch.zeros(2, 3, spec.img_size, spec.img_size)  # (B, 3, H, W); B = 2 so no size-1 broadcast gets baked in
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # TracerWarnings come from Conv2dSame's pad sizes, which are constants for this H, W (the
        # only dynamic axis is batch); export_onnx's parity check is what tells a good graph from a bad one.
        warnings.simplefilter("ignore")
        # dynamo=False: the torch.export-based exporter needs onnxscript, which imgcls does not depend on.
        torch.onnx.export(
            model,
            (x,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def export_onnx(
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    data: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write `out_path` (.onnx) from a model folder, after checking it against torch fp32.

    Raises `ExportError` (and writes nothing) if onnxruntime's top-1 differs from torch's on any
    check image. quantize="int8" also writes `<out>.int8.onnx` (static QDQ, calibrated on the
    check images, which must then be real) and reports accuracy before and after.
    Returns the report: path, n_images, image_source, max_abs_diff, top1_agreement, and when
    quantised int8_path, accuracy_fp32, accuracy_int8, int8_top1_agreement.
    """
    onnx, _ = _import_onnx()
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ExportError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    src = resolve_artifact_dir(model_dir)
    model, meta = load_artifact(src)  # fp32 on CPU: the reference the graph must match
    spec = spec_of(meta)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    trust = Trust.from_meta(meta) if meta.get("task") == MULTI_LABEL else Trust()  # only the thresholds matter here
    # A multi-label dataset is not indexed by class folders: its int8 accuracy is not measured (agreement is).
    check = check_images(src, meta, spec, data, need_labels=quantize is not None and not trust.multilabel)
    images = check.images
    log(f"check images: {check.source}")
    if quantize and not check.real:  # noise is no calibration set: its ranges would clip real activations
        raise ExportError("int8 quantisation calibrates on real images: pass --data DIR (labeled, to measure accuracy)")
    ref = _probs(batched_logits(model, images, spec, amp_dtype=None), trust)  # (N, num_classes)

    graph = _export_graph(_WithSigmoid(model, trust.label_temperatures).eval() if trust.multilabel else model, spec, opset)  # type: ignore[arg-type]
    props = onnx_metadata(meta)
    _set_metadata(graph, props)
    what = "the labels above their thresholds" if trust.multilabel else "the top-1 class"
    with atomic_path(out) as tmp:  # renamed over `out` only when the parity check passes
        onnx.save(graph, str(tmp))
        runner = OnnxRunner(tmp)
        probs = _probs(runner(images), trust)
        diff = float(np.abs(probs - ref).max())
        if trust.multilabel:  # the graph's own sigmoid output, as a user outside imgcls reads it
            x = eval_transform(to_batch(images), spec).contiguous().numpy()  # (N, 3, H, W)
            diff = max(diff, float(np.abs(runner.session.run([PROBS_NAME], {INPUT_NAME: x})[0] - ref).max()))
        same = _decisions(probs, trust) == _decisions(ref, trust)
        agree = int((same.all(1) if same.ndim == 2 else same).sum())
        log(
            f"parity onnxruntime vs torch fp32 on {len(images)} images: max abs diff of probabilities {diff:.2e}, "
            f"{'label-set' if trust.multilabel else 'top-1'} agreement {agree}/{len(images)}"
        )
        if agree < len(images):
            wrong = len(images) - agree
            raise ExportError(f"ONNX export disagrees with torch on {what} of {wrong} of {len(images)} images; {out} not written")
    shape = f"(batch, 3, {spec.img_size}, {spec.img_size})"
    outputs = f"outputs {OUTPUT_NAME!r}, {PROBS_NAME!r} (calibrated sigmoids)" if trust.multilabel else f"output {OUTPUT_NAME!r}"
    log(f"wrote {out} (opset {opset}, input {INPUT_NAME!r} {shape} float32 normalised, {outputs})")
    report: dict[str, Any] = {
        "path": str(out),
        "opset": opset,
        "n_images": len(images),
        "image_source": check.source,
        "max_abs_diff": diff,
        "top1_agreement": agree / len(images),
    }
    if quantize == "int8":
        report.update(_quantize_int8(out, props, check, probs, spec, trust, log=log))
    return report


def _quantize_int8(
    out: Path,
    props: dict[str, str],
    check: CheckImages,
    fp32_probs: np.ndarray,
    spec: PreprocessSpec,
    trust: Trust,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Write `<out stem>.int8.onnx`: static QDQ int8, calibrated on part of the check images
    (`calibration_split`); accuracy before and after and agreement with fp32 on the rest, also
    recorded in the file's metadata ("int8_agreement")."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib_idx, held = calibration_split(len(check.images))
    calib = check.images[calib_idx]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batch_slices(len(calib), 32))

        def get_next(self) -> dict[str, np.ndarray] | None:
            sl = next(self.batches, None)
            return None if sl is None else {INPUT_NAME: eval_transform(to_batch(calib[sl]), spec).contiguous().numpy()}

    q_out = out.with_suffix(".int8.onnx")
    how = f"static QDQ, per-channel weights, first conv float, calibrated on {len(calib)} images"
    # The pre-processed graph is an intermediate, never shipped: a scratch folder next to the output.
    with atomic_path(q_out) as tmp, tempfile.TemporaryDirectory(dir=q_out.parent, prefix=f".{q_out.name}.") as scratch:
        pre = Path(scratch) / "preprocessed.onnx"
        # Shape inference + graph optimisation first, as onnxruntime advises: the int8 EfficientNet-Lite0
        # then ran at 11 ms/image instead of 18 (fp32: 31) on the idle 2-core CPU here. onnx's own shape
        # inference suffices (H, W are fixed); the symbolic pass fails on opset >= 18 graphs.
        quant_pre_process(str(out), str(pre), skip_symbolic_shape=True)
        # The first conv stays float: it sees the image itself and is a sliver of the compute, and
        # small_cnn's frozen whitening conv scales low-variance patch directions up by as much as 45x,
        # quantisation noise included (int8 digits accuracy 0.65 -> 0.11 with it quantised, 0.60 without).
        first_conv = next((n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"), "")
        # Per-channel weight scales: one scale per tensor loses too much on depthwise convs, whose
        # BN-folded channels differ in range by 100x (EfficientNet-Lite, MobileNet).
        quantize_static(
            str(pre),
            str(tmp),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            op_types_to_quantize=QUANT_OPS,
            nodes_to_exclude=[first_conv] if first_conv else [],
        )
        q = onnx.load(str(tmp))
        _set_metadata(q, {**props, "quantization": f"int8 {how}"})
        onnx.save(q, str(tmp))
        q_probs = _probs(OnnxRunner(tmp)(check.images), trust)
        acc, agree, n = _int8_agreement(q_probs, fp32_probs, check.labels, held, trust)
        # Recorded in the file: backend "auto" runs it only on enough held-out agreement (runners.int8_trusted).
        record = {"top1": agree, "images": n, "held_out": bool(held)}
        _set_metadata(q, {**props, "quantization": f"int8 {how}", "int8_agreement": json.dumps(record)})
        onnx.save(q, str(tmp))
    log(f"wrote {q_out} (int8, {how}; {q_out.stat().st_size / 1e6:.2f} MB vs {out.stat().st_size / 1e6:.2f} MB)")
    shown = "n/a (labels unknown)" if acc["fp32"] is None else f"fp32 {acc['fp32']:.4f} -> int8 {acc['int8']:.4f}"
    views = "" if props.get("tta", "none") == "none" else f" (one view each, not the model's {props['tta']} TTA)"
    what = "label set" if trust.multilabel else "top-1"
    where = f"{n} held-out check images" if held else f"{n} check images (all calibrated on: too few to hold any out)"
    log(f"accuracy on {where}{views}: {shown}; int8 {what} agrees with fp32 on {agree:.1%}")
    return {
        "int8_path": str(q_out),
        "accuracy_fp32": acc["fp32"],
        "accuracy_int8": acc["int8"],
        "int8_top1_agreement": agree,
        "int8_agreement_images": n,
        "int8_held_out": bool(held),
        "int8_method": how,
    }


# Fewer check images than twice this: all calibrate and the agreement is measured on them too
# (recorded as not held out, which backend "auto" does not trust).
MIN_HELD_OUT = 20


def calibration_split(n: int, max_calib: int = 256) -> tuple[list[int], list[int]]:
    """(calibration indices, held-out indices) of n check images: an evenly spaced half, at most
    `max_calib` (min/max ranges settle within a few hundred images), calibrates; the rest measures
    int8 against fp32 on images its ranges were not fitted to."""
    idx = list(range(n))
    if n < 2 * MIN_HELD_OUT:
        return _evenly(idx, max_calib), []
    calib = _evenly(idx, min(max_calib, n // 2))
    chosen = set(calib)
    return calib, [i for i in idx if i not in chosen]


def _int8_agreement(
    q_probs: np.ndarray, fp32_probs: np.ndarray, labels: np.ndarray | None, held: list[int], trust: Trust
) -> tuple[dict[str, float | None], float, int]:
    """({fp32, int8} accuracy, share of equal decisions, images) on the held-out images (all when none)."""
    keep = np.asarray(held) if held else np.arange(len(q_probs))
    probs = {"fp32": fp32_probs[keep], "int8": q_probs[keep]}
    acc = {k: None if labels is None else float((p.argmax(1) == labels[keep]).mean()) for k, p in probs.items()}
    same = _decisions(probs["int8"], trust) == _decisions(probs["fp32"], trust)
    return acc, float((same.all(1) if same.ndim == 2 else same).mean()), len(keep)
