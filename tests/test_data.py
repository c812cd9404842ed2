"""Tests for imgcls.data: indexing the three layouts, stratified splits, decoding and its cache."""

from __future__ import annotations

import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from badfiles import make_bad_files, make_good_image
from imgcls import decode as decode_mod
from imgcls.data import DatasetError, dataset_fingerprint, decode_images, index_dataset, load_split, stratified_split
from imgcls.transforms import PreprocessSpec
from synth import make_class_folders, make_csv_manifest, make_split_folders

SPEC = PreprocessSpec(img_size=12, crop_pct=0.75)  # cache_size 16


def rel(paths, root) -> list[str]:
    return [pathlib.Path(p).relative_to(root).as_posix() for p in paths]


# ----------------------------------------------------------------------------- class folders


def test_class_folders_index(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=4, size=16)
    index = index_dataset(root)
    assert index.layout == "folders"
    assert index.class_names == ["circle", "square", "triangle"]
    assert list(index.splits) == ["all"]
    samples = index.splits["all"]
    assert len(samples) == 12
    for path, label in samples:
        assert pathlib.Path(path).parent.name == index.class_names[label]
        assert pathlib.Path(path).is_file()
    assert not index.ignored
    assert "3 classes" in index.summary() and "all: 12" in index.summary()


def test_class_order_is_sorted_and_deterministic(tmp_path):
    names = ("zebra", "apple", "Mango", "kiwi")
    root = make_class_folders(tmp_path / "d", classes=names, per_class=2, size=16)
    a, b = index_dataset(root), index_dataset(root)
    assert a.class_names == sorted(names) == ["Mango", "apple", "kiwi", "zebra"]
    assert a.splits == b.splits
    # Labels follow the sorted order, not creation order.
    assert {pathlib.Path(p).parent.name for p, y in a.splits["all"] if y == 0} == {"Mango"}


def test_pinned_class_names_set_the_label_order(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=2, size=16)
    index = index_dataset(root, class_names=["triangle", "square", "circle"])
    assert index.class_names == ["triangle", "square", "circle"]
    assert {pathlib.Path(p).parent.name for p, y in index.splits["all"] if y == 0} == {"triangle"}


def test_mixed_case_extensions_hidden_and_non_image_files(tmp_path):
    root = tmp_path / "d"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    make_good_image(root / "a" / "one.JPG")
    make_good_image(root / "a" / "two.Png")
    make_good_image(root / "a" / "three.jpeg")
    make_good_image(root / "b" / "four.png")
    make_good_image(root / "b" / ".hidden.png")  # hidden image: skipped and counted
    (root / "b" / ".DS_Store").write_bytes(b"\0\0")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b" / "labels.json").write_text("{}")
    (root / "README.md").write_text("files at the top level are not samples")
    (root / ".git").mkdir()  # a hidden folder is not a class
    make_good_image(root / ".git" / "x.png")

    index = index_dataset(root)
    assert index.class_names == ["a", "b"]
    names = sorted(pathlib.Path(p).name for p, _ in index.splits["all"])
    assert names == ["four.png", "one.JPG", "three.jpeg", "two.Png"]
    assert index.ignored["hidden files"] == 2
    assert index.ignored["non-image files"] == 2
    assert index.ignored["files outside class folders"] == 1
    assert "ignored" in index.summary()


def test_nested_subfolders_inside_a_class(tmp_path):
    root = tmp_path / "d"
    (root / "cat" / "2019" / "summer").mkdir(parents=True)
    (root / "dog").mkdir()
    make_good_image(root / "cat" / "top.png")
    make_good_image(root / "cat" / "2019" / "a.png")
    make_good_image(root / "cat" / "2019" / "summer" / "b.png")
    make_good_image(root / "dog" / "c.png")
    (root / "cat" / ".cache").mkdir()
    make_good_image(root / "cat" / ".cache" / "thumb.png")  # inside a hidden folder: not a sample

    index = index_dataset(root)
    assert index.class_names == ["cat", "dog"]  # "2019" is not a class
    by_label = {y: sorted(rel([p for p, label in index.splits["all"] if label == y], root)) for y in (0, 1)}
    assert by_label[0] == ["cat/2019/a.png", "cat/2019/summer/b.png", "cat/top.png"]
    assert by_label[1] == ["dog/c.png"]


