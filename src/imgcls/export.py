"""Export: a model folder -> a self-describing ONNX file, checked against torch on real images.

The graph takes the normalised float32 batch (B, 3, H, W) named "input" (B dynamic) and returns
"logits"; class names, the preprocessing spec, arch, imgcls version and any calibration and TTA
mode live in the ONNX metadata, so a .onnx file alone is enough to predict (`OnnxRunner`). onnx and
onnxruntime are the optional extra `imgcls[onnx]` and are imported only here, inside functions.
"""

from __future__ import annotations

import io
import json
import os
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

import imgcls
from imgcls.artifact import META_FILE, WEIGHTS_FILE, ArtifactError, load_artifact, resolve_artifact_dir, spec_of
from imgcls.io import ImageDecodeError, is_image_path, load_image
from imgcls.runtime import batch_slices, batched_logits, inference_batch_size
from imgcls.transforms import PreprocessSpec, eval_transform, resize_image, to_batch

ONNX_FILE = "model.onnx"
DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
QUANTIZE_CHOICES = ("int8",)
JSON_KEYS = ("class_names", "preprocess", "calibration")
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
    keep = {"arch": meta["arch"], "class_names": list(meta["class_names"]), "preprocess": spec_of(meta).to_dict(), "imgcls_version": imgcls.__version__}
    for key in ("calibration", "tta"):  # temperature etc., and the TTA mode predict applies by default
        if meta.get(key) is not None:
            keep[key] = meta[key]
    return {"format": "imgcls-onnx", **{k: json.dumps(v) if k in JSON_KEYS else str(v) for k, v in keep.items()}}


def _set_metadata(model: Any, props: dict[str, str]) -> None:
    model.ClearField("metadata_props")
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


def _temp_path(out: Path) -> Path:
    # Same folder, so os.replace is atomic; not mkstemp, whose 0600 mode would stick to a file meant to be shipped.
    return out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


