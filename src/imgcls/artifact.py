"""The model artifact: a folder with `model.safetensors` (weights) and `model.json` (everything else).

model.json holds the architecture, class names, preprocessing spec, metrics, resolved config,
seed, split summary, dataset fingerprint, package versions and the provenance of imgcls's own code. Loading builds the architecture
from the registry and reads plain tensors: nothing is unpickled, no code from the file runs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgcls.atomic import atomic_write_bytes, atomic_write_text
from imgcls.config import TTA_MODES
from imgcls.models import create_model, get_entry
from imgcls.transforms import PreprocessSpec

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT_VERSION = 1
GIT_TIMEOUT_S = 2.0  # per git call; a slow network file system must not stall every save


class ArtifactError(ValueError):
    """A model folder is missing, incomplete or inconsistent."""


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    # Serialised in memory (one copy of the tensors: 16 MB for small_cnn's checkpoint) and written by
    # atomic_write_bytes rather than safetensors' save_file: the file is fsynced before the rename, and a
    # full disk is a WriteError naming the file, where save_file raised "I/O error: File too large (os error 27)".
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def package_versions() -> dict[str, str]:
    import numpy
    import PIL

    import imgcls

    return {
        "imgcls": imgcls.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }


def provenance() -> dict[str, Any]:
    """Which imgcls code is running: `source_sha256` over the package's .py files, always, and
    `git_commit` + `git_dirty` (uncommitted changes to tracked files) when the package is tracked
    in a git checkout and git answers within GIT_TIMEOUT_S. Computed once per process."""
    return dict(_provenance())


@functools.cache
def _provenance() -> tuple[tuple[str, Any], ...]:
    import imgcls

    pkg = Path(imgcls.__file__).resolve().parent  # src/imgcls, wherever this module sits inside it
    return (*_git_state(pkg).items(), ("source_sha256", source_sha256(pkg)))


def source_sha256(pkg: Path) -> str:
    """sha256 over (relative path, size, bytes) of every .py file under `pkg`, sorted by path."""
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py"), key=lambda f: f.relative_to(pkg).as_posix()):
        data = f.read_bytes()
        h.update(f"{f.relative_to(pkg).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _git(pkg: Path, *args: str) -> str | None:
    # --no-optional-locks: `git status` must not take index.lock under someone committing in that checkout.
    try:
        r = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(pkg), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):  # no git, or too slow
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _git_state(pkg: Path) -> dict[str, Any]:
    # Only when the package's own files are tracked: an installed copy that merely sits inside some
    # other checkout (a virtualenv in a project folder) must not record that project's commit.
    if not _git(pkg, "ls-files", "--error-unmatch", "__init__.py"):
        return {}
    commit = _git(pkg, "rev-parse", "HEAD")
    if not commit:  # a repository without commits yet
        return {}
    status = _git(pkg, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit} if status is None else {"git_commit": commit, "git_dirty": bool(status)}


def resolve_artifact_dir(path: str | os.PathLike) -> Path:
    """Accept the artifact folder itself or a path to its model.json / model.safetensors."""
    p = Path(path).expanduser()
    if p.is_file() and p.name in (META_FILE, WEIGHTS_FILE):
        p = p.parent
    for name in (META_FILE, WEIGHTS_FILE):  # a FIFO would block the reader, a link to /dev/zero read forever
        if (p / name).exists() and not (p / name).is_file():
            raise ArtifactError(f"{p / name}: not a regular file")
    if not (p / META_FILE).is_file():
        raise ArtifactError(f"{p}: not an imgcls model folder (no {META_FILE}); pass the run folder written by `imgcls train`")
    if not (p / WEIGHTS_FILE).is_file():
        raise ArtifactError(f"{p}: {WEIGHTS_FILE} is missing")
    return p


def save_artifact(out_dir: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write weights then metadata, each atomically; `meta` needs arch, class_names, preprocess."""
    for key in ("arch", "class_names", "preprocess"):
        if key not in meta:
            raise ArtifactError(f"artifact metadata needs {key!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "imgcls-model",
        "format_version": FORMAT_VERSION,
        "num_classes": len(meta["class_names"]),
        "arch_version": get_entry(meta["arch"]).arch_version,
        **meta,
    }
    meta.setdefault("versions", package_versions())
    meta.setdefault("provenance", provenance())
    atomic_save_tensors(out / WEIGHTS_FILE, model.state_dict(), metadata={"format": "imgcls-model", "arch": meta["arch"]})
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2, sort_keys=False))
    return out


def load_meta(path: str | os.PathLike) -> dict[str, Any]:
    """model.json of a model folder, checked field by field (`validate_meta`): ArtifactError otherwise."""
    p = resolve_artifact_dir(path)
    meta = _read_meta(p)
    _check_class_count(p, meta)
    return meta


