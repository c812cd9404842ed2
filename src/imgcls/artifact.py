"""The model artifact: a folder with `model.safetensors` (weights) and `model.json` (everything else).

model.json holds the architecture, class names, preprocessing spec, metrics, resolved config,
seed, split summary, dataset fingerprint and package versions. Loading builds the architecture
from the registry and reads plain tensors: nothing is unpickled, no code from the file runs.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgcls.atomic import atomic_path, atomic_write_text
from imgcls.models import create_model, get_entry
from imgcls.transforms import PreprocessSpec

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """A model folder is missing, incomplete or inconsistent."""


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


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


def resolve_artifact_dir(path: str | os.PathLike) -> Path:
    """Accept the artifact folder itself or a path to its model.json / model.safetensors."""
    p = Path(path).expanduser()
    if p.is_file() and p.name in (META_FILE, WEIGHTS_FILE):
        p = p.parent
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
    meta = {"format": "imgcls-model", "format_version": FORMAT_VERSION, "num_classes": len(meta["class_names"]),
            "arch_version": get_entry(meta["arch"]).arch_version, **meta}
    meta.setdefault("versions", package_versions())
    atomic_save_tensors(out / WEIGHTS_FILE, model.state_dict(), metadata={"format": "imgcls-model", "arch": meta["arch"]})
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2, sort_keys=False))
    return out


def load_meta(path: str | os.PathLike) -> dict[str, Any]:
    p = resolve_artifact_dir(path)
    try:
        meta = json.loads((p / META_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{p / META_FILE}: not valid JSON ({e})") from None
    if meta.get("format") != "imgcls-model":
        raise ArtifactError(f"{p / META_FILE}: not an imgcls model description")
    return meta


def load_artifact(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata) from an artifact folder."""
    from safetensors.torch import load_file

    from imgcls.models.registry import load_state_dict_strict

    p = resolve_artifact_dir(path)
    meta = load_meta(p)
    check_arch_version(p, meta)
    model = create_model(meta["arch"], num_classes=len(meta["class_names"]), **meta.get("model_kwargs", {}))
    try:
        load_state_dict_strict(model, load_file(str(p / WEIGHTS_FILE)), source=str(p / WEIGHTS_FILE))
    except ValueError as e:
        made_by = meta.get("versions", {}).get("imgcls", "an unknown version")
        raise ArtifactError(f"{e}. The model folder was written by imgcls {made_by}; if {meta['arch']}'s layout has changed since, "
                            f"retrain it or load it with that version") from None
    return model.to(device).eval(), meta


def check_arch_version(path: Path, meta: dict[str, Any]) -> None:
    """A clear error when a model folder was saved for another layout of its architecture."""
    try:
        current = get_entry(meta["arch"]).arch_version
    except ValueError as e:
        raise ArtifactError(f"{path / META_FILE}: {e}") from None
    saved = meta.get("arch_version")
    if saved is not None and int(saved) != current:
        made_by = meta.get("versions", {}).get("imgcls", "an unknown version")
        raise ArtifactError(f"{path}: {meta['arch']} layout version {saved} (written by imgcls {made_by}); this imgcls builds layout version {current}. "
                            f"Retrain the model, or load it with the imgcls version that wrote it")


def spec_of(meta: dict[str, Any]) -> PreprocessSpec:
    return PreprocessSpec.from_dict(meta["preprocess"])
