"""Load user-supplied checkpoints (a local file or a URL) into a registered model.

Files are read as data only: `.safetensors` with safetensors, `.pth/.pt/.bin/.ckpt` with
`torch.load(weights_only=True)`, which refuses any pickled object that is not a tensor or a
plain container, so a checkpoint can never run code (STYLE rule 6). Downloads happen only when
the caller passes a URL, are checked against a SHA-256 when one is given, and land in the cache
with an atomic rename, so a cached file is always complete.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from imgcls.atomic import atomic_path
from imgcls.models.registry import load_state_dict_strict

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Training checkpoints nest the weights: torchvision/timm/Lightning use "state_dict" or "model",
# many scripts "model_state_dict"; EMA copies sit under "ema" or "state_dict_ema". First hit wins.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "ema", "state_dict_ema")
# DistributedDataParallel saves "module.conv1.weight"; torch.compile saves "_orig_mod.conv1.weight".
STRIP_PREFIXES = ("module.", "_orig_mod.")
# timm's VGG keeps torchvision's classifier as a 7x7 conv, a 1x1 conv and a Linear head.
_TIMM_VGG_RENAMES = {"pre_logits.fc1.": "classifier.0.", "pre_logits.fc2.": "classifier.3.", "head.fc.": "classifier.6."}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class LoadedWeights:
    """What `load_pretrained_weights` did: the file, its layout, and the keys it left out."""

    path: Path
    layout: str  # "torchvision" (our own layout) or "timm" (converted)
    num_tensors: int  # tensors copied from the file
    skipped: tuple[str, ...] = ()  # classifier keys not loaded because the class count differs
    file_num_classes: int | None = None  # classifier width in the file, when it was skipped

    @property
    def message(self) -> str:
        text = f"loaded {self.num_tensors} tensors from {self.path}"
        if self.layout != "torchvision":
            text += f" ({self.layout} layout, converted)"
        if self.skipped:
            text += (
                f"; classifier not loaded ({', '.join(self.skipped)}): the file has {self.file_num_classes} classes, "
                "the model keeps its freshly initialised head"
            )
        return text


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat {name: tensor} dict on the CPU.

    Unwraps "state_dict"/"model"/"model_state_dict"/"ema"/"state_dict_ema" nesting, strips a
    leading "module." (DDP) or "_orig_mod." (torch.compile) prefix, drops non-tensor entries.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    fmt = _file_format(path)
    if fmt == "safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError: both mean "not a readable safetensors file"
            raise ValueError(f"cannot read {path} as safetensors: {e}") from e
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            if found or "Weights only load failed" in str(e):
                what = f" ({found.group(1)})" if found else ""
                raise ValueError(
                    f"refusing to load {path}: it contains pickled Python objects{what}, and unpickling them "
                    "could run code from the file. Re-save only the weights, e.g. "
                    "torch.save(model.state_dict(), path) or safetensors.torch.save_file(model.state_dict(), path)"
                ) from e
            raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e
        except Exception as e:  # truncated zip, empty file, not a checkpoint at all
            raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {type(e).__name__}: {e}") from e
    return _extract_state_dict(obj, path)


def _file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    # No telling suffix (e.g. a download named after its digest): look at the first bytes.
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):  # torch zip, or a legacy pickle
        return "torch"
    if len(head) > 8 and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
        return "safetensors"
    raise ValueError(f"cannot tell the format of {path}: expected .safetensors or one of {', '.join(TORCH_SUFFIXES)}")


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(len(WRAPPER_KEYS)):  # bounded: {"model": {"state_dict": ...}} is the deepest seen
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise ValueError(f"{path} is not a state dict: no tensors found (top-level keys: {keys or 'none'})")
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def convert_timm_state_dict(arch: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a timm-layout state dict to ours; dicts already in our (torchvision) layout pass through.

    ResNet: timm and torchvision share every key, nothing to do. VGG: timm's pre_logits.fc1
    (4096, 512, 7, 7) conv, pre_logits.fc2 (4096, 4096, 1, 1) conv and head.fc become
    classifier.0/3/6; flattening a 7x7 conv kernel in (C, H, W) order matches torchvision's
    `flatten` of the pooled map, so the reshape is exact.
    """
    if not (arch.startswith("vgg") and any(k.startswith("pre_logits.fc1.") for k in state)):
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        for src, dst in _TIMM_VGG_RENAMES.items():
            if k.startswith(src):
                k = dst + k[len(src) :]
                if v.ndim == 4:
                    v = v.reshape(v.shape[0], -1)  # (out, in, kh, kw) -> (out, in*kh*kw)
                break
        out[k] = v
    return out


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_digest(sha256: str) -> str:
    digest = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return digest


def _is_url(source: str | Path) -> bool:
    return isinstance(source, str) and urllib.parse.urlparse(source).scheme.lower() in ("file", "http", "https")