# ----------------------------------------------------------------------------- split folders and CSV


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_split_folders(tmp_path, val_name):
    root = make_split_folders(tmp_path / "d", per_split={"train": 3, val_name: 2, "test": 1}, size=16)
    index = index_dataset(root)
    assert index.layout == "splits"
    assert set(index.splits) == {"train", "val", "test"}
    assert [len(index.splits[s]) for s in ("train", "val", "test")] == [9, 6, 3]
    assert index.class_names == ["circle", "square", "triangle"]
    for p, y in index.splits["val"]:
        assert pathlib.Path(p).parts[-3] == val_name
        assert pathlib.Path(p).parent.name == index.class_names[y]


def test_split_folders_class_names_are_the_union(tmp_path):
    root = tmp_path / "d"
    for sub in ("train/a", "train/b", "test/c"):
        (root / sub).mkdir(parents=True)
        make_good_image(root / sub / "1.png")
    index = index_dataset(root)
    assert index.class_names == ["a", "b", "c"]
    assert index.splits["test"] == [(str(root / "test" / "c" / "1.png"), 2)]


def test_csv_manifest_with_relative_paths_and_split_column(tmp_path):
    csv_path = make_csv_manifest(tmp_path / "d", per_class=10, size=16, splits={"train": 0.7, "valid": 0.3})
    index = index_dataset(csv_path)
    assert index.layout == "csv"
    assert index.root == csv_path
    assert index.class_names == ["circle", "square", "triangle"]
    assert set(index.splits) == {"train", "val"}  # "valid" is val
    assert len(index.splits["train"]) == 21 and len(index.splits["val"]) == 9
    for p, y in index.splits["train"] + index.splits["val"]:
        assert pathlib.Path(p).is_absolute() and pathlib.Path(p).is_file()  # resolved next to the CSV
        assert pathlib.Path(p).name.startswith(index.class_names[y] + "_")


def test_csv_manifest_without_split_column_and_odd_rows(tmp_path):
    root = tmp_path / "d"
    (root / "img").mkdir(parents=True)
    for name in ("x.png", "y.JPG", ".hidden.png"):
        make_good_image(root / "img" / name)
    (root / "img" / "notes.txt").write_text("hello")
    csv_path = root / "labels.csv"
    # Header case and surrounding spaces do not matter; a BOM is accepted.
    csv_path.write_text("\ufeffPath , LABEL\nimg/x.png,dog\n img/y.JPG ,cat\nimg/.hidden.png,cat\nimg/notes.txt,dog\n", encoding="utf-8")
    index = index_dataset(csv_path)
    assert index.class_names == ["cat", "dog"]
    assert list(index.splits) == ["all"]
    assert index.splits["all"] == [(str(root / "img" / "x.png"), 1), (str(root / "img" / "y.JPG"), 0)]
    assert index.ignored["hidden files"] == 1 and index.ignored["non-image files"] == 1


def test_csv_manifest_needs_path_and_label_columns(tmp_path):
    csv_path = tmp_path / "broken_manifest.csv"
    csv_path.write_text("picture,kind\na.png,cat\n")
    with pytest.raises(DatasetError) as e:
        index_dataset(csv_path)
    assert "broken_manifest.csv" in str(e.value)
    assert "path" in str(e.value) and "label" in str(e.value)


def test_csv_manifest_accepts_common_column_names(tmp_path):
    make_good_image(tmp_path / "a.png")
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("id,Filepath,Class\n1,a.png,cat\n")
    index = index_dataset(csv_path)
    assert index.class_names == ["cat"] and index.splits["all"] == [(str(tmp_path / "a.png"), 0)]


def test_csv_manifest_empty_label_names_the_line(tmp_path):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label\na.png,cat\nb.png,\n")
    with pytest.raises(DatasetError, match=r"m\.csv:3"):
        index_dataset(csv_path)