def load_artifact(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata) from an artifact folder.

    model.json is checked against its schema, the weights against the architecture (names,
    shapes, float kinds) and for NaN/inf; every problem is one ArtifactError naming the file.
    The weights are read with safetensors only: nothing in the folder is ever unpickled.
    """
    from imgcls.models.registry import check_state_dict

    p = resolve_artifact_dir(path)
    meta = _read_meta(p)
    check_arch_version(p, meta)
    # The layout is built on the meta device first (names, shapes, dtypes; no memory) and checked
    # against the weights; only a model that fits them is built for real. Edited model_kwargs or
    # class_names could otherwise ask for a model of many GB (widths [8, 8, 40000]: 58 GB) before
    # the weights showed it wrong (found while writing tests/test_fuzz_inputs.py).
    layout = _build_model(p, meta, device="meta")
    state = _read_weights(p / WEIGHTS_FILE)
    _check_tensors(p / WEIGHTS_FILE, state, layout)
    try:
        check_state_dict(layout, state, source=str(p / WEIGHTS_FILE))
    except ValueError as e:
        made_by = meta.get("versions", {}).get("imgcls", "an unknown version")
        raise ArtifactError(
            f"{e}. model.json lists {len(meta['class_names'])} class names; if they were edited, restore them. "
            f"The model folder was written by imgcls {made_by}; if {meta['arch']}'s layout has changed since, "
            f"retrain it or load it with that version"
        ) from None
    model = _build_model(p, meta)
    model.load_state_dict(state, strict=True)
    # After the weights: when class_names was edited, the head's shape (above) is the clearer error.
    _check_class_count(p, meta)
    return model.to(device).eval(), meta


def check_arch_version(path: Path, meta: dict[str, Any]) -> None:
    """A clear error when a model folder was saved for another layout of its architecture."""
    try:
        current = get_entry(meta["arch"]).arch_version
    except ValueError as e:
        raise ArtifactError(f"{path / META_FILE}: {e}") from None
    saved = meta.get("arch_version")
    if saved is not None and saved != current:
        made_by = meta.get("versions", {}).get("imgcls", "an unknown version")
        raise ArtifactError(
            f"{path}: {meta['arch']} layout version {saved} (written by imgcls {made_by}); "
            f"this imgcls builds layout version {current}. "
            f"Retrain the model, or load it with the imgcls version that wrote it"
        )


def spec_of(meta: dict[str, Any]) -> PreprocessSpec:
    return PreprocessSpec.from_dict(meta["preprocess"])


# ----------------------------------------------------------------------------- checking a model folder


def _read_meta(p: Path) -> dict[str, Any]:
    file = p / META_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{file}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ArtifactError(f"{file}: not valid JSON (nested too deeply)") from None
    except OSError as e:
        raise ArtifactError(f"{file}: cannot read it ({e.strerror or e})") from None
    validate_meta(meta, file)
    return meta


def _kind(value: Any) -> str:
    """How JSON spells the type of `value`, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    names = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Optional fields that other modules read with .get(): each must have this JSON type when present.
_OPTIONAL_OBJECTS = (
    "model_kwargs",
    "versions",
    "config",
    "dataset",
    "metrics",
    "training",
    "provenance",
    "calibration",
    "unknown",
    "conformal",
)  # the last three: inference.trust reads them


def validate_meta(meta: Any, source: str | os.PathLike = META_FILE) -> None:
    """Check model.json's content (parsed) against its schema; ArtifactError naming `source` and the problem.

    Required: format "imgcls-model", format_version <= FORMAT_VERSION, arch (a registered name),
    class_names (unique non-empty strings), preprocess (a valid PreprocessSpec). Checked when
    present: num_classes, arch_version, tta and the objects in _OPTIONAL_OBJECTS.
    """

    def bad(problem: str) -> ArtifactError:
        return ArtifactError(f"{source}: {problem}")

    if not isinstance(meta, dict):
        raise bad(f"expected a JSON object, found {_kind(meta)}")
    if meta.get("format") != "imgcls-model":
        raise bad('not an imgcls model description (no "format": "imgcls-model")')
    if "format_version" not in meta:
        raise bad("'format_version' is missing")
    version = meta["format_version"]
    if not _is_int(version) or version < 1:
        raise bad(f"format_version must be a positive integer, found {json.dumps(version)}")
    if version > FORMAT_VERSION:
        raise bad(f"format_version {version} was written by a newer imgcls; this one reads format_version {FORMAT_VERSION}: upgrade imgcls")
    for key in ("arch", "class_names", "preprocess"):
        if key not in meta:
            raise bad(f"{key!r} is missing")
    if not isinstance(meta["arch"], str) or not meta["arch"]:
        raise bad(f"arch must be a model name (a string), found {_kind(meta['arch'])}")
    _validate_class_names(meta["class_names"], bad)
    for key in ("num_classes", "arch_version"):
        if key in meta and (not _is_int(meta[key]) or meta[key] < 1):
            raise bad(f"{key} must be a positive integer, found {meta[key]!r}")
    if "tta" in meta and meta["tta"] not in TTA_MODES:
        raise bad(f"tta must be one of {', '.join(TTA_MODES)}, found {meta['tta']!r}")
    select = meta.get("tta_select", 1.0)
    if isinstance(select, bool) or not isinstance(select, int | float) or not 0 <= select <= 1:
        raise bad(f"tta_select must be a number from 0 to 1 (share of the images given TTA views), found {select!r}")
    for key in _OPTIONAL_OBJECTS:
        if key in meta and not isinstance(meta[key], dict):
            raise bad(f"{key} must be an object, found {_kind(meta[key])}")
    data_cfg = meta.get("config", {}).get("data", {})  # evaluate reads config.data.max_pixels
    if not isinstance(data_cfg, dict) or not _is_int(data_cfg.get("max_pixels", 1)) or data_cfg.get("max_pixels", 1) < 1:
        raise bad("config.data.max_pixels must be a positive integer")
    _validate_preprocess(meta["preprocess"], bad)


