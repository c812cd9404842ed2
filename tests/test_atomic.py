"""imgcls.atomic (mode, symlinks, failures mid-write) and the writers that go through it: the report,
the decode cache and weight downloads keep the normal file mode and leave no temp file behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from badfiles import make_good_image
from imgcls.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_written_file_has_the_normal_mode(tmp_path, umask022):
    atomic_write_text(tmp_path / "a.json", "{}")
    assert mode(tmp_path / "a.json") == 0o644  # readable by group and others, as open() would make it
    old = tmp_path / "b.txt"
    old.write_text("old")
    old.chmod(0o600)
    atomic_write_bytes(old, b"new")  # a new file, with the normal mode, replaces the old one
    assert old.read_bytes() == b"new" and mode(old) == 0o644


def test_mode_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "private.txt") == 0o600


def test_text_is_utf8(tmp_path):
    atomic_write_text(tmp_path / "t.txt", "crème brûlée ✓")
    assert (tmp_path / "t.txt").read_bytes() == "crème brûlée ✓".encode()


def test_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "model.json"
    link.symlink_to(victim)
    atomic_write_text(link, "new")
    assert not link.is_symlink() and link.read_text() == "new"
    assert victim.read_text() == "keep me"


def test_temp_file_is_hidden_next_to_the_target(tmp_path, umask022):
    target = tmp_path / "w.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".w.bin.") and tmp.name.endswith(".tmp")
        assert tmp.exists() and mode(tmp) == 0o644 and not target.exists()
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data" and os.listdir(tmp_path) == ["w.bin"]


def test_a_writer_that_swaps_in_its_own_file_gets_the_normal_mode(tmp_path, umask022):
    target = tmp_path / "w.safetensors"
    with atomic_path(target) as tmp:
        own = tmp_path / "writer-temp"
        fd = os.open(own, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"tensors")
        os.close(fd)
        os.replace(own, tmp)  # as safetensors' save_file does: its own 0600 temp file, renamed over the path it was given
    assert target.read_bytes() == b"tensors" and mode(target) == 0o644
    assert os.listdir(tmp_path) == ["w.safetensors"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_write_keeps_the_old_file_and_no_temp(tmp_path, error):
    target = tmp_path / "model.json"
    target.write_text("old")
    with pytest.raises(error):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise error("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["model.json"]


def test_failing_writer_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    target.write_text("old")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.csv"]


# --- the writers that use it ------------------------------------------------------------------


def test_report_files_are_atomic_with_normal_mode(tmp_path, umask022):
    from imgcls.metrics import classification_metrics
    from imgcls.report import write_report

    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    metrics = classification_metrics(probs, np.array([0, 1, 1]), ["cat", "dog"])
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "train_acc": 0.5, "val_acc": 0.6} for e in (1, 2)]
    out = tmp_path / "report"
    page = write_report(out, metrics, ["cat", "dog"], history=history)
    names = sorted(os.listdir(out))
    assert names == ["confusion_matrix.png", "confusion_matrix.txt", "metrics.json", "report.html", "training_curves.png"]
    assert all(mode(out / n) == 0o644 for n in names)
    for png in ("confusion_matrix.png", "training_curves.png"):  # PNGs although the temp name ended in .tmp
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "confusion_matrix.png" in page.read_text(encoding="utf-8")


def test_report_plot_format_follows_the_suffix(tmp_path):
    from imgcls.report import plot_confusion_matrix

    path = plot_confusion_matrix(np.array([[2, 1], [0, 3]]), ["a", "b"], tmp_path / "cm.svg")
    assert path.read_text().lstrip().startswith("<?xml") and "<svg" in path.read_text()


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir()
    return [str(make_good_image(folder / f"{i}.png", size=(20, 20), color=(10 * i, 50, 90))) for i in range(n)]


def test_decode_cache_mode_and_memory_map(tmp_path, umask022):
    from imgcls.data import decode_images
    from imgcls.transforms import PreprocessSpec

    paths = _images(tmp_path / "img", 3)
    (tmp_path / "img" / "bad.png").write_bytes(b"not an image")  # compaction path: the cache is rewritten without it
    cache = tmp_path / "cache"
    dec = decode_images([*paths, str(tmp_path / "img" / "bad.png")], PreprocessSpec(img_size=8), cache_dir=cache, workers=1, progress=False)
    assert isinstance(dec.images, np.memmap) and dec.images.shape == (3, 8, 8, 3) and len(dec.failures) == 1
    assert dec.images[1, 0, 0].tolist() == [10, 50, 90]
    files = sorted(os.listdir(cache))
    assert [Path(f).suffix for f in files] == [".json", ".npy"]  # no temp file left
    assert all(mode(cache / f) == 0o644 for f in files)


def test_decode_failure_leaves_no_cache_and_no_temp(tmp_path, monkeypatch):
    import imgcls.data as data
    import imgcls.decode as decode
    from imgcls.transforms import PreprocessSpec

    paths = _images(tmp_path / "img", 2)

    def crash(job):
        raise KeyboardInterrupt  # a user stopping a long decode

    monkeypatch.setattr(decode, "_decode_run", crash)
    with pytest.raises(KeyboardInterrupt):
        data.decode_images(paths, PreprocessSpec(img_size=8), cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert os.listdir(tmp_path / "cache") == []


def test_downloaded_weights_have_the_normal_mode(tmp_path, umask022):
    from imgcls.models.weights import fetch_weights

    src = tmp_path / "w.bin"
    src.write_bytes(b"weights")
    got = fetch_weights(src.as_uri(), None, tmp_path / "cache", progress=False)
    assert got.read_bytes() == b"weights" and mode(got) == 0o644  # not mkstemp's 0600
    assert os.listdir(tmp_path / "cache") == [got.name]
