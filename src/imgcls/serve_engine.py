"""The server's forward pass: each dynamic batch padded to one of a few bucket sizes, whose shapes are
compiled at start-up, so that no request pays a compile.

`Engine(classifier, buckets, max_batch, compile)` is the `infer` that `batching.Batcher` calls on a
batch of prepared uint8 images (N, S, S, 3): the batch is cut into pieces of at most the largest
bucket, each piece padded with black images up to the smallest bucket that holds it, run through
`Classifier.infer_arrays` (the same runner, TTA and post-processing as `imgcls predict`), and the
padded rows dropped. Every row's answer depends on its own image only (eval-mode BatchNorm, a
per-row "unknown" rule), so padding never changes an answer.

`start()`, in the server's start-up, runs every bucket once. The engines, as /v1/health names them:

- "compiled": the torch model compiled for each bucket shape (`runtime.CompiledForward.compile_for`,
  frozen weights, as `imgcls predict --compile on` compiles); a compiled copy serves one batch
  shape, and a dynamic-shape compile of efficientnet_lite0 did not finish in 300 s (runtime.py).
- "onnx": onnxruntime (`--backend onnx`, an `imgcls export`ed model.onnx), padded to the same
  buckets: the session allocates for each shape once, at start-up.
- "eager": torch without compiling, unpadded unless buckets are given (padding only costs there).

compile "auto" compiles a model whose forward costs at least AUTO_COMPILE_MIN_FLOPS per image, and
serves eagerly, with the reason in the log, a smaller one or when torch.compile fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from imgcls.inference.trust import Outputs
from imgcls.predict import Classifier
from imgcls.runtime import CompiledForward, batch_slices
from imgcls.serve_schema import check_buckets, default_buckets

ENGINES = ("compiled", "eager", "onnx")
# "auto" compiles only a model whose forward costs at least this many FLOPs per image (counted by
# torch.utils.flop_counter, not timed: timings on a shared 2-core machine swing 10x). A compile costs
# 10-30 s per shape (80 s cold on a busy machine) and paid 1.6-2.3x for efficientnet_lite0 at 224 px
# (770 MFLOP), 1.2x for small_cnn at 32 px (240 MFLOP) (bench/RESULTS.md); the tests' small_cnn at
# 16 px (47 MFLOP) is not worth a start-up of a minute.
AUTO_COMPILE_MIN_FLOPS = 100e6


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `n` images (`n` at most the largest)."""
    return next(b for b in buckets if b >= n)


