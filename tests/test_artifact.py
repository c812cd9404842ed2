"""imgcls.artifact: save/load round trip, provenance of the code that wrote a model, and file modes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch

import imgcls
import imgcls.artifact as artifact
from imgcls.artifact import ArtifactError, load_artifact, load_meta, provenance, save_artifact, source_sha256, spec_of
from imgcls.models import create_model, get_entry
from imgcls.transforms import PreprocessSpec

CLASSES = ["cat", "dog", "emu"]
WIDTHS = (8, 16, 16)  # a narrow small_cnn: the round trip must rebuild it from model_kwargs
META = {
    "arch": "small_cnn",
    "model_kwargs": {"widths": list(WIDTHS)},
    "class_names": CLASSES,
    "preprocess": PreprocessSpec(img_size=16, crop_pct=0.8).to_dict(),
    "metrics": {"val": {"accuracy": 0.5}},
    "seed": 3,
    "tta": "flip",
}


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def normal_mode() -> int:
    """What open() gives a new file under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("small_cnn", len(CLASSES), widths=WIDTHS)
    with torch.no_grad():  # non-default BN statistics and weights: a lost buffer would change the outputs
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        model.fc.weight.normal_()
    return model.eval()


def test_round_trip_same_outputs_and_meta(tmp_path, umask022):
    model = tiny_model()
    out = save_artifact(tmp_path / "m", model, dict(META))
    assert sorted(os.listdir(out)) == ["model.json", "model.safetensors"]  # no temp files left
    # the files keep the normal mode: readable by group and others under umask 022 (safetensors
    # itself writes 0600 files, and mkstemp did too)
    assert mode(out / "model.json") == 0o644 and mode(out / "model.safetensors") == 0o644

    loaded, meta = load_artifact(out)
    assert not loaded.training and loaded.num_features == WIDTHS[-1]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # (B, 3, H, W)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    for key, value in META.items():
        assert meta[key] == value, key
    assert meta["format"] == "imgcls-model" and meta["num_classes"] == 3
    assert meta["arch_version"] == get_entry("small_cnn").arch_version
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["imgcls"] == imgcls.__version__
    assert meta["provenance"] == provenance()
    assert spec_of(meta) == PreprocessSpec(img_size=16, crop_pct=0.8)
    assert load_meta(out / "model.json") == meta == json.loads((out / "model.json").read_text())


def test_save_keeps_given_versions_and_provenance(tmp_path):
    given = {"versions": {"imgcls": "0.0.1"}, "provenance": {"git_commit": "abc"}}
    _, meta = load_artifact(save_artifact(tmp_path / "m", tiny_model(), {**META, **given}))
    assert meta["versions"] == given["versions"] and meta["provenance"] == given["provenance"]


def test_save_needs_the_essentials(tmp_path):
    for key in ("arch", "class_names", "preprocess"):
        with pytest.raises(ArtifactError, match=key):
            save_artifact(tmp_path / key, tiny_model(), {k: v for k, v in META.items() if k != key})


def test_provenance_names_this_code():
    artifact._provenance.cache_clear()  # computed now, next to the checks below, not earlier in the session
    prov = provenance()
    pkg = Path(imgcls.__file__).resolve().parent
    assert prov["source_sha256"] == source_sha256(pkg) and len(prov["source_sha256"]) == 64
    git = shutil.which("git")
    tracked = (
        git and subprocess.run([git, "-C", str(pkg), "ls-files", "--error-unmatch", "__init__.py"], capture_output=True).returncode == 0
    )
    if tracked:  # a git checkout (CI's fresh clone, a developer's tree)
        head = subprocess.run([git, "-C", str(pkg), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert prov["git_commit"] == head and isinstance(prov["git_dirty"], bool)
    else:  # an installed copy: the source hash alone
        assert set(prov) == {"source_sha256"}
    prov["source_sha256"] = "changed"
    assert provenance()["source_sha256"] == source_sha256(pkg)  # callers get a copy of the cached answer


def test_provenance_is_computed_once_per_process(monkeypatch):
    provenance()

    def no_more(*args, **kwargs):
        raise AssertionError("provenance ran git or read files again")

    monkeypatch.setattr(artifact, "_git_state", no_more)
    monkeypatch.setattr(artifact, "source_sha256", no_more)
    assert "source_sha256" in provenance()


def test_source_sha256_covers_names_and_bytes_of_py_files(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    first = source_sha256(pkg)
    (pkg / "notes.txt").write_text("not code")
    (pkg / "sub" / "b.pyc").write_bytes(b"\0")
    assert source_sha256(pkg) == first  # only .py files count
    (pkg / "a.py").write_text("x = 2\n")
    assert source_sha256(pkg) != first
    (pkg / "a.py").write_text("x = 1\n")
    assert source_sha256(pkg) == first
    (pkg / "sub" / "b.py").rename(pkg / "sub" / "c.py")
    assert source_sha256(pkg) != first  # a renamed module is other code


def _git(repo: Path, *args: str) -> None:
    identity = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]  # for the commit, whatever the machine's git config
    subprocess.run(["git", *identity, "-C", str(repo), *args], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_state_commit_and_dirty(tmp_path):
    repo = tmp_path / "repo"
    pkg = repo / "src" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    _git(repo, "init", "-q")
    assert artifact._git_state(pkg) == {}  # package not tracked (as for an installed copy inside some checkout)
    _git(repo, "add", ".")
    assert artifact._git_state(pkg) == {}  # no commit yet
    _git(repo, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert artifact._git_state(pkg) == {"git_commit": head, "git_dirty": False}
    (repo / "scratch.py").write_text("")  # untracked files do not make the tree dirty
    assert artifact._git_state(pkg)["git_dirty"] is False
    (pkg / "__init__.py").write_text("changed = True\n")
    assert artifact._git_state(pkg) == {"git_commit": head, "git_dirty": True}


def test_git_missing_or_slow_falls_back_to_the_hash(tmp_path, monkeypatch):
    def slow(cmd, **kwargs):
        assert kwargs["timeout"] <= 2.0  # never waits on git for more than 2 s
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(subprocess, "run", slow)
    assert artifact._git_state(Path(imgcls.__file__).parent) == {}

    def missing(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory: 'git'")

    monkeypatch.setattr(subprocess, "run", missing)
    assert artifact._git_state(Path(imgcls.__file__).parent) == {}


def test_trained_run_files_have_the_normal_mode_and_provenance(trained_run):
    run, _ = trained_run
    names = ["model.json", "model.safetensors", "metrics.csv", "split.json", "checkpoint.safetensors"]
    assert {n: oct(mode(run / n)) for n in names} == {n: oct(normal_mode()) for n in names}  # 0o644 under umask 022
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    meta = json.loads((run / "model.json").read_text())
    assert meta["provenance"] == provenance()  # this process's code, computed once when the run saved its model
    assert set(meta["versions"]) >= {"imgcls", "torch", "numpy", "pillow", "python"}