def _validate_class_names(names: Any, bad: Callable[[str], ArtifactError]) -> None:
    if not isinstance(names, list) or not names:
        raise bad(f"class_names must be a non-empty list of strings, found {'an empty list' if names == [] else _kind(names)}")
    odd = next((n for n in names if not isinstance(n, str) or not n.strip()), None)
    if odd is not None:
        raise bad(f"class_names must hold non-empty strings, found {odd!r}")
    dupes = sorted(n for n, count in Counter(names).items() if count > 1)
    if dupes:
        raise bad(f"class_names lists {', '.join(map(repr, dupes[:5]))} more than once; each class must be named once")


def _validate_preprocess(d: Any, bad: Callable[[str], ArtifactError]) -> None:
    if not isinstance(d, dict):
        raise bad(f"preprocess must be an object, found {_kind(d)}")
    try:
        spec = PreprocessSpec.from_dict(d)
    except (TypeError, ValueError) as e:
        raise bad(f"preprocess is not valid ({e})") from None
    if "img_size" not in d:
        raise bad("preprocess.img_size is missing")
    if not all(math.isfinite(v) for v in (*spec.mean, *spec.std)):
        raise bad("preprocess mean and std must be finite numbers")


def _check_class_count(p: Path, meta: dict[str, Any]) -> None:
    if "num_classes" in meta and meta["num_classes"] != len(meta["class_names"]):
        raise ArtifactError(f"{p / META_FILE}: num_classes is {meta['num_classes']} but class_names lists {len(meta['class_names'])} names")


def _build_model(p: Path, meta: dict[str, Any], device: str | None = None) -> nn.Module:
    """The model model.json describes, with fresh weights; on `device` "meta": its layout only."""
    kwargs = meta.get("model_kwargs", {})
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            return create_model(meta["arch"], num_classes=len(meta["class_names"]), **kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as e:
        shown = json.dumps(kwargs)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        n = len(meta["class_names"])
        raise ArtifactError(f"{p / META_FILE}: cannot build {meta['arch']} with {n} classes and model_kwargs {shown} ({e})") from None


_PICKLE_OR_TORCH_SAVE = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")  # pickle protocols 2-5, torch.save's zip


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; ArtifactError for anything else (never unpickled)."""
    from safetensors.torch import load_file

    try:
        with open(file, "rb") as f:
            head = f.read(8)
        if not head:
            raise ArtifactError(f"{file}: empty file (0 bytes)")
        if head.startswith(_PICKLE_OR_TORCH_SAVE):
            raise ArtifactError(
                f"{file}: looks like a pickle or torch.save file; imgcls reads safetensors weights only and never unpickles"
            )
        return load_file(str(file))
    except ArtifactError:
        raise
    except OSError as e:
        raise ArtifactError(f"{file}: cannot read it ({e.strerror or e})") from None
    except Exception as e:  # safetensors' parser raises SafetensorError (truncated, random or foreign bytes)
        raise ArtifactError(f"{file}: not a readable safetensors file ({' '.join(str(e).split())})") from None


def _check_tensors(file: Path, state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Float weights where the model has floats, and every value finite (NaN weights give NaN answers)."""
    own = model.state_dict()
    for name, t in state.items():
        if name in own and own[name].is_floating_point() and not t.is_floating_point():
            raise ArtifactError(f"{file}: {name} holds {t.dtype} values where {type(model).__name__} has {own[name].dtype} weights")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{file}: {name} holds NaN or infinite values; the weights are damaged (or training diverged)")
