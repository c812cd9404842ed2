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
than the model raises `BackendError` saying to run `imgcls export MODEL`. This module also holds
the ONNX file's contract (tensor names, metadata keys) that `export` writes and the runner reads.
onnxruntime is the optional extra `imgcls[onnx]`, imported only when an `OnnxRunner` is made.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
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
ONNX_FORMAT = "imgcls-onnx"  # metadata "format" of an imgcls export
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# A multi-label export's second output: sigmoid(logits / label temperature), for users of the .onnx
# outside imgcls; OnnxRunner reads "logits" and applies the metadata as torch does.
PROBS_NAME = "probabilities"
# Metadata values stored as JSON (the rest are plain strings); calibration, unknown and conformal
# are model.json's sections, and a multi-label model's thresholds and label_temperatures (its "task"
# a plain string), that `inference.trust.Trust` applies, so the onnx backend answers as torch does.
JSON_KEYS = ("class_names", "preprocess", "calibration", "unknown", "conformal", "thresholds", "label_temperatures")


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
    """

    features = False

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or usable_cores()
        opts.log_severity_level = 3  # errors only: graph optimisation warns about every constant it folds away
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  (onnxruntime's own exception types: a bad or truncated file)
            raise BackendError(f"{path}: onnxruntime cannot load it: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if props.get("format") != ONNX_FORMAT:
            raise BackendError(f"{path}: not an imgcls ONNX export (no imgcls metadata); export it with `imgcls export`")
        self.meta: dict[str, Any] = {k: json.loads(v) if k in JSON_KEYS else v for k, v in props.items() if k != "format"}
        self.spec = PreprocessSpec.from_dict(self.meta["preprocess"])

    def expect(self, n_images: int) -> None:
        """Nothing to prepare: onnxruntime optimised the graph when the session was made."""

    def __call__(self, images: np.ndarray | torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        out = []
        for sl in batch_slices(len(images), batch_size or inference_batch_size(self.spec.img_size)):
            # Same eval_transform as torch; ONNX wants a plain NCHW buffer, not channels_last strides.
            x = eval_transform(as_nchw(images[sl]), self.spec).contiguous()  # (B, 3, H, W)
            out.append(self.session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
        return torch.from_numpy(np.concatenate(out)) if out else torch.empty(0, 0)


def load_onnx_runner(path: str | os.PathLike) -> OnnxRunner:
    """An `OnnxRunner` for a .onnx file, or for a model folder's model.onnx.

    Never exports (an export runs a parity check, minutes for a large model): a folder without
    model.onnx, or whose model.onnx is older than its weights or model.json (the graph would lag
    behind the model), raises `BackendError` naming the `imgcls export` command to run.
    """
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".onnx":
        return OnnxRunner(p)
    try:
        folder = resolve_artifact_dir(p)
    except ArtifactError as e:
        raise ArtifactError(f"{e} (backend onnx takes a model folder or a .onnx file)") from None
    target = folder / ONNX_FILE
    if not target.is_file():
        raise BackendError(f"{folder} has no {ONNX_FILE}: run `imgcls export {folder}` first (backend onnx does not export while loading)")
    newest = max((folder / WEIGHTS_FILE).stat().st_mtime_ns, (folder / META_FILE).stat().st_mtime_ns)
    if target.stat().st_mtime_ns < newest:
        changed = f"{WEIGHTS_FILE} or {META_FILE} changed since"
        raise BackendError(f"{target} is older than the model ({changed}): run `imgcls export {folder}` again")
    return OnnxRunner(target)
