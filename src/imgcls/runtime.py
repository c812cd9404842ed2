"""Device, precision and the batched forward pass shared by training, evaluation and prediction.

Everything that turns cached uint8 images into logits goes through `batched_logits`, so
evaluation and prediction run the same preprocessing and the same numerics.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from imgcls.config import COMPILE_MODES, PRECISIONS, TTA_MODES
from imgcls.threads import usable_cores
from imgcls.transforms import PreprocessSpec, eval_transform, to_batch


def resolve_device(device: str | None = None) -> torch.device:
    """'auto'/None -> cuda when available, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX or AVX512-BF16, where bf16 autocast pays off.

    Measured on the 2-core AMX machines here: small CNNs train 2-4x faster in bf16 than fp32.
    Without these units bf16 is emulated and slower, so 'auto' stays in fp32.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """'auto' | 'bf16' | 'fp32' -> the autocast dtype, or None for plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "bf16" or cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_inference_model(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> tuple[nn.Module, torch.dtype | None]:
    """(model, amp_dtype) for repeated inference: eval mode on `device`, channels_last.

    On a CPU where bf16 pays (amp_dtype bf16), the weights are converted to bf16 once, in place,
    and autocast is dropped (None is returned): under autocast every call re-casts every fp32
    weight to bf16 before oneDNN runs, which at batch 1 costs as much as the convolutions
    (bench/RESULTS.md). `batched_logits` feeds a bf16 model bf16 inputs. CUDA keeps autocast.
    """
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    if device.type == "cpu" and amp_dtype == torch.bfloat16:
        return model.to(torch.bfloat16), None
    return model, amp_dtype


def default_threads() -> int:
    """torch intra-op threads when none are asked for and none measured: one per usable core
    (`threads.usable_cores`: affinity and cgroup quota; 2 on the machines here)."""
    return usable_cores()


def set_threads(threads: int | None) -> None:
    """Use every core for intra-op work unless told otherwise (`default_threads`)."""
    torch.set_num_threads(threads or default_threads())


def resolve_tta(tta: str | None, meta: dict) -> str:
    """'auto'/None -> what the model folder recommends (model.json "tta", set by the training
    recipe), else the mode asked for. evaluate, predict and serve all resolve it here."""
    mode = meta.get("tta", "none") if tta in (None, "auto") else tta
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be auto or one of {TTA_MODES}, got {mode!r}")
    return mode


def _reflect_index(n: int, pad: int) -> torch.Tensor:
    # [pad, ..., 1, 0, 1, ..., n-1, n-2, ..., n-1-pad]: reflect padding as a gather, for any dtype
    i = torch.arange(-pad, n + pad).abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def tta_views(x: torch.Tensor, mode: str) -> tuple[list[torch.Tensor], list[float]]:
    """A batch (B, C, H, W), any dtype -> the views `mode` averages over and their weights (sum 1).

    airbench94's test-time augmentation: the mirror image ("flip"), and the image shifted by one
    pixel up-left and down-right with reflect padding ("translate"). flip-translate weighs the
    original and its mirror 1/4 each and the four shifted (and mirrored) views 1/8 each; translate
    alone weighs the original 1/2 and each shift 1/4. "rotate": the four quarter turns of a square
    image, "dihedral" those and their mirror images (for models trained with --rotate), equal
    weights. Logits, not probabilities, are averaged.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {mode!r}")
    if mode == "none":
        return [x], [1.0]
    if mode in ("rotate", "dihedral"):  # quarter turns (and their mirror images): equal weights
        base = [x, x.flip(-1)] if mode == "dihedral" else [x]
        views = [v.rot90(k, dims=(-2, -1)) for v in base for k in range(4)]
        return views, [1.0 / len(views)] * len(views)
    flip = mode in ("flip", "flip-translate")
    base = [x, x.flip(-1)] if flip else [x]
    if mode == "flip":
        return base, [0.5, 0.5]
    h, w = x.shape[-2:]
    xp = x[..., _reflect_index(h, 1), :][..., _reflect_index(w, 1)]  # (B, C, H + 2, W + 2)
    shifted = [xp[..., :h, :w], xp[..., 2:, 2:]]
    if flip:
        shifted += [v.flip(-1) for v in shifted]
    n_base, n_shift = len(base), len(shifted)
    return base + shifted, [0.5 / n_base] * n_base + [0.5 / n_shift] * n_shift