def test_csv_manifest_split_values_are_checked(tmp_path):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label,split\na.png,cat,train\nb.png,dog,holdout\n")
    with pytest.raises(DatasetError, match=r"m\.csv:3: split 'holdout'"):
        index_dataset(csv_path)
    csv_path.write_text("path,label,split\na.png,cat,train\nb.png,dog,\nc.png,dog,test\n")
    with pytest.raises(DatasetError, match=r"m\.csv:3: this row has no split"):  # would otherwise be dropped silently
        index_dataset(csv_path)


def test_csv_label_unknown_to_pinned_classes(tmp_path):
    csv_path = make_csv_manifest(tmp_path / "d", per_class=1, size=16)
    with pytest.raises(DatasetError, match="triangle"):
        index_dataset(csv_path, class_names=["circle", "square"])


# ----------------------------------------------------------------------------- index errors


def test_missing_path(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        index_dataset(tmp_path / "nope")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        index_dataset(tmp_path / "empty")


def test_class_folders_without_images(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "b").mkdir()
    (tmp_path / "d" / "b" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no image files"):
        index_dataset(tmp_path / "d")


def test_a_file_that_is_not_a_csv(tmp_path):
    p = make_good_image(tmp_path / "one.png")
    with pytest.raises(DatasetError, match="csv"):
        index_dataset(p)


# ----------------------------------------------------------------------------- stratified split


def labels_for(counts: list[int]) -> np.ndarray:
    return np.concatenate([np.full(n, c) for c, n in enumerate(counts)])


def test_stratified_split_keeps_every_class_in_both_parts():
    labels = labels_for([10, 3, 2, 25])
    names = ["a", "b", "c", "d"]
    tr, va = stratified_split(labels, 0.2, seed=0, class_names=names)
    assert len(np.intersect1d(tr, va)) == 0
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(labels)))
    for c in range(4):
        assert (labels[tr] == c).sum() >= 1 and (labels[va] == c).sum() >= 1
    # round(n * fraction) per class, at least 1, at most n - 1.
    assert [(labels[va] == c).sum() for c in range(4)] == [2, 1, 1, 5]
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)  # sorted


def test_stratified_split_is_seeded():
    labels = labels_for([30, 30, 30])
    names = ["a", "b", "c"]
    a = stratified_split(labels, 0.3, seed=7, class_names=names)
    b = stratified_split(labels, 0.3, seed=7, class_names=names)
    c = stratified_split(labels, 0.3, seed=8, class_names=names)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert len(a[1]) == len(c[1]) == 27


def test_stratified_split_zero_fraction_keeps_everything_for_training():
    tr, va = stratified_split(labels_for([3, 3]), 0.0, seed=0, class_names=["a", "b"])
    assert tr.tolist() == list(range(6)) and len(va) == 0


def test_stratified_split_class_with_one_image_is_named():
    with pytest.raises(DatasetError, match="'lonely'"):
        stratified_split(labels_for([5, 1, 5]), 0.2, seed=0, class_names=["many", "lonely", "more"])


def test_class_with_one_usable_image_after_decoding(tmp_path):
    """A class whose other files are broken is left with 1 image: the split names it."""
    root = make_class_folders(tmp_path / "d", classes=("good", "sparse"), per_class=4, size=16)
    for p in sorted((root / "sparse").iterdir())[1:]:
        p.write_bytes(b"not an image")
    index = index_dataset(root)
    decoded, labels = load_split(index.splits["all"], SPEC, None, 1, 10**8, False, "decode")
    assert len(decoded.failures) == 3
    with pytest.raises(DatasetError, match="sparse"):
        stratified_split(labels, 0.25, seed=0, class_names=index.class_names)


# ----------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    expect = make_bad_files(root)
    paths = [str(root / name) for name in sorted(expect)]
    return root, expect, paths


def test_decode_reports_bad_files_and_keeps_good_ones_in_order(corpus):
    root, expect, paths = corpus
    paths = paths + [str(root / "missing.png")]
    dec = decode_images(paths, SPEC, progress=False)
    bad = {pathlib.Path(p).name: why for p, why in dec.failures}
    assert set(bad) == {n for n, e in expect.items() if e == "error"} | {"missing.png"}
    for path, why in dec.failures:
        assert pathlib.Path(path).is_absolute() and isinstance(why, str) and why
    assert "not found" in bad["missing.png"] or "cannot read" in bad["missing.png"]
    assert "empty" in bad["empty.jpg"]
    good = [p for p in paths if expect.get(pathlib.Path(p).name) == "ok"]
    assert dec.paths == good
    assert [paths[i] for i in dec.keep] == good
    assert dec.images.shape == (len(good), SPEC.cache_size, SPEC.cache_size, 3)
    assert dec.images.dtype == np.uint8
    assert len(dec.hashes) == len(good) and all(len(h) == 40 for h in dec.hashes)


