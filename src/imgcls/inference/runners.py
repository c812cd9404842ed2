"""Runners: each prediction backend's forward pass behind one interface.

A `Runner` maps uint8 prepared images (N, S, S, 3) (decoded and resized by `Classifier.prepare`)
to float32 logits (N, num_classes) on the CPU, a batch at a time. `TorchRunner` runs the model
through `runtime.batched_logits` (bf16 weights, channels_last, torch.compile once it pays);
`OnnxRunner` runs a graph written by `imgcls export` with onnxruntime. Test-time augmentation is
not a runner's job: `runtime.tta_logits` applies it on top of any runner. A TorchRunner made with
features=True returns the pooled pre-logit features before the logits, (N, F + C) (`FeaturesAndLogits`,
`split_features`), for an "unknown" rule that scores features (mahalanobis, knn); TTA averages both
alike. The onnx graph gives logits only (`features` False): such a rule falls back to msp there
(`inference.trust.logits_only`).

Loading never exports: `load_onnx_runner` on a model folder whose model.onnx is missing or older
than the model raises `BackendError` saying to run `imgcls export MODEL`. Backend "auto"
(`choose_onnx_runner`) takes the folder's model.int8.onnx when it is up to date and its export
measured int8 top-1 agreement with fp32 of at least INT8_MIN_AGREEMENT on held-out images, else an
up-to-date model.onnx, else torch. This module also holds
the ONNX file's contract (tensor names, metadata keys) that `export` writes and the runner reads.
onnxruntime is the optional extra `imgcls[onnx]`, imported only when an `OnnxRunner` is made.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from imgcls.artifact import META_FILE, WEIGHTS_FILE, ArtifactError, resolve_artifact_dir
from imgcls.runtime import CompiledForward, as_nchw, batch_slices, batched_logits, inference_batch_size
from imgcls.threads import ThreadTuner, usable_cores
from imgcls.transforms import PreprocessSpec, eval_transform

ONNX_FILE = "model.onnx"  # a model folder's graph, as `imgcls export MODEL` writes it
ONNX_INT8_FILE = "model.int8.onnx"  # its static int8 copy, as `imgcls export MODEL --quantize int8` writes it
# Backend "auto" runs the int8 graph only when its export measured at least this top-1 agreement
# with the fp32 graph on images it was not calibrated on (metadata "int8_agreement"); below it,
# int8 runs only when asked for (backend "onnx-int8"). pretrained EfficientNet-Lite0 on the flower
# photos (1000 ImageNet classes, many near-ties) agreed on ~89-93%: auto keeps it in fp32.
INT8_MIN_AGREEMENT = 0.995
ONNX_FORMAT = "imgcls-onnx"  # metadata "format" of an imgcls export
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# A multi-label export's second output: sigmoid(logits / label temperature), for users of the .onnx
# outside imgcls; OnnxRunner reads "logits" and applies the metadata as torch does.
PROBS_NAME = "probabilities"
# Metadata values stored as JSON (the rest are plain strings); calibration, unknown and conformal
# are model.json's sections, and a multi-label model's thresholds and label_temperatures (its "task"
# a plain string), that `inference.trust.Trust` applies, so the onnx backend answers as torch does.
# int8_agreement (an int8 file's): {"top1", "images", "held_out"}, as `export` measured it.
JSON_KEYS = ("class_names", "preprocess", "calibration", "unknown", "conformal", "thresholds", "label_temperatures", "int8_agreement")


class BackendError(ValueError):
    """A prediction backend cannot run as asked: no (or a stale) model.onnx, onnxruntime missing."""


class FeaturesAndLogits(nn.Module):
    """`model`'s pooled pre-logit features and logits in one forward pass: (B, F + C), features first.

    Every registered model has logits == classifier(forward_head(feats, pre_logits=True)), where
    the classifier is the module named by its `classifier_name` (as the linear probe uses it).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)  # (B, F)
        logits = self.model.get_submodule(self.model.classifier_name)(pooled)  # (B, C)
        return torch.cat([pooled, logits.to(pooled.dtype)], dim=1)  # (B, F + C)


def split_features(out: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, F), logits (N, C)) of a features-and-logits output (N, F + C)."""
    return out[:, : out.shape[1] - num_classes], out[:, out.shape[1] - num_classes :]


class Runner(Protocol):
    """A backend's forward pass: uint8 prepared images (N, S, S, 3) -> float32 logits (N, C), or
    (N, F + C) pooled features then logits when `features` is True."""

    spec: PreprocessSpec  # how the images were prepared; also how the runner normalises them
    features: bool  # whether each row starts with the pooled features (F) before the logits

    def __call__(self, images: np.ndarray | torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Logits (N, num_classes) on the CPU; batch_size: images per forward pass (None: by input size)."""
        ...

    def expect(self, n_images: int) -> None:
        """Announce forward images still to come (a long job may compile the model)."""
        ...


