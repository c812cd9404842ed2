"""Prediction: `Classifier.load(MODEL).predict(images)`, and path expansion for the CLI.

Every input goes through the same two steps as the evaluation cache (`io.load_image`, then
`transforms.resize_image`), a backend's runner (`inference.runners`: torch through
`runtime.batched_logits`, or onnxruntime) with the same test-time augmentation on top
(`runtime.tta_logits`), and `inference.answer` (the model's temperature and "unknown" rule, then
the answer dict the CLI and the server return too), so predict on a validation image gives what
evaluation gave.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgcls.artifact import load_artifact, resolve_artifact_dir, spec_of
from imgcls.config import BACKENDS
from imgcls.inference.answer import answer, error_answer, explain_target, postprocess
from imgcls.inference.runners import (
    ONNX_FILE,
    ONNX_INT8_FILE,
    OnnxRunner,
    Runner,
    TorchRunner,
    choose_onnx_runner,
    load_onnx_runner,
    split_features,
)
from imgcls.inference.trust import Outputs, Trust, logits_only, read_ood_stats
from imgcls.io import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageSource, is_image_path, load_image
from imgcls.models import create_model, get_entry
from imgcls.runtime import prepare_inference_model, resolve_device, resolve_precision, resolve_tta, tta_logits, tta_view_count
from imgcls.threads import ThreadTuner, usable_cores
from imgcls.transforms import PreprocessSpec, resize_image

PRETRAINED_PREFIX = "imagenet"
DEFAULT_IMAGENET_MODEL = "efficientnet_lite0"
DECODE_CHUNK = 64  # inputs decoded ahead of the model in iter_predict


def _source_name(x: Any, i: int) -> str:
    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x)
    return getattr(x, "filename", "") or f"<input {i}>"


class Classifier:
    """A loaded model with its class names and preprocessing, ready to predict.

    The backend only changes the forward pass (`runner`, an `inference.runners.Runner`: a
    TorchRunner for `model`, or the OnnxRunner that `load(..., backend="onnx")` passes, with
    `model` None); decoding, resizing, batching, TTA and the answer are shared.
    compile="auto" compiles the torch model with torch.compile when a `predict`/`iter_predict`
    call over a list is long enough for that to pay (1.5 minutes of work or more, see
    `runtime.CompiledForward`); "on" always, "off" never. `log` receives such notices.
    `trust` (`inference.trust.Trust`, from model.json) holds the temperature the probabilities are
    calibrated with, the "unknown" rule and the conformal scores; unknown_threshold overrides the
    rule's threshold (in its method's units, a probability for msp; 0 turns "unknown" answers off).
    A mahalanobis or knn rule scores pooled features against `ood_stats` (the model folder's
    ood.safetensors, which `load` reads): the TorchRunner then returns the features with the
    logits; a runner without features (onnx) applies the rule's stored msp fallback, with a warning.
    threads: torch intra-op threads of the forward passes; None: one or every usable core,
    whichever the first passes ran faster, re-checked as the load changes (`threads.ThreadTuner`).
    """

    def __init__(
        self,
        model: nn.Module | None,
        meta: dict[str, Any],
        device: str = "auto",
        precision: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        runner: Runner | None = None,
        tta: str = "auto",
        compile: str = "auto",
        log: Callable[[str], None] | None = None,
        unknown_threshold: float | None = None,
        ood_stats: dict[str, torch.Tensor] | None = None,
        threads: int | None = None,
    ) -> None:
        if runner is None and model is None:
            raise ValueError("Classifier needs a model or a runner")
        if runner is not None and not getattr(runner, "features", False):  # onnx: no pooled features for a mahalanobis/knn rule
            meta, note = logits_only(meta)
            if note:
                (log or warnings.warn)(note)
        self.meta = meta
        self.class_names: list[str] = list(meta["class_names"])
        self.spec: PreprocessSpec = spec_of(meta)
        self.max_pixels = max_pixels
        self.trust = Trust.from_meta(meta, unknown_threshold, ood_stats)
        self.tta = resolve_tta(tta, meta)  # "auto": model.json's recommendation, as `imgcls evaluate` uses
        if runner is not None:  # onnxruntime runs on the CPU in float32
            self.device, self.amp_dtype, self.model, self.runner = torch.device("cpu"), None, model, runner
            return
        self.device = resolve_device(device)
        self.amp_dtype = resolve_precision(precision, self.device)  # names the precision even when the weights carry it
        # bf16 weights once on AMX CPUs (autocast then off), as evaluate does
        self.model, run_dtype = prepare_inference_model(model, self.device, self.amp_dtype)
        # threads None/0: timed from the first forward passes, on the CPU (CUDA's are asynchronous)
        tuner = ThreadTuner(fixed=threads or (None if self.device.type == "cpu" else torch.get_num_threads()), log=log)
        self.runner = TorchRunner(self.model, self.spec, self.device, run_dtype, compile, log, self.trust.uses_features, tuner)

    @property
    def multilabel(self) -> bool:
        """True for a multi-label model (model.json "task": "multi-label"): answers list every label above its threshold."""
        return self.trust.multilabel

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str = "auto", precision: str = "auto", backend: str = "torch", **kwargs: Any
    ) -> Classifier:
        """A model folder from `imgcls train`, or "imagenet[:ARCH]" for a pretrained ImageNet model.

        backend="onnx" runs onnxruntime on the CPU instead of torch: `path` is then a .onnx file
        or a model folder with an up-to-date model.onnx from `imgcls export MODEL` (loading never
        exports; `inference.runners.BackendError` says so); "onnx-int8" its model.int8.onnx
        (`imgcls export MODEL --quantize int8`). "auto": for a model folder on the CPU whose
        "unknown" rule needs no pooled features, the int8 graph when its export measured top-1
        agreement with fp32 >= `runners.INT8_MIN_AGREEMENT` on held-out images, else an up-to-date
        model.onnx, else torch (`runners.choose_onnx_runner`; `log` says which and why).
        kwargs["threads"] also sets onnxruntime's intra-op threads.
        """
        s = os.fspath(path)
        pretrained = s == PRETRAINED_PREFIX or s.startswith(PRETRAINED_PREFIX + ":") and not Path(s).exists()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        runner = None
        if backend == "auto":
            runner = None if pretrained else _auto_runner(path, device, kwargs.get("threads"), kwargs.get("log"))
        elif backend in ("onnx", "onnx-int8"):
            if pretrained:
                raise ValueError(f"backend {backend!r} takes a model folder or a .onnx file, not the built-in ImageNet model")
            runner = load_onnx_runner(path, int8=backend == "onnx-int8", threads=kwargs.get("threads"))
        if runner is not None:
            name = "onnx-int8" if runner.path.name.endswith(".int8.onnx") or "quantization" in runner.meta else "onnx"
            return cls(None, {**runner.meta, "source": s, "backend": name, "onnx_path": str(runner.path)}, runner=runner, **kwargs)
        if pretrained:
            return cls.imagenet(s.partition(":")[2] or DEFAULT_IMAGENET_MODEL, device=device, precision=precision, **kwargs)
        model, meta = load_artifact(path)
        meta = {**meta, "source": str(path)}
        stats = read_ood_stats(resolve_artifact_dir(path), meta)  # a mahalanobis or knn "unknown" rule's statistics
        return cls(model, meta, device=device, precision=precision, ood_stats=stats, **kwargs)

    @classmethod
    def imagenet(cls, arch: str = DEFAULT_IMAGENET_MODEL, **kwargs: Any) -> Classifier:
        """The registry's pretrained 1000-class ImageNet model, with the ImageNet class names."""
        from imgcls.models.imagenet import imagenet_class_names

        entry = get_entry(arch)
        model = create_model(arch, num_classes=entry.pretrained_classes, pretrained=True)
        meta = {
            "arch": arch,
            "class_names": imagenet_class_names(),
            "preprocess": entry.default_spec.to_dict(),
            "source": f"{PRETRAINED_PREFIX}:{arch}",
            "weights": entry.pretrained_source,
        }
        return cls(model, meta, **kwargs)

    # ------------------------------------------------------------------ preprocessing

    def prepare(self, source: ImageSource, name: str | None = None) -> np.ndarray:
        """One input -> the uint8 (S, S, 3) array the model sees (before normalisation)."""
        img = load_image(source, name=name, max_pixels=self.max_pixels, draft_size=self.spec.cache_size)
        return resize_image(img, self.spec)

    def _prepare_or_error(self, source: Any, name: str) -> np.ndarray | ImageDecodeError:
        try:
            return self.prepare(source, name)
        except ImageDecodeError as e:
            return e

    # ------------------------------------------------------------------ inference

    def infer_arrays(self, arrays: np.ndarray, batch_size: int | None = None, trust: Trust | None = None) -> Outputs:
        """uint8 (N, S, S, 3) prepared images -> `Outputs`: calibrated probabilities (N, num_classes)
        and the "unknown" verdicts (N,). The runner, the TTA views on top (`runtime.tta_logits`),
        then `inference.answer.postprocess` with `trust` (default: the model's). batch_size None:
        the cache-friendly size for the model's input (`runtime.inference_batch_size`)."""
        select, cols = float(self.meta.get("tta_select", 1.0)), len(self.class_names) if self.runner.features else None  # selective TTA
        out = tta_logits(lambda a: self.runner(a, batch_size), arrays, self.tta, select, cols)  # (N, C), or (N, F + C) with features
        features, logits = split_features(out, len(self.class_names)) if self.runner.features else (None, out)
        return postprocess(logits, trust or self.trust, features)

    def predict_arrays(self, arrays: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """uint8 (N, S, S, 3) prepared images -> calibrated probabilities (N, num_classes) (`infer_arrays`)."""
        return self.infer_arrays(arrays, batch_size).probs

    def predict(
        self,
        images: ImageSource | list[ImageSource],
        top_k: int = 5,
        batch_size: int | None = None,
        errors: str = "raise",
        workers: int = 0,
        coverage: float | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Label, score, top-k and every class probability for one input or a list of them.

        An input is a path, bytes, a PIL image or a NumPy array. One input gives one dict, a list
        gives a list. An input the model's "unknown" rule turns away gets label "unknown" and its
        "best_guess"; coverage (e.g. 0.9) adds each input's prediction "set". A multi-label model
        (`self.multilabel`) answers {"path", "labels", "probabilities"} instead
        (`inference.answer.multilabel_answer`; top_k does not apply, coverage is a ValueError). errors="raise" raises
        `ImageDecodeError` for an unreadable input; errors="report" returns {"path", "error"} in its
        place instead.
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        results = list(self.iter_predict(items, top_k=top_k, batch_size=batch_size, errors=errors, workers=workers, coverage=coverage))
        return results[0] if single else results

    def iter_predict(
        self,
        items: Iterable[ImageSource],
        top_k: int = 5,
        batch_size: int | None = None,
        errors: str = "report",
        workers: int = 0,
        probabilities: bool = True,
        coverage: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Stream results in input order (for large folders); probabilities=False leaves out the
        per-class "probabilities" dict (label, score and top_k stay). coverage: add each answer's
        conformal prediction "set" at this coverage (ValueError if the model has no conformal scores).

        Inputs are decoded DECODE_CHUNK at a time by `workers` threads (Pillow releases the GIL
        while decoding and resizing), the next chunk while the model runs on the current one, so
        decoding and inference overlap. batch_size: images per forward pass (None: by input size).
        """
        if errors not in ("raise", "report"):
            raise ValueError("errors must be 'raise' or 'report'")
        qhat = None if coverage is None else self.trust.qhat(coverage)  # before any image is read
        workers = workers or min(4, usable_cores())
        if hasattr(items, "__len__"):  # a long job may compile the model
            self.runner.expect(len(items) * tta_view_count(self.tta))  # type: ignore[arg-type]
        chunk_size = max(DECODE_CHUNK, batch_size or 0)
        with ThreadPoolExecutor(workers) as pool:
            pending: tuple[list[str], list[Future]] | None = None
            offset = 0
            for chunk in _chunks(items, chunk_size):
                names = [_source_name(x, offset + i) for i, x in enumerate(chunk)]
                offset += len(chunk)
                submitted = (names, [pool.submit(self._prepare_or_error, x, n) for x, n in zip(chunk, names)])
                if pending is not None:
                    yield from self._finish_chunk(*pending, top_k, batch_size, errors, probabilities, qhat)
                pending = submitted
            if pending is not None:
                yield from self._finish_chunk(*pending, top_k, batch_size, errors, probabilities, qhat)

    def _finish_chunk(
        self,
        names: list[str],
        futures: list[Future],
        top_k: int,
        batch_size: int | None,
        errors: str,
        probabilities: bool,
        qhat: float | None,
    ) -> Iterator[dict[str, Any]]:
        prepared = [f.result() for f in futures]
        ok = [i for i, a in enumerate(prepared) if not isinstance(a, ImageDecodeError)]
        out = self.infer_arrays(np.stack([prepared[i] for i in ok]), batch_size) if ok else Outputs.of(np.zeros((0, len(self.class_names))))
        sets = self.trust.sets(out.probs, qhat) if qhat is not None else [None] * len(out)
        row = {i: j for j, i in enumerate(ok)}
        for i, name in enumerate(names):
            if i in row:
                j = row[i]
                known, st = bool(out.known[j]), sets[j]
                yield answer(out.probs[j], self.class_names, top_k, name, probabilities, known, st, self.trust.thresholds)
            else:
                err = prepared[i]
                if errors == "raise":
                    raise err
                yield error_answer(name, err)


def _auto_runner(path: str | os.PathLike, device: str, threads: int | None, log: Callable[[str], None] | None) -> OnnxRunner | None:
    """Backend "auto": an `OnnxRunner` (`runners.choose_onnx_runner`; a .onnx file as given), or None
    for torch: on a GPU, or for a model whose "unknown" rule scores pooled features (onnx gives
    logits only, and its msp fallback would change answers)."""
    from imgcls.artifact import ArtifactError, load_meta

    if resolve_device(device).type != "cpu":
        return None
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".onnx":
        return load_onnx_runner(p, threads=threads)
    has_graph = any((p / f).exists() for f in (ONNX_FILE, ONNX_INT8_FILE))
    try:
        meta = load_meta(p)
    except ArtifactError:
        return None  # torch's load reports what is wrong with the folder, naming the file
    if logits_only(meta)[1]:
        if has_graph:  # said only where an exported graph is passed over
            (log or _no_log)("backend auto: torch (the model's unknown rule scores pooled features, which only torch gives)")
        return None
    runner, why = choose_onnx_runner(p, threads)
    if why:
        (log or _no_log)(f"backend auto: {why}")
    return runner


def _no_log(_: str) -> None:
    pass


def write_explanations(model: str | os.PathLike, results: list[dict[str, Any]], out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """`imgcls predict --explain DIR`: a Grad-CAM overlay in DIR per answer in `results` (those
    without an error), each for its predicted label, named as `imgcls explain` names them."""
    from imgcls.inference.explain import Explainer, explain_files

    ok = [r for r in results if "error" not in r]
    labels = [explain_target(r) for r in ok]  # an "unknown" answer for its best guess, a multi-label one for its top label
    return explain_files(Explainer.load(model), [r["path"] for r in ok], out_dir, labels=labels)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def expand_inputs(args: list[str]) -> list[str]:
    """Files, folders (recursively, image files only) and glob patterns -> a list of paths.

    A name that matches nothing is kept, so the caller reports it as an error. Each file is listed
    once, at its first place, however many ways it is reached (a link to a folder, `ln -s . loop`,
    overlapping arguments); `**` and folder scans do not follow links to folders, and only
    regular files (or links to them) come out of a folder or a glob.
    """
    out: list[str] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            out.append(path)

    for a in args:
        p = Path(a).expanduser()
        if p.is_dir():
            for f in _image_files(p, "**/*"):
                add(f)
        elif p.exists():
            add(str(p))
        elif glob.has_magic(a):
            matches = _glob_images(os.path.expanduser(a))
            for m in matches:
                add(m)
            if not matches:
                out.append(a)
        else:
            out.append(a)
    return out


def _glob_images(pattern: str) -> list[str]:
    """Image files matching a glob pattern, sorted; `**` spans folders."""
    # pathlib's glob, not glob.glob: glob.glob follows folder links inside `**`, so a link loop
    # (`ln -s . loop`) listed one file 41 times, and two such links never finished.
    parts = Path(pattern).parts
    first_magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:first_magic]) if first_magic else Path(".")
    rest = Path(*parts[first_magic:]).as_posix()
    return _image_files(root, rest + "/*" if parts[-1] == "**" else rest)  # pathlib's `dir/**` lists folders only


def _image_files(root: Path, pattern: str) -> list[str]:
    """Regular image files under `root` matching `pattern`, sorted; names hidden below `root` are skipped."""
    found = (f for f in root.glob(pattern) if f.is_file() and is_image_path(f))
    return sorted(str(f) for f in found if not any(part.startswith(".") for part in f.relative_to(root).parts))