def test_decoded_pixels_match_the_resized_image(tmp_path):
    p = make_good_image(tmp_path / "red.png", size=(40, 20), color=(200, 30, 30))
    q = make_good_image(tmp_path / "blue.png", size=(20, 20), color=(10, 20, 230))
    dec = decode_images([str(p), str(q)], SPEC, progress=False)
    assert dec.images.shape == (2, 16, 16, 3)
    assert np.all(dec.images[0] == (200, 30, 30)) and np.all(dec.images[1] == (10, 20, 230))


def test_decode_cache_is_reused_and_keyed_by_spec(tmp_path, corpus, monkeypatch):
    _, _, paths = corpus
    cache = tmp_path / "cache"
    first = decode_images(paths, SPEC, cache_dir=cache, progress=False)
    first_images = np.array(first.images)
    assert len(list(cache.glob("*.npy"))) == 1 and len(list(cache.glob("*.json"))) == 1

    def boom(args):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(decode_mod, "_decode_one", boom)
    second = decode_images(paths, SPEC, cache_dir=cache, progress=False)
    assert np.array_equal(np.asarray(second.images), first_images)
    assert second.paths == first.paths and second.hashes == first.hashes
    assert np.array_equal(second.keep, first.keep)
    assert sorted(second.failures) == sorted(first.failures)

    monkeypatch.undo()
    other = SPEC.replace(img_size=8, crop_pct=1.0)
    third = decode_images(paths, other, cache_dir=cache, progress=False)
    assert third.images.shape == (len(first.paths), 8, 8, 3)
    assert len(list(cache.glob("*.npy"))) == 2
    assert not list(cache.glob("*.tmp*"))  # temp files renamed away


def test_decode_cache_notices_a_changed_file(tmp_path):
    p = make_good_image(tmp_path / "x.png", size=(16, 16), color=(255, 0, 0))
    cache = tmp_path / "cache"
    a = decode_images([str(p)], SPEC, cache_dir=cache, progress=False)
    assert tuple(a.images[0, 0, 0]) == (255, 0, 0)
    Image.new("RGB", (17, 16), (0, 255, 0)).save(p)  # new size: new stat, new key
    b = decode_images([str(p)], SPEC, cache_dir=cache, progress=False)
    assert tuple(b.images[0, 0, 0]) == (0, 255, 0)


def test_decode_with_worker_processes_matches_one_process(tmp_path):
    root = make_class_folders(tmp_path / "d", classes=2, per_class=65, size=16, ext="mixed")
    (root / "class0" / "broken.png").write_bytes(b"\x89PNG garbage")
    paths = [p for p, _ in index_dataset(root).splits["all"]]
    assert len(paths) == 131  # >= 128 files: two processes
    one = decode_images(paths, SPEC, workers=1, progress=False)
    two = decode_images(paths, SPEC, workers=2, progress=False)
    assert np.array_equal(one.images, two.images)
    assert one.paths == two.paths and one.hashes == two.hashes
    assert [pathlib.Path(p).name for p, _ in two.failures] == ["broken.png"]


def test_load_split_labels_follow_the_kept_files(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=3, size=16)
    shutil.copy(__file__, root / "square" / "fake.png")  # a .png that is Python source
    index = index_dataset(root)
    dec, labels = load_split(index.splits["all"], SPEC, None, 1, 10**8, False, "decode")
    assert len(labels) == len(dec.paths) == 9
    assert labels.dtype == np.int64
    for p, y in zip(dec.paths, labels):
        assert pathlib.Path(p).parent.name == index.class_names[y]