class OnnxRunner:
    """uint8 prepared images (N, S, S, 3) -> float32 logits (N, num_classes) via onnxruntime (CPU)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        _, ort = _import_onnx()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
        opts.log_severity_level = 3  # errors only: graph optimisation warns about every constant it folds away
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        if props.get("format") != "imgcls-onnx":
            raise ExportError(f"{path}: not an imgcls ONNX export (no imgcls metadata); export it with `imgcls export`")
        self.meta: dict[str, Any] = {k: json.loads(v) if k in JSON_KEYS else v for k, v in props.items() if k != "format"}
        self.spec = PreprocessSpec.from_dict(self.meta["preprocess"])

    def __call__(self, images: np.ndarray, batch_size: int | None = None) -> torch.Tensor:
        out = []
        for sl in batch_slices(len(images), batch_size or inference_batch_size(self.spec.img_size)):
            # Same eval_transform as torch; ONNX wants a plain NCHW buffer, not channels_last strides.
            x = eval_transform(to_batch(np.asarray(images[sl])), self.spec).contiguous()  # (B, 3, H, W)
            out.append(self.session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
        return torch.from_numpy(np.concatenate(out)) if out else torch.empty(0, 0)


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
    model_dir: Path, meta: dict[str, Any], spec: PreprocessSpec, data: str | os.PathLike | None = None, need_labels: bool = False, max_images: int = MAX_CHECK_IMAGES
) -> CheckImages:
    """Images for the parity check and the int8 accuracy, prepared as predict prepares its inputs.

    `data` (any dataset layout, or a plain folder of images) wins when given; else the validation
    (or test) split recorded in split.json; else a few synthetic noise images.
    """
    paths: list[str] = []
    labels: list[int] | None = None
    source = ""
    if data is not None:
        from imgcls.data import DatasetError, index_dataset  # only here: predict's auto-export never passes data

        try:
            index = index_dataset(data, class_names=list(meta["class_names"]))
            name = next(s for s in ("val", "test", "all", "train") if index.splits.get(s))
            samples = _evenly(index.splits[name], max_images)
            paths, labels, source = [p for p, _ in samples], [y for _, y in samples], f"{data} ({name} split)"
        except (DatasetError, StopIteration):  # not labeled the model's way: use its images, unlabeled
            root = Path(data)
            paths = _evenly(sorted(str(f) for f in root.rglob("*") if f.is_file() and is_image_path(f)), max_images) if root.is_dir() else []
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
                labels = _split_labels(root, paths, list(meta["class_names"]))
    images, keep = _prepare_paths(paths, spec)
    if len(images):
        return CheckImages(images, np.asarray([labels[i] for i in keep]) if labels is not None else None, f"{len(images)} images from {source}", True)
    rng = np.random.default_rng(0)
    s = spec.cache_size
    images = rng.integers(0, 256, size=(N_SYNTHETIC, s, s, 3), dtype=np.uint8)
    return CheckImages(images, None, f"{N_SYNTHETIC} synthetic noise images (no readable validation images{' in ' + source if source else ''}; pass --data DIR for real ones)", False)


def _split_labels(root: Path, paths: list[str], class_names: list[str]) -> list[int] | None:
    """Labels of split.json paths, by indexing the dataset again; None if it moved or changed."""
    from imgcls.data import DatasetError, index_dataset

    try:
        index = index_dataset(root, class_names=class_names)
    except DatasetError:
        return None
    lookup = {os.path.normpath(p): y for samples in index.splits.values() for p, y in samples}
    labels = [lookup.get(p) for p in paths]
    return None if any(y is None for y in labels) else labels  # type: ignore[return-value]


def _export_graph(model: torch.nn.Module, spec: PreprocessSpec, opset: int) -> Any:
    onnx, _ = _import_onnx()
    x = torch.zeros(2, 3, spec.img_size, spec.img_size)  # (B, 3, H, W); B = 2 so no size-1 broadcast gets baked in
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # TracerWarnings come from Conv2dSame's pad sizes, which are constants for this H, W (the
        # only dynamic axis is batch); export_onnx's parity check is what tells a good graph from a bad one.
        warnings.simplefilter("ignore")
        # dynamo=False: the torch.export-based exporter needs onnxscript, which imgcls does not depend on.
        torch.onnx.export(
            model, (x,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def export_onnx(
    model_dir: str | os.PathLike, out_path: str | os.PathLike, opset: int = DEFAULT_OPSET, quantize: str | None = None,
    data: str | os.PathLike | None = None, log: Callable[[str], None] = print,
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
    check = check_images(src, meta, spec, data, need_labels=quantize is not None)
    images = check.images
    log(f"check images: {check.source}")
    if quantize and not check.real:  # noise is no calibration set: its ranges would clip real activations
        raise ExportError("int8 quantisation calibrates on real images: pass --data DIR (labeled, to measure accuracy)")
    ref = torch.softmax(batched_logits(model, images, spec, amp_dtype=None), 1).numpy()  # (N, num_classes)

    graph = _export_graph(model, spec, opset)
    props = onnx_metadata(meta)
    _set_metadata(graph, props)
    tmp = _temp_path(out)
    try:
        onnx.save(graph, str(tmp))
        probs = torch.softmax(OnnxRunner(tmp)(images), 1).numpy()
        diff = float(np.abs(probs - ref).max())
        agree = int((probs.argmax(1) == ref.argmax(1)).sum())
        log(f"parity onnxruntime vs torch fp32 on {len(images)} images: max abs diff of probabilities {diff:.2e}, top-1 agreement {agree}/{len(images)}")
        if agree < len(images):
            raise ExportError(f"ONNX export disagrees with torch on the top-1 class of {len(images) - agree} of {len(images)} images; {out} not written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"wrote {out} (opset {opset}, input {INPUT_NAME!r} (batch, 3, {spec.img_size}, {spec.img_size}) float32 normalised, output {OUTPUT_NAME!r})")
    report: dict[str, Any] = {"path": str(out), "opset": opset, "n_images": len(images), "image_source": check.source, "max_abs_diff": diff, "top1_agreement": agree / len(images)}
    if quantize == "int8":
        report.update(_quantize_int8(out, props, check, probs, spec, log=log))
    return report


def _quantize_int8(out: Path, props: dict[str, str], check: CheckImages, fp32_probs: np.ndarray, spec: PreprocessSpec, log: Callable[[str], None]) -> dict[str, Any]:
    """Write `<out stem>.int8.onnx`: static QDQ int8, calibrated on the check images; accuracy before and after."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib = check.images[_evenly(list(range(len(check.images))), 256)]  # min/max ranges settle within a few hundred images

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batch_slices(len(calib), 32))

        def get_next(self) -> dict[str, np.ndarray] | None:
            sl = next(self.batches, None)
            return None if sl is None else {INPUT_NAME: eval_transform(to_batch(calib[sl]), spec).contiguous().numpy()}

    q_out = out.with_suffix(".int8.onnx")
    tmp, pre = _temp_path(q_out), _temp_path(q_out)
    how = f"static QDQ, per-channel weights, first conv float, calibrated on {len(calib)} images"
    try:
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
            str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8, op_types_to_quantize=QUANT_OPS, nodes_to_exclude=[first_conv] if first_conv else [],
        )
        q = onnx.load(str(tmp))
        _set_metadata(q, {**props, "quantization": f"int8 {how}"})
        onnx.save(q, str(tmp))
        q_probs = torch.softmax(OnnxRunner(tmp)(check.images), 1).numpy()
        os.replace(tmp, q_out)
    finally:
        tmp.unlink(missing_ok=True)
        pre.unlink(missing_ok=True)
    acc = {k: None if check.labels is None else float((p.argmax(1) == check.labels).mean()) for k, p in (("fp32", fp32_probs), ("int8", q_probs))}
    agree = float((q_probs.argmax(1) == fp32_probs.argmax(1)).mean())
    log(f"wrote {q_out} (int8, {how}; {q_out.stat().st_size / 1e6:.2f} MB vs {out.stat().st_size / 1e6:.2f} MB)")
    shown = "n/a (labels unknown)" if check.labels is None else f"fp32 {acc['fp32']:.4f} -> int8 {acc['int8']:.4f}"
    views = "" if props.get("tta", "none") == "none" else f" (one view each, not the model's {props['tta']} TTA)"
    log(f"accuracy on {len(check.images)} check images{views}: {shown}; int8 top-1 agrees with fp32 on {agree:.1%}")
    return {"int8_path": str(q_out), "accuracy_fp32": acc["fp32"], "accuracy_int8": acc["int8"], "int8_top1_agreement": agree, "int8_method": how}


def onnx_runner_for(path: str | os.PathLike, log: Callable[[str], None] = print) -> OnnxRunner:
    """An `OnnxRunner` for a .onnx file, or for a model folder's model.onnx.

    A folder's model.onnx is exported (with its parity check) when missing or older than the
    weights or model.json, so the ONNX graph cannot silently lag behind the model it came from.
    """
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".onnx":
        return OnnxRunner(p)
    try:
        folder = resolve_artifact_dir(p)
    except ArtifactError as e:
        raise ArtifactError(f"{e} (backend onnx takes a model folder or a .onnx file)") from None
    target = folder / ONNX_FILE
    newest = max((folder / WEIGHTS_FILE).stat().st_mtime_ns, (folder / META_FILE).stat().st_mtime_ns)
    if not target.is_file() or target.stat().st_mtime_ns < newest:
        log(f"{target} is {'stale' if target.is_file() else 'missing'}: exporting")
        try:
            export_onnx(folder, target, log=log)
        except PermissionError as e:  # a read-only model folder: say how to export elsewhere
            raise ExportError(f"cannot write {target} ({e.strerror}); run `imgcls export {folder} --out FILE.onnx` and load FILE.onnx") from None
    return OnnxRunner(target)