def _cache_name(url: str, sha256: str | None) -> str:
    # The URL's file name keeps the suffix that tells the format; a short hash of the whole URL
    # in front keeps two ".../model.pth" from different places apart in one cache folder.
    base = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    url_tag = hashlib.sha256(url.encode()).hexdigest()[:8]
    if base:
        return f"{url_tag}-{base}"
    return sha256[:16] if sha256 else url_tag


def _download(url: str, out: BinaryIO, timeout: float, progress: bool, desc: str) -> str:
    from tqdm import tqdm

    h = hashlib.sha256()
    received = 0
    request = urllib.request.Request(url, headers={"User-Agent": "imgcls"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise OSError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise OSError(f"could not download {url}: {e.reason}") from e
    if total is not None and received != total:
        raise OSError(f"download of {url} stopped early: {received} of {total} bytes")
    return h.hexdigest()


def fetch_weights(url: str, sha256: str | None, cache_dir: str | Path, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download `url` (file://, http://, https://) into `cache_dir` and return the cached path.

    A cached copy is reused when its SHA-256 matches (or no digest was given). A new download goes
    to a temporary file in `cache_dir`, is checked against `sha256`, and is renamed into place
    only when it matches; on a mismatch the temporary file is deleted and ValueError names both
    digests. `timeout` bounds each blocking network operation, in seconds.
    """
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme not in ("file", "http", "https"):
        raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r}: use file://, http:// or https://")
    expected = _check_digest(sha256) if sha256 is not None else None
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / _cache_name(url, expected)
    if target.is_file() and (expected is None or sha256_file(target) == expected):
        return target

    # Readers see no file or a whole, checked one; the file gets the normal mode (not mkstemp's 0600),
    # and on any error (a mismatch, a dropped connection, Ctrl-C) the temp file is removed.
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            digest = _download(url, f, timeout, progress, desc=target.name)
        if expected is not None and digest != expected:
            raise ValueError(f"SHA-256 mismatch for {url}: expected {expected}, downloaded file has {digest}; it was deleted")
    return target


def _classifier_name(model: nn.Module) -> str | None:
    name = getattr(model, "classifier_name", None)
    if name:
        return name
    # Models without the attribute: the last Linear is the classifier in every family we ship.
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def load_pretrained_weights(
    model: nn.Module,
    arch: str,
    source: str | Path,
    sha256: str | None = None,
    cache_dir: str | Path | None = None,
    num_classes: int | None = None,
) -> LoadedWeights:
    """Load a checkpoint (local path or URL) into `model` and report what was loaded.

    `num_classes`, when given and different from `model.num_classes`, first resets the head.
    Then, if the file's classifier has a different shape from the model's (a 1000-class ImageNet
    file into a 5-class model), every tensor except the classifier is loaded and the result says
    so; otherwise loading is strict and a real mismatch raises ValueError naming the first keys.
    URLs are cached in `cache_dir` (default ~/.cache/imgcls/weights); `sha256` is checked for
    local files too.
    """
    if num_classes is not None and num_classes != getattr(model, "num_classes", None):
        model.reset_classifier(num_classes)
    if _is_url(source):
        cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "imgcls" / "weights"
        path = fetch_weights(str(source), sha256, cache)
    else:
        path = Path(source)
        if sha256 is not None and path.is_file():
            expected, actual = _check_digest(sha256), sha256_file(path)
            if actual != expected:
                raise ValueError(f"SHA-256 mismatch for {path}: expected {expected}, file has {actual}")

    raw = load_weights_file(path)
    state = convert_timm_state_dict(arch, raw)
    layout = "timm" if state.keys() != raw.keys() else "torchvision"
    num_tensors = len(state)
    own = model.state_dict()

    skipped: tuple[str, ...] = ()
    file_num_classes = None
    head = _classifier_name(model)
    if head is not None:
        head_keys = [k for k in own if k.startswith(head + ".")]
        if any(k in state and state[k].shape != own[k].shape for k in head_keys):
            weight = state.get(f"{head}.weight")
            file_num_classes = int(weight.shape[0]) if weight is not None else None
            skipped = tuple(k for k in head_keys if k in state)
            num_tensors -= len(skipped)
            for k in head_keys:
                state[k] = own[k]  # keep the model's own fresh head

    # Checkpoints written before PyTorch 0.4.1 have no BatchNorm num_batches_tracked buffers; the
    # counter only matters for momentum=None, so the model's own value stands in.
    for k, v in own.items():
        if k.endswith(".num_batches_tracked") and k not in state:
            state[k] = v

    load_state_dict_strict(model, state, source=str(path))
    return LoadedWeights(path=path, layout=layout, num_tensors=num_tensors, skipped=skipped, file_num_classes=file_num_classes)