def test_dataset_fingerprint_tracks_content(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=3, size=16)

    def fingerprint() -> str:
        index = index_dataset(root)
        dec, labels = load_split(index.splits["all"], SPEC, None, 1, 10**8, False, "decode")
        return dataset_fingerprint(dec.paths, labels.tolist(), dec.hashes, index.class_names, root)

    a, b = fingerprint(), fingerprint()
    assert a == b and len(a) == 64
    target = root / "circle" / "001.png"
    Image.new("RGB", (24, 24), (1, 2, 3)).save(target)
    c = fingerprint()
    assert c != a
    # Same files under another root path: the fingerprint uses relative paths.
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    index = index_dataset(moved)
    dec, labels = load_split(index.splits["all"], SPEC, None, 1, 10**8, False, "decode")
    assert dataset_fingerprint(dec.paths, labels.tolist(), dec.hashes, index.class_names, moved) == c


# ----------------------------------------------------------------------------- links and special files


def test_symlink_loop_lists_each_file_once(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=4, size=16)
    (root / "circle" / "loop").symlink_to(".")  # `ln -s . data/circle/loop`
    (root / "square" / "up").symlink_to("..")  # a link to an ancestor: the whole dataset again
    index = index_dataset(root)
    paths = [p for p, _ in index.splits["all"]]
    assert len(paths) == 12 and len(set(paths)) == 12
    assert index.ignored["repeated folders (links)"] >= 1
    # The split then cannot put one image in both parts.
    labels = np.array([y for _, y in index.splits["all"]])
    train, val = stratified_split(labels, 0.25, 0, index.class_names)
    assert not {paths[i] for i in train} & {paths[i] for i in val}


def test_second_link_to_a_file_in_its_class_is_skipped(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=3, size=16)
    (root / "circle" / "again.png").symlink_to(root / "circle" / "000.png")
    os.link(root / "square" / "000.png", root / "square" / "hard.png")  # a hard link is the same file too
    index = index_dataset(root)
    assert len(index.splits["all"]) == 9
    assert index.ignored["duplicate links to one file"] == 2


def test_folder_link_to_another_place_is_followed(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=2, size=16)
    extra = make_class_folders(tmp_path / "elsewhere", classes=("circle",), per_class=3, size=16)
    (root / "circle" / "more").symlink_to(extra / "circle")
    index = index_dataset(root)
    assert len(index.splits["all"]) == 9  # 2 + 3 circles, 2 squares, 2 triangles


def test_link_into_another_class_is_an_error(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=2, size=16)
    (root / "square" / "x.png").symlink_to(root / "circle" / "000.png")
    with pytest.raises(DatasetError, match=r"x\.png is the same file as .*000\.png .*classes 'circle' and 'square'"):
        index_dataset(root)


def test_link_across_splits_is_an_error(tmp_path):
    root = make_split_folders(tmp_path / "d", per_split={"train": 2, "val": 2}, size=16)
    (root / "val" / "circle" / "leak.png").symlink_to(root / "train" / "circle" / "000.png")
    with pytest.raises(DatasetError, match=r"leak\.png .*splits 'train' and 'val'"):
        index_dataset(root)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifos_devices_and_broken_links_are_not_listed(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=2, size=16)
    os.mkfifo(root / "circle" / "p.png")
    (root / "circle" / "gone.png").symlink_to(root / "nowhere.png")
    if os.path.exists("/dev/zero"):
        (root / "square" / "zero.png").symlink_to("/dev/zero")
    index = index_dataset(root)
    assert len(index.splits["all"]) == 6
    assert all(os.path.isfile(p) for p, _ in index.splits["all"])
    assert index.ignored["special files (not regular files)"] == (2 if os.path.exists("/dev/zero") else 1)
    assert index.ignored["broken links"] == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_decoder_refuses_a_fifo_without_blocking(tmp_path):
    import threading

    good = make_good_image(tmp_path / "good.png")
    fifo = tmp_path / "p.png"
    os.mkfifo(fifo)
    box = []
    t = threading.Thread(target=lambda: box.append(decode_images([str(good), str(fifo)], SPEC, progress=False)), daemon=True)
    t.start()
    t.join(10)
    if not box:  # release the reader (only reached when the check is broken)
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert box, "decode_images blocked on a FIFO"
    dec = box[0]
    assert dec.paths == [str(good)]
    assert dec.failures == [(str(fifo), "not a regular file (a named pipe (FIFO))")]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_the_dataset_is_an_error(tmp_path):
    os.mkfifo(tmp_path / "data.csv")
    with pytest.raises(DatasetError, match="not a folder or a regular .csv file"):
        index_dataset(tmp_path / "data.csv")