class TorchRunner:
    """The `Runner` for a torch model, through `runtime.batched_logits`; features=True: rows are
    pooled features then logits (`FeaturesAndLogits`), compiled alike."""

    def __init__(
        self,
        model: nn.Module,
        spec: PreprocessSpec,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        compile: str = "auto",
        log: Callable[[str], None] | None = None,
        features: bool = False,
        threads: ThreadTuner | None = None,
    ) -> None:
        self.model, self.spec, self.device, self.amp_dtype, self.features = model, spec, device, amp_dtype, features
        self.forward = CompiledForward(FeaturesAndLogits(model) if features else model, compile, log)
        # intra-op threads per forward pass, timed from the passes themselves (threads.ThreadTuner)
        self.threads = threads or ThreadTuner(log=log)

    def expect(self, n_images: int) -> None:
        """Forward images still to come: a long enough job compiles the model (see CompiledForward)."""
        self.forward.expect(n_images)

    def __call__(self, images: np.ndarray | torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        forward = self.threads.wrap(self.forward, frozen=lambda: self.forward.compiled is not None)
        return batched_logits(
            self.model, images, self.spec, batch_size=batch_size, device=self.device, amp_dtype=self.amp_dtype, forward=forward
        )


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise BackendError('the onnx backend needs onnxruntime: pip install "imgcls[onnx]"') from None
    return onnxruntime


class OnnxRunner:
    """The `Runner` for an `imgcls export`ed .onnx file, via onnxruntime on the CPU.

    The file is self-describing: `meta` (class names, preprocessing, arch, TTA mode, calibration)
    comes from its metadata. The graph gives logits only (`features` False).
    threads: onnxruntime's intra-op threads, every batch run in turn. None: a call of one batch
    (a server's request, batch-1 latency) runs on every usable core; a call of several batches
    (`Classifier.iter_predict`'s chunks) runs them side by side, one core each, on a second
    session made at the first such call (its weights a second time in memory). Batches side by
    side scale where one small batch's convolutions do not: on the Oxford flowers (lite0, batch
    8, 2 cores, decoding beside it), fp32 118.8 img/s against 106.4 with 2 intra-op threads, int8
    158.2 against 128.1 (idle machine; best of 4 interleaved runs on a shared one: 77.9 against 71.4).
    """

    features = False

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path, self.threads = Path(path), threads
        self.session = self._session(threads or usable_cores())
        props = self.session.get_modelmeta().custom_metadata_map
        if props.get("format") != ONNX_FORMAT:
            raise BackendError(f"{path}: not an imgcls ONNX export (no imgcls metadata); export it with `imgcls export`")
        self.meta: dict[str, Any] = {k: json.loads(v) if k in JSON_KEYS else v for k, v in props.items() if k != "format"}
        self.spec = PreprocessSpec.from_dict(self.meta["preprocess"])
        self._side_by_side: tuple[Any, ThreadPoolExecutor] | None = None  # (one-thread session, its pool), made when first needed

    def _session(self, threads: int) -> Any:
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # errors only: graph optimisation warns about every constant it folds away
        # No spin-waiting between parallel regions: `iter_predict`'s decode threads share the cores.
        # On the 2 shared cores here (Oxford flowers, lite0, 2 intra-op threads + 2 decode threads)
        # spinning cost 34.8 CPU ms per image against 17.3 without.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  (onnxruntime's own exception types: a bad or truncated file)
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BackendError(f"{self.path}: onnxruntime cannot load it: {why}") from None

    def expect(self, n_images: int) -> None:
        """Nothing to prepare: onnxruntime optimised the graph when the session was made."""

    def _run(self, session: Any, images: np.ndarray | torch.Tensor, sl: slice) -> np.ndarray:
        # Same eval_transform as torch; ONNX wants a plain NCHW buffer, not channels_last strides.
        x = eval_transform(as_nchw(images[sl]), self.spec).contiguous()  # (B, 3, H, W)
        return session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]  # (B, C)

    def __call__(self, images: np.ndarray | torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        slices = list(batch_slices(len(images), batch_size or inference_batch_size(self.spec.img_size)))
        cores = usable_cores()
        if self.threads is None and len(slices) > 1 and cores > 1:
            if self._side_by_side is None:
                self._side_by_side = (self._session(1), ThreadPoolExecutor(cores, thread_name_prefix="imgcls-onnx"))
            session, pool = self._side_by_side
            out = list(pool.map(lambda sl: self._run(session, images, sl), slices))  # onnxruntime releases the GIL
        else:
            out = [self._run(self.session, images, sl) for sl in slices]
        return torch.from_numpy(np.concatenate(out)) if out else torch.empty(0, 0)


def load_onnx_runner(path: str | os.PathLike, int8: bool = False, threads: int | None = None) -> OnnxRunner:
    """An `OnnxRunner` for a .onnx file, or for a model folder's model.onnx (int8: model.int8.onnx).

    Never exports (an export runs a parity check, minutes for a large model): a folder without
    the file, or whose file is older than its weights or model.json (the graph would lag
    behind the model), raises `BackendError` naming the `imgcls export` command to run.
    """
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".onnx":
        runner = OnnxRunner(p, threads)
        if int8 and "int8_agreement" not in runner.meta and "quantization" not in runner.meta:
            raise BackendError(f"{p}: not an int8 export; write one with `imgcls export MODEL --quantize int8`")
        return runner
    try:
        folder = resolve_artifact_dir(p)
    except ArtifactError as e:
        raise ArtifactError(f"{e} (backend onnx takes a model folder or a .onnx file)") from None
    target = folder / (ONNX_INT8_FILE if int8 else ONNX_FILE)
    command = f"imgcls export {folder}" + (" --quantize int8" if int8 else "")
    if not target.is_file():
        raise BackendError(f"{folder} has no {target.name}: run `{command}` first (backend onnx does not export while loading)")
    newest = max((folder / WEIGHTS_FILE).stat().st_mtime_ns, (folder / META_FILE).stat().st_mtime_ns)
    if target.stat().st_mtime_ns < newest:
        changed = f"{WEIGHTS_FILE} or {META_FILE} changed since"
        raise BackendError(f"{target} is older than the model ({changed}): run `{command}` again")
    return OnnxRunner(target, threads)


def int8_trusted(meta: dict[str, Any], min_agreement: float = INT8_MIN_AGREEMENT) -> tuple[bool, str]:
    """Whether an int8 graph's recorded agreement with fp32 lets backend "auto" use it, and why (not)."""
    a = meta.get("int8_agreement")
    if not isinstance(a, dict) or not isinstance(a.get("top1"), (int, float)):
        return False, "its int8 agreement with fp32 was not measured (export it again with --quantize int8)"
    seen = f"int8 agrees with fp32 on {a['top1']:.2%} of {a.get('images', '?')} {'held-out' if a.get('held_out') else 'calibration'} images"
    if not a.get("held_out"):
        return False, f"{seen}, not held-out ones (too few check images: pass --data to the export)"
    if a["top1"] < min_agreement:
        return False, f"{seen}, below {min_agreement:.1%} (--backend onnx-int8 uses it anyway)"
    return True, seen


def choose_onnx_runner(folder: str | os.PathLike, threads: int | None = None) -> tuple[OnnxRunner | None, str]:
    """Backend "auto" for a model folder: (the runner to use, or None for torch; why, for the log,
    empty when the folder holds no exported graph).

    The int8 graph when `load_onnx_runner` takes it and `int8_trusted` says so, else model.onnx
    when it takes that (both checked against torch fp32 when exported), else None: missing or stale
    files and a missing onnxruntime fall back to torch, which gives the model's own answers.
    """
    try:
        import_onnxruntime()
        folder = resolve_artifact_dir(folder)
    except (BackendError, ArtifactError) as e:
        return None, f"torch ({e})"
    notes = []
    for int8 in (True, False):
        try:
            runner = load_onnx_runner(folder, int8=int8, threads=threads)
        except (BackendError, ArtifactError) as e:
            notes.append(str(e).split(": run `")[0])
            continue
        ok, why = int8_trusted(runner.meta) if int8 else (True, "")
        if ok:
            return runner, f"onnxruntime on {runner.path.name}" + (f" ({why})" if why else "")
        notes.append(f"{runner.path.name}: {why}")
    if not any((folder / f).exists() for f in (ONNX_FILE, ONNX_INT8_FILE)):
        return None, ""  # nothing exported: torch, the usual case, not worth a log line
    return None, f"torch ({'; '.join(notes)})"