def as_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (N, S, S, 3), an array or a tensor -> a (N, 3, S, S) tensor, a view when it can be."""
    if isinstance(images, torch.Tensor):
        return images.permute(0, 3, 1, 2)
    return to_batch(np.asarray(images))


def tta_logits(
    run: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray | torch.Tensor,
    mode: str,
    select: float = 1.0,
    logit_cols: int | None = None,
) -> torch.Tensor:
    """Weighted mean of run(view) over the TTA views of uint8 images (N, S, S, 3): the one TTA.

    `run` maps uint8 images (N, S, S, 3) (an array for mode "none", else a tensor view) to float
    logits (N, C). `batched_logits` applies this per batch, `Classifier` on top of any runner.
    Views stay torch tensors: each is handed to `run` as a permuted view, no copy back to NumPy.
    select < 1: selective TTA, the plain forward for every image, then the views only for the
    ceil(select * N) images with the lowest top softmax probability (the confident ones rarely
    change their answer); logit_cols: the output's last columns that are the logits (None: all;
    a runner with features puts them first).
    """
    if mode == "none" or select <= 0:
        return run(images)
    if select < 1:
        return _selective_tta(run, images, mode, select, logit_cols)
    views, weights = tta_views(as_nchw(images), mode)  # each (N, 3, S, S) uint8
    out = None
    for view, wt in zip(views, weights):
        logits = run(view.permute(0, 2, 3, 1)) * wt  # (N, C); the view as (N, S, S, 3) again
        out = logits if out is None else out + logits
    return out


def _selective_tta(
    run: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray | torch.Tensor, mode: str, select: float, logit_cols: int | None
) -> torch.Tensor:
    out = run(images)  # (N, C) plain
    logits = out if logit_cols is None else out[:, out.shape[1] - logit_cols :]
    k = math.ceil(select * len(out))
    least = logits.float().softmax(1).amax(1).argsort()[:k]  # (k,) the least confident first
    if k:
        idx = least.sort().values  # in the batch's order
        subset = images[idx.numpy()] if isinstance(images, np.ndarray) else images[idx]
        out = out.index_put((idx,), tta_logits(run, subset, mode).to(out.dtype))  # rows idx: (k, C); out of place (inference tensors)
    return out


def tta_view_count(mode: str) -> int:
    """Forward passes per image that `mode` costs (1 for none, 6 for flip-translate)."""
    return len(tta_views(torch.zeros(1, 1, 2, 2), mode)[0])


# torch.compile for inference. With frozen weights and one fixed batch shape, inductor ran
# efficientnet_lite0 at 224 px in bf16 at batch 8 1.6-2.3x faster than eager on 2 cores (170-270
# against 105-130 img/s; inside `imgcls predict`, decoding included, 150 against 95 img/s), after
# compiling for 10-12 s with a warm inductor cache and 27 s the first time; small_cnn at 32 px ran
# 1.2x faster after 8 s (bench/RESULTS.md). Compiling therefore pays only for long jobs: "auto"
# compiles once the work still to come would take COMPILE_PAYS_S eagerly, enough to win back a
# first (cold) compile at those speed-ups. A dynamic-shape compile of efficientnet_lite0 did not
# finish in 300 s, so the compiled copy only ever sees the one batch shape it was built for; other
# shapes (the last, partial batch) run eagerly.
COMPILE_PAYS_S = 90.0


class CompiledForward:
    """`model(x)` for inference that switches to an inductor-compiled copy of the model (frozen
    weights, the batch shape it was compiled for) when that pays.

    mode "auto": callers announce the forward passes still to come with `expect(n_images)`; once
    the eager calls measured so far say they would take at least COMPILE_PAYS_S, the model is
    compiled for the largest batch shape seen. "on": compile on the first call; "off": eager
    only. A compile that fails (no C++ compiler, an unsupported layer) is logged and the forward
    stays eager. Call under torch.inference_mode(), as `batched_logits` does.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "auto",
        log: Callable[[str], None] | None = None,
        compiler: Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
        self.model, self.mode, self.log = model, mode, log or (lambda msg: None)
        self.compiler = compiler or (lambda m: torch.compile(m, dynamic=False))
        self.compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.shape: tuple[int, ...] | None = None  # the input shape the compiled copy serves (the first, with `compile_for`)
        self.shapes: set[tuple[int, ...]] = set()  # every input shape the compiled copy serves
        self.forcing = False  # inside `compile_for`: compile each new shape, whatever the mode
        self.left = 0  # announced forward images not yet run
        self.eager_s, self.eager_images, self.calls = 0.0, 0, 0  # eager timing, first call (warm-up) left out
        self.largest = 0

    def expect(self, n_images: int) -> None:
        """Announce `n_images` more forward images (TTA views count one each)."""
        self.left += max(0, int(n_images))

    def _worth_compiling(self, batch: int) -> bool:
        if self.mode == "off" or self.compiled is not None or batch < self.largest:
            return False
        if self.mode == "on":
            return True
        if self.eager_images == 0:
            return False
        return self.left * self.eager_s / self.eager_images >= COMPILE_PAYS_S

    def compile_for(self, run: Callable[[], object]) -> None:
        """Compile now for every input shape of the forward calls `run()` makes, whatever the mode:
        a server's batch sizes at start-up (`serve_engine.Engine`), so that no request pays a
        compile. One compiled copy recompiles per shape (dynamic=False); torch._dynamo's
        recompile_limit (8) bounds the shapes. A compiler failure is raised, not logged, and leaves
        the forward eager: the caller says what it serves with instead."""
        self.forcing = True
        try:
            run()
        except Exception:
            self.compiled, self.shape, self.shapes = None, None, set()
            raise
        finally:
            self.forcing = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        self.left = max(0, self.left - batch)
        if self.compiled is not None and tuple(x.shape) in self.shapes:
            return self.compiled(x)
        self.largest = max(self.largest, batch)
        if self.forcing or self._worth_compiling(batch):
            out = self._compile(x)
            if out is not None:
                return out
        t0 = time.perf_counter()
        out = self.model(x)
        self.calls += 1
        if self.calls > 1 and batch == self.largest:  # the first call warms up oneDNN
            self.eager_s += time.perf_counter() - t0
            self.eager_images += batch
        return out

    def _compile(self, x: torch.Tensor) -> torch.Tensor | None:
        """Compile for x's shape and run the compiled copy on x; None when the compiler failed (logged,
        then the forward stays eager; raised inside `compile_for`)."""
        if not self.forcing:
            self.log(f"compiling the model for batches of {x.shape[0]} (torch.compile, 10-30 s, once; --compile off to skip)")
        t0 = time.perf_counter()
        try:
            compiled = self.compiled if self.compiled is not None else self.compiler(self.model)
            # Freezing (weights as constants: BatchNorm folded, bf16 weights prepacked for oneDNN)
            # is what makes it pay: 2.3x eager with it, 1.1x without, for efficientnet_lite0 at
            # batch 8. It applies when the first call compiles; torch.compile(options=
            # {"freezing": True}) did not turn it on (torch 2.13), the config patch does.
            import torch._inductor.config as inductor_config

            with inductor_config.patch(freezing=True):
                out = compiled(x)  # compiles now (a new shape: recompiles)
        except Exception as e:  # noqa: BLE001  (any compiler failure: stay eager)
            if self.forcing:
                raise
            self.mode = "off"
            self.log(f"torch.compile failed, predicting without it: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None
        self.compiled, self.shape = compiled, self.shape or tuple(x.shape)
        self.shapes.add(tuple(x.shape))
        if not self.forcing:
            self.log(f"compiled in {time.perf_counter() - t0:.1f}s")
        return out


# Input pixels per batch: beyond about half a million, activations spill out of the caches and
# images/s falls, in inference and in training. Measured on 2 cores (AVX512-BF16, bench/RESULTS.md):
# efficientnet_lite0 inference in bf16 ran 145 img/s at batch 8-16 and 102 at batch 64 (224 px),
# 459 at 32 and 356 at 64 (128 px); small_cnn at 32 px was flat from 64 to 256 and slower at 512.
CACHE_BATCH_PIXELS = 1 << 19


def cache_sized_batch(img_size: int, low: int, high: int) -> int:
    """The largest power of two from `low` to `high` whose batch holds at most CACHE_BATCH_PIXELS
    input pixels at `img_size` (`low` when even that holds more)."""
    b = low
    while b * 2 <= high and b * 2 * img_size * img_size <= CACHE_BATCH_PIXELS:
        b *= 2
    return b


def inference_batch_size(img_size: int) -> int:
    """Images per forward pass for inference at `img_size`: 256 at 32 px, 32 at 128 px, 8 at 224 px."""
    return cache_sized_batch(img_size, 1, 256)


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


@torch.inference_mode()
def batched_logits(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    spec: PreprocessSpec,
    batch_size: int | None = None,
    device: torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "evaluate",
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    tta: str = "none",
    tta_select: float = 1.0,
    logit_cols: int | None = None,
) -> torch.Tensor:
    """uint8 cached images (N, S, S, 3) -> float32 logits (N, num_classes), model in eval mode.

    `forward` replaces `model(x)`, e.g. to return pooled features instead of logits. `tta`
    averages the logits over test-time augmented views of each batch (`tta_logits`), for the
    `tta_select` least confident share of each batch (logit_cols: see `tta_logits`). batch_size
    None: `inference_batch_size(spec.img_size)`.
    """
    from tqdm.auto import tqdm

    param = next(model.parameters())
    device = device or param.device
    in_dtype = param.dtype if param.dtype in (torch.bfloat16, torch.float16) else None  # see prepare_inference_model

    def run(batch: np.ndarray | torch.Tensor) -> torch.Tensor:  # uint8 (B, S, S, 3) -> float32 (B, C) on the CPU
        x = eval_transform(as_nchw(batch), spec)  # (B, 3, H, W) float
        x = x.to(device, dtype=in_dtype, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            return (forward or model)(x).float().cpu()

    was_training = model.training
    model.eval()
    batch_size = batch_size or inference_batch_size(spec.img_size)
    out = []
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=None if progress else True, leave=False)
    for sl in batch_slices(len(images), batch_size):
        out.append(tta_logits(run, images[sl], tta, tta_select, logit_cols))  # views per batch: memory stays one batch's worth
        bar.update(sl.stop - sl.start)
    bar.close()
    model.train(was_training)
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)