# ----------------------------------------------------------------------------- manifest paths and rows


def manifest(folder: pathlib.Path, text: str, name: str = "m.csv") -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8")
    return folder / name


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "link_out"])
def test_manifest_paths_outside_its_folder_are_refused(tmp_path, kind):
    outside = make_good_image((tmp_path / "outside").mkdir() or tmp_path / "outside" / "x.png")
    root = tmp_path / "d"
    (root / "img").mkdir(parents=True)
    make_good_image(root / "img" / "a.png")
    make_good_image(root / "img" / "b.png")
    if kind == "link_out":
        (root / "img" / "x.png").symlink_to(outside)
    ref = {"dotdot": "../outside/x.png", "absolute": str(outside), "link_out": "img/x.png"}[kind]
    csv_path = manifest(root, f"path,label\nimg/a.png,cat\nimg/b.png,dog\n{ref},dog\n")
    with pytest.raises(DatasetError) as e:
        index_dataset(csv_path)
    msg = str(e.value)
    assert "m.csv" in msg and "line 4" in msg and "outside the manifest's folder" in msg and "--allow-outside-root" in msg
    index = index_dataset(csv_path, allow_outside_root=True)
    assert len(index.splits["all"]) == 3


def test_manifest_absolute_path_inside_its_folder_is_fine(tmp_path):
    root = tmp_path / "d"
    make_good_image((root / "img").mkdir(parents=True) or root / "img" / "a.png")
    make_good_image(root / "img" / "b.png")
    csv_path = manifest(root, f"path,label\n{root / 'img' / 'a.png'},cat\nimg/../img/b.png,dog\n")
    assert len(index_dataset(csv_path).splits["all"]) == 2


@pytest.mark.parametrize(
    "rows, match",
    [
        ("a.png,cat\nb.png,dog\na.png,cat\n", r"line 4 repeats line 2 \(a\.png\)"),
        ("a.png,cat\nb.png,dog\n./a.png,dog\n", r"line 4 gives \./a\.png the label 'dog', line 2 gave it 'cat'"),
        ("a.png,cat\nb.png,dog\nsub/../a.png,cat\n", r"line 4 repeats line 2"),
        ("a.png,cat\nlink.png,cat\nb.png,dog\n", r"line 3 repeats line 2 \(link\.png\)"),
    ],
)
def test_manifest_duplicate_and_conflicting_rows_are_refused(tmp_path, rows, match):
    for name in ("a.png", "b.png"):
        make_good_image(tmp_path / name)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    csv_path = manifest(tmp_path, "path,label\n" + rows)
    with pytest.raises(DatasetError, match=r"m\.csv: each file may be listed once: " + match):
        index_dataset(csv_path)


def test_manifest_file_in_two_splits_is_refused(tmp_path):
    make_good_image(tmp_path / "a.png")
    make_good_image(tmp_path / "b.png")
    csv_path = manifest(tmp_path, "path,label,split\na.png,cat,train\nb.png,cat,train\na.png,cat,val\n")
    with pytest.raises(DatasetError, match=r"line 4 puts a\.png in split 'val', line 2 put it in 'train'"):
        index_dataset(csv_path)


def test_manifest_line_numbers_count_blank_lines(tmp_path):
    csv_path = manifest(tmp_path, "path,label\na.png,cat\n\n\nb.png,\n")
    with pytest.raises(DatasetError, match=r"m\.csv:5: empty path or label"):
        index_dataset(csv_path)


def test_manifest_that_is_not_utf8_names_the_file_and_line(tmp_path):
    csv_path = tmp_path / "latin1.csv"
    csv_path.write_bytes("path,label\na.png,cat\nb.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1\.csv:3: the manifest is not UTF-8 text .*save it as UTF-8"):
        index_dataset(csv_path)