def pad_rows(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, S, S, 3) -> (size, S, S, 3): the images, then black ones (the array itself when n == size)."""
    if len(images) == size:
        return images
    out = np.zeros((size, *images.shape[1:]), dtype=images.dtype)
    out[: len(images)] = images
    return out


def _reason(e: BaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class Engine:
    """The server's forward pass over bucket-padded batches: `start()` once, then `engine(images)` -> `Outputs`.

    buckets: None for the default (`serve_schema.default_buckets(max_batch)` when compiled or onnx,
    unpadded when eager), () for no padding, else the sizes to pad to. compile: "auto", "on"
    (a failure raises from `start`) or "off". `log` gets the start-up line.
    """

    def __init__(
        self,
        classifier: Classifier,
        buckets: tuple[int, ...] | None,
        max_batch: int,
        compile: str = "auto",
        log: Callable[[str], None] | None = None,
    ) -> None:
        if buckets is not None:
            check_buckets(buckets, max_batch)
        self.classifier, self.asked, self.max_batch, self.compile = classifier, buckets, max_batch, compile
        self.log = log or (lambda msg: None)
        forward = getattr(classifier.runner, "forward", None)
        self.forward = forward if isinstance(forward, CompiledForward) else None  # None: not a torch model (onnx)
        self.name = "eager" if self.forward is not None else "onnx"
        self.buckets: tuple[int, ...] = ()  # what batches are padded to; () unpadded
        self.startup_s = 0.0
        self.note = ""  # why the engine is what it is, when that was not asked for
        self.images = self.padded = 0  # images run, and black rows added to pad them

    # ------------------------------------------------------------------ start-up

    def start(self) -> str:
        """Run every bucket once (compiling each shape for "compiled"); the start-up log line, also logged."""
        t0 = time.perf_counter()
        top = self.asked or default_buckets(self.max_batch)
        if self.forward is None:  # onnxruntime: nothing to compile, the same buckets
            self.buckets = top
            self._warm(self.buckets)
            what = "onnxruntime: ran batch shapes"
        elif self._compiling():
            self.buckets = top
            what = self._compile_buckets()
        else:
            self.buckets = self.asked or ()
            self._warm(self.buckets or (1,))
            what = "eager" + (", batch shapes" if self.buckets else ", unpadded: warmed up")
        self.startup_s = time.perf_counter() - t0
        shapes = f" {', '.join(map(str, self.buckets))}" if self.buckets else ""
        line = f"{what}{shapes} in {self.startup_s:.1f} s" + (f" ({self.note})" if self.note else "")
        self.log(line)
        return line

    def _compiling(self) -> bool:
        """Whether to compile: "on"; "auto" when the model's forward is large enough for it to pay (`note` says why not)."""
        if self.compile == "off" or self.asked == ():
            self.note = "--compile off" if self.compile == "off" else "--buckets off"
            return False
        if self.compile == "on":
            return True
        flops = self._flops_per_image()
        if flops < AUTO_COMPILE_MIN_FLOPS:
            self.note = (
                f"compile auto: {flops / 1e6:.0f} MFLOP per image, under {AUTO_COMPILE_MIN_FLOPS / 1e6:.0f}: "
                "compiling would not pay (--compile on compiles anyway)"
            )
            return False
        return True

    def _flops_per_image(self) -> float:
        """FLOPs of the model's convolutions and linear layers on one image (one TTA view): the bulk of
        a CNN's work, counted with forward hooks (torch.utils.flop_counter took 0.3-3 s a start)."""
        import torch
        from torch import nn

        flops = 0.0

        def count(m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            nonlocal flops
            if isinstance(m, nn.Conv2d):  # 2 x output elements x the inputs each sums
                flops += 2.0 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            else:
                flops += 2.0 * out.numel() * m.in_features

        model, size = self.classifier.model, self.classifier.spec.img_size
        hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        p = next(model.parameters())
        try:
            with torch.inference_mode():
                model(torch.zeros(1, 3, size, size, dtype=p.dtype, device=p.device).contiguous(memory_format=torch.channels_last))
        finally:
            for h in hooks:
                h.remove()
        return flops

    def _compile_buckets(self) -> str:
        """Compile each bucket shape; on failure under "auto", eager with the reason in `note` ("on": raise)."""
        try:
            self.forward.compile_for(lambda: self._warm(self.buckets))  # type: ignore[union-attr]
        except Exception as e:  # noqa: BLE001  (any compiler failure: serve eagerly, say why)
            if self.compile == "on":
                raise RuntimeError(f"torch.compile failed for batch shapes {list(self.buckets)}: {_reason(e)}") from e
            self.note = f"torch.compile failed, serving eagerly: {_reason(e)}"
            self.buckets = self.asked or ()
            return "eager" + (", batch shapes" if self.buckets else ", unpadded")
        self.name = "compiled"
        return "compiled batch shapes"

    def _image_shape(self) -> tuple[int, int, int]:
        s = self.classifier.spec.cache_size  # what Classifier.prepare gives: uint8 (S, S, 3)
        return (s, s, 3)

    def _warm(self, sizes: Sequence[int]) -> None:
        for b in sizes:
            self.classifier.infer_arrays(np.zeros((b, *self._image_shape()), dtype=np.uint8), batch_size=b)

    # ------------------------------------------------------------------ serving

    def __call__(self, images: np.ndarray) -> Outputs:
        """uint8 (N, S, S, 3) -> `Outputs` (N rows): one forward per piece of at most the largest
        bucket, padded up to its bucket; the padded rows are dropped."""
        self.images += len(images)
        if not self.buckets:
            return self.classifier.infer_arrays(images, batch_size=self.max_batch)
        parts = []
        for sl in batch_slices(len(images), self.buckets[-1]):
            piece = images[sl]
            size = bucket_for(len(piece), self.buckets)
            self.padded += size - len(piece)
            parts.append(self.classifier.infer_arrays(pad_rows(piece, size), batch_size=size)[: len(piece)])
        if len(parts) == 1:
            return parts[0]
        return Outputs(np.concatenate([p.probs for p in parts]), np.concatenate([p.known for p in parts]))

    def describe(self) -> dict[str, Any]:
        """/v1/health's "engine": its name, buckets, start-up seconds, why (when not what was asked), padding so far."""
        return {
            "name": self.name,
            "buckets": list(self.buckets),
            "startup_s": round(self.startup_s, 2),
            "note": self.note,
            "images": self.images,
            "padded_images": self.padded,
        }