def test_manifest_with_a_nul_byte_names_the_file(tmp_path):
    csv_path = tmp_path / "nul.csv"
    csv_path.write_bytes(b"path,label\na.png,cat\nb\x00.png,dog\n")
    with pytest.raises(DatasetError, match=r"nul\.csv:3: the path contains a NUL byte"):
        index_dataset(csv_path)


def test_manifest_row_the_csv_reader_refuses_names_the_file(tmp_path):
    csv_path = tmp_path / "long.csv"
    csv_path.write_text("path,label\na.png,cat\n" + "x" * 200_000 + ".png,dog\n")  # over csv's field size limit
    with pytest.raises(DatasetError, match=r"long\.csv:\d+: not a readable CSV row \(field larger than field limit"):
        index_dataset(csv_path)


def test_allow_outside_root_reaches_the_config_from_the_cli():
    from imgcls.cli import build_parser
    from imgcls.cli.commands import _run_config

    args = ["train", "data.csv", "--out", "run"]
    assert _run_config(build_parser().parse_args(args)).data.allow_outside_root is False
    assert _run_config(build_parser().parse_args(args + ["--allow-outside-root"])).data.allow_outside_root is True
    assert build_parser().parse_args(["evaluate", "run", "data.csv", "--allow-outside-root"]).allow_outside_root is True


# ----------------------------------------------------------------------------- data larger than memory


def test_decode_spills_to_a_deleted_file_with_the_same_pixels(tmp_path, corpus):
    """spill_dir: the images live in a memory-mapped file that is already deleted (nothing left
    behind), and they equal the in-memory decode, bad files compacted out in place."""
    _, _, paths = corpus
    ram = decode_images(paths, SPEC, progress=False)
    spill = tmp_path / "run"
    disk = decode_images(paths, SPEC, progress=False, spill_dir=spill)
    assert isinstance(disk.images.base, np.memmap) or isinstance(disk.images, np.memmap)
    assert list(spill.iterdir()) == [] or os.name == "nt"
    assert disk.paths == ram.paths and disk.failures == ram.failures and disk.hashes == ram.hashes
    np.testing.assert_array_equal(disk.images, ram.images)


def test_needs_spill_compares_with_half_the_available_memory():
    assert decode_mod.needs_spill(6 * 2**30, available=10 * 2**30)
    assert not decode_mod.needs_spill(4 * 2**30, available=10 * 2**30)
    assert not decode_mod.needs_spill(10**15, available=None) or decode_mod.available_memory() is not None
    assert decode_mod.decoded_bytes(10, SPEC) == 10 * SPEC.cache_size**2 * 3


def test_train_splits_the_file_list_before_decoding_and_spills_when_memory_is_short(tmp_path, monkeypatch):
    """Validation is split off the file list (the pool is never decoded whole and copied), and a
    split too large for memory is decoded into a temporary file in the run folder, said in the log."""
    from imgcls.config import DataConfig, RunConfig
    from imgcls.training import prepare

    root = make_class_folders(tmp_path / "d", per_class=10, size=16)
    (root / "circle" / "broken.png").write_bytes(b"not an image")
    sizes = []
    real = prepare.load_split

    def spy(samples, *args, **kwargs):
        sizes.append(len(samples))
        return real(samples, *args, **kwargs)

    monkeypatch.setattr(prepare, "load_split", spy)
    monkeypatch.setattr(prepare, "needs_spill", lambda nbytes: True)
    cfg = RunConfig(data=DataConfig(path=str(root), val_fraction=0.2, workers=1))
    index = index_dataset(root)
    lines: list[str] = []
    splits, failures, info = prepare.decode_splits(cfg, index, SPEC, False, lines.append, spill_dir=tmp_path / "run")
    assert sorted(sizes) == [6, 25]  # 31 files (one broken) split 25 / 6, each decoded once
    assert info["method"] == "stratified" and info["counts"] == {"train": len(splits["train"].paths), "val": len(splits["val"].paths)}
    assert len(failures) == 1 and len(splits["train"].paths) + len(splits["val"].paths) == 30
    assert sum("temporary file" in line for line in lines) == 2
    assert set(map(str, splits["train"].paths)).isdisjoint(map(str, splits["val"].paths))
