"""Fuzzed inputs (issue 16): the image decoder, the CSV manifest reader and the model folder loader
under random and mutated input. Every case must end in a correct result or in imgcls's own error
(ImageDecodeError, DatasetError, ArtifactError) that names the file: no other exception, no
near-hang (each example has a deadline), no memory blow-up (peak RSS is checked where a header
claims a huge image; a model.json asking for a huge model loads under an address-space limit).

The number of examples is bounded (settings below) so the module runs in seconds; the module prints
how many cases ran. bench/fuzz_decode.py runs the decoder fuzzing at scale in a worker process.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import resource
import shutil
import struct
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fuzzing import FORMATS, CaseCount, claim_size, claimed_sizes, encode_image, mutated_images, report
from imgcls.artifact import META_FILE, WEIGHTS_FILE, ArtifactError, load_artifact, save_artifact
from imgcls.data import DatasetError, index_dataset
from imgcls.decode import decode_images
from imgcls.io import DECODE_ERROR_KINDS, ImageDecodeError, load_image, read_header
from imgcls.models import create_model
from imgcls.transforms import PreprocessSpec

# 5 s per example: far over what any case takes (milliseconds), so only a pathological case trips
# it, even on a loaded 2-core machine. A deadline cannot stop a true hang, which would block the
# test; bench/fuzz_decode.py runs each case in a worker process with a timeout.
_FUZZ = settings(deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz(examples: int) -> settings:
    return settings(_FUZZ, max_examples=examples)


RSS_GROWTH_LIMIT_MB = 400  # a header-claimed 100000 x 100000 image decoded for real would take 30 GB

COUNT = CaseCount()
# Mutated files make Pillow warn (odd TIFF tags, sizes over its own bomb threshold); the outcome is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL", "ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    report(request, COUNT.summary("test_fuzz_inputs"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- the image decoder


def decode_or_error(source, name: str, **limits) -> Image.Image | ImageDecodeError:
    """load_image's result, or its ImageDecodeError (checked to name the file); anything else fails the test."""
    try:
        img = load_image(source, name=name, **limits)
    except ImageDecodeError as e:
        assert e.kind in DECODE_ERROR_KINDS and e.path == name and str(e).startswith(name), repr(e)
        return e
    assert img.mode == "RGB" and img.size[0] >= 1 and img.size[1] >= 1
    return img


@fuzz(200)
@given(data=st.binary(max_size=2048))
def test_random_bytes_decode_or_give_a_decode_error(data):
    COUNT.add("decoder: random bytes")
    decode_or_error(data, "random.bin")


@fuzz(400)
@given(case=mutated_images())
def test_mutated_images_decode_or_give_a_decode_error(case, tmp_path_factory):
    fmt, kind, data = case
    COUNT.add("decoder: mutated images")
    out = decode_or_error(data, f"{fmt}-{kind}")
    if kind == "none":  # the untouched image decodes
        assert isinstance(out, Image.Image), out
    # The same bytes from a file give the same outcome (the path route opens and stats first).
    folder = tmp_path_factory.mktemp("mutated", numbered=True)
    path = folder / "case.img"
    path.write_bytes(data)
    from_file = decode_or_error(str(path), str(path))
    assert type(from_file) is type(out)
    if isinstance(out, Image.Image):
        assert from_file.tobytes() == out.tobytes()
    shutil.rmtree(folder)


@fuzz(200)
@given(case=claimed_sizes(), max_pixels=st.sampled_from([100_000_000, 1_000_000]))
def test_header_claimed_sizes_are_refused_from_the_header(case, max_pixels):
    fmt, w, h, data = case
    COUNT.add("decoder: header-claimed sizes")
    rss0 = peak_rss_mb()
    out = decode_or_error(data, f"{fmt}-{w}x{h}", max_pixels=max_pixels, max_bytes=64 * 2**20)
    if w * h > max_pixels:
        assert isinstance(out, ImageDecodeError) and out.kind == "too_large", out  # from the header, before any pixel
    assert peak_rss_mb() - rss0 < RSS_GROWTH_LIMIT_MB


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_huge_header_is_a_too_large_error_in_every_format(fmt):
    """100000 x 100000 (16384 x 16384 for WebP, 65535 x 65535 for 16-bit sides): refused, never decoded."""
    side = {"WEBP": 16384, "JPEG": 65535, "GIF": 65535}.get(fmt, 100_000)
    data = claim_size(encode_image(fmt, 9, 7, seed=0), fmt, side, side)  # lossless WebP: VP8L
    for call in (load_image, read_header):
        with pytest.raises(ImageDecodeError) as info:
            call(data, name="bomb")
        assert info.value.kind == "too_large" and "decompression bomb" in str(info.value), info.value


@fuzz(30)
@given(cases=st.lists(mutated_images(), min_size=1, max_size=5))
def test_decode_images_keeps_what_decodes_and_names_every_failure(cases, tmp_path_factory):
    """decode.decode_images over a folder of mutated files: each file is decoded or listed with a reason."""
    COUNT.add("decoder: decode_images folders")
    folder = tmp_path_factory.mktemp("decode", numbered=True)
    paths = []
    for i, (_, _, data) in enumerate(cases):
        (folder / f"{i}.png").write_bytes(data)
        paths.append(str(folder / f"{i}.png"))
    expected_ok = [isinstance(decode_or_error(p, p), Image.Image) for p in paths]
    spec = PreprocessSpec(img_size=16)
    out = decode_images(paths, spec, workers=1, progress=False)
    assert out.paths == [p for p, ok in zip(paths, expected_ok) if ok]
    assert out.images.shape == (sum(expected_ok), spec.cache_size, spec.cache_size, 3)
    assert sorted(p for p, _ in out.failures) == sorted(p for p, ok in zip(paths, expected_ok) if not ok)
    assert all(reason for _, reason in out.failures)
    shutil.rmtree(folder)


def test_every_one_and_two_byte_file_is_a_decode_error():
    """Found by the fuzzing above: a 1-byte file made a plugin's signature check raise struct.error."""
    for data in [bytes([a]) for a in range(256)] + [bytes([a, b]) for a in range(0, 256, 5) for b in range(256)]:
        with pytest.raises(ImageDecodeError):
            load_image(data, name="tiny")


# ----------------------------------------------------------------------------- the CSV manifest reader

INSIDE = ["imgs/a.png", "imgs/b.png", "imgs/c.jpg", 'imgs/ünï cödé, "q".png', "imgs/日本.png"]
ALIASES = {"./imgs/a.png": "imgs/a.png", "imgs/x/../b.png": "imgs/b.png", "link_in.png": "imgs/a.png"}  # the same files again
# Rows that lead outside the manifest's folder: `..`, an absolute path, a link to a file, a link to a folder.
ESCAPES = ["../outside/secret.png", "imgs/../../outside/secret.png", "link_out.png", "linkdir/secret.png", "<abs>"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """root/ with images (also unicode, comma and quote names) and links; outside/secret.png beside it."""
    base = tmp_path_factory.mktemp("manifest")
    (base / "outside").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(base / "outside" / "secret.png")
    root = base / "root"
    (root / "imgs" / "x").mkdir(parents=True)
    for i, rel in enumerate(INSIDE):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(root / rel)
    (root / "link_in.png").symlink_to(root / "imgs" / "a.png")
    (root / "link_out.png").symlink_to(base / "outside" / "secret.png")
    (root / "linkdir").symlink_to(base / "outside", target_is_directory=True)
    return root


def resolve_row(root: Path, path: str) -> str:
    return str(root.parent / "outside" / "secret.png") if path == "<abs>" else path


def write_manifest(root: Path, header: list[str], rows: list[list[str]], quoting: int = csv.QUOTE_MINIMAL) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, quoting=quoting, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    path = root / "manifest.csv"
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def index_or_error(csv_path: Path, **kw):
    """index_dataset's result or its DatasetError (checked to name the manifest); nothing else."""
    try:
        index = index_dataset(csv_path, **kw)
    except DatasetError as e:
        assert str(e).startswith(str(csv_path)), e
        return e
    real_root = os.path.realpath(csv_path.parent)
    if not kw.get("allow_outside_root"):
        for samples in index.splits.values():
            for p, _ in samples:  # the invariant that matters: nothing outside the folder is ever listed
                assert os.path.commonpath([real_root, os.path.realpath(p)]) == real_root, p
    return index


LABELS = st.one_of(st.sampled_from(["cat", "dog", "ünï", "a,b", 'q"uote', "x;y", "", "  "]), st.text(max_size=8))
PATHS = st.sampled_from([*INSIDE, *ALIASES, *ESCAPES, "", "missing.png", "notes.txt", ".hidden.png", "/"])
HEADERS = st.sampled_from([["path", "label"], [" Path ", "LABEL"], ["filename", "class"], ["path", "label", "split"], ["path"], ["label"]])


@fuzz(100)
@given(
    header=HEADERS,
    rows=st.lists(st.tuples(PATHS, LABELS, st.sampled_from(["", "train", "val", "bogus"])), max_size=8),
    quote_all=st.booleans(),
)
def test_manifest_rows_are_read_or_refused_with_the_file_and_line(dataset, header, rows, quote_all):
    COUNT.add("manifest: structured rows")
    has_split = "split" in header
    table = [[resolve_row(dataset, p), lab, sp][: len(header)] for p, lab, sp in rows]
    csv_path = write_manifest(dataset, header, table, csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL)
    out = index_or_error(csv_path)
    used = [r for r in rows if r[0] in (*INSIDE, *ALIASES, *ESCAPES, "missing.png")]  # image rows that index_dataset keeps
    files = [ALIASES.get(p, "secret" if p in ESCAPES else p) for p, *_ in rows]  # the same name: the same file
    splits = {sp for *_, sp in rows} if has_split else {""}
    # Every problem the rows have, as the words of its error; the first one met is reported.
    problems = {
        "a header with columns": header in (["path"], ["label"]),
        "empty path or label": any(not p.strip() or not lab.strip() for p, lab, _ in rows),
        "contains a NUL byte": any("\0" in lab for _, lab, _ in rows),
        "is not one of train": "bogus" in splits,
        "no split while others do": "" in splits and len(splits) > 1,
        "outside the manifest's folder": any(p in ESCAPES for p, *_ in used),
        "listed once": len(set(files)) < len(files),
        "no image files found": not used,
        "no class folders found": not rows,  # a header only: no labels, so no classes
    }
    if any(problems.values()):
        assert isinstance(out, DatasetError), out
        assert any(words in str(out) for words, found in problems.items() if found), (out, problems)
    else:
        assert not isinstance(out, DatasetError), out
        listed = {(os.path.realpath(p), out.class_names[y]) for samples in out.splits.values() for p, y in samples}
        expected = {(os.path.realpath(dataset / ALIASES.get(p, p)), lab.strip()) for p, lab, _ in used}
        assert listed == expected


@fuzz(60)
@given(
    good=st.lists(st.sampled_from(INSIDE), min_size=1, max_size=4, unique=True),
    escape=st.sampled_from(ESCAPES),
    at=st.integers(0, 4),
    multilabel=st.booleans(),
)
def test_a_path_outside_the_folder_is_refused_naming_its_line(dataset, good, escape, at, multilabel):
    """../x.png, an absolute path, a link to a file or folder outside: refused, the line named; allowed only when asked."""
    COUNT.add("manifest: escaping paths")
    at = min(at, len(good))
    paths = [*good[:at], resolve_row(dataset, escape), *good[at:]]
    header = ["path", "labels"] if multilabel else ["path", "label"]
    csv_path = write_manifest(dataset, header, [[p, "cat;dog" if multilabel else "cat"] for p in paths])
    task = "multi-label" if multilabel else "single-label"
    out = index_or_error(csv_path, task=task)
    assert isinstance(out, DatasetError), out
    assert "outside the manifest's folder" in str(out) and f"line {at + 2}: {paths[at]}" in str(out), out
    allowed = index_or_error(csv_path, task=task, allow_outside_root=True)
    assert sorted(os.path.realpath(p) for p, _ in allowed.splits["all"]) == sorted(
        os.path.realpath(p if os.path.isabs(p) else dataset / p) for p in paths
    )


@fuzz(120)
@given(
    text=st.one_of(st.text(max_size=300), st.builds(lambda t: "path,label\n" + t, st.text(max_size=300))),
    raw=st.binary(max_size=64),
    task=st.sampled_from(["single-label", "multi-label", "auto"]),
)
def test_random_manifest_text_is_read_or_refused_naming_the_file(dataset, text, raw, task):
    COUNT.add("manifest: random text")
    csv_path = dataset / "manifest.csv"
    csv_path.write_bytes(text.encode("utf-8", "surrogatepass") + (raw if len(raw) % 3 == 0 else b""))
    index_or_error(csv_path, task=task)


# ----------------------------------------------------------------------------- the model folder loader

CLASSES = ["cat", "dog", "owl"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A narrow small_cnn (model_kwargs travel in model.json), so that each load takes milliseconds."""
    torch.manual_seed(0)
    kwargs = {"widths": [8, 8, 8]}
    meta = {"arch": "small_cnn", "class_names": CLASSES, "preprocess": PreprocessSpec(img_size=16).to_dict(), "model_kwargs": kwargs}
    return save_artifact(tmp_path_factory.mktemp("model") / "run", create_model("small_cnn", num_classes=3, **kwargs), meta)


def copy_of(model_dir: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-model-"))
    shutil.copytree(model_dir, folder / "run")
    return folder / "run"


def load_or_error(folder: Path):
    """load_artifact's (model, meta) or its ArtifactError (naming a file of the folder, one line); nothing else.
    Nothing may be unpickled on the way: pickle's and torch's loaders fail the test if called."""
    refuse = mock.Mock(side_effect=AssertionError("the loader unpickled something"))
    with mock.patch("pickle.load", refuse), mock.patch("pickle.loads", refuse), mock.patch("torch.load", refuse):
        try:
            return load_artifact(folder)
        except ArtifactError as e:
            assert str(folder) in str(e) and "\n" not in str(e), e
            return e


@st.composite
def json_edits(draw, meta: dict):
    """`meta` with 1-3 random edits: a value replaced, a key deleted or added, anywhere in the tree."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON_VALUES)  # not an object at all
    meta = json.loads(json.dumps(meta))
    for _ in range(draw(st.integers(1, 3))):
        node, key = meta, None  # walk down to a random slot (node[key]); key None: add to node
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            key = draw(st.sampled_from(keys)) if keys and draw(st.integers(0, 4)) else None
            if key is not None and isinstance(node[key], (dict, list)) and draw(st.booleans()):
                node = node[key]
                continue
            break
        action = "add" if key is None else draw(st.sampled_from(["replace", "delete"]))
        if action == "replace":
            node[key] = draw(JSON_VALUES)
        elif action == "delete":
            del node[key]
        elif isinstance(node, dict):
            node[draw(st.text(max_size=8))] = draw(JSON_VALUES)
        else:
            node.insert(draw(st.integers(0, len(node))), draw(JSON_VALUES))
    return meta


@fuzz(60)
@given(data=st.data())
def test_an_edited_model_json_loads_or_gives_an_artifact_error(model_dir, data):
    COUNT.add("artifact: edited model.json")
    meta = json.loads((model_dir / META_FILE).read_text())
    edited = data.draw(json_edits(meta))
    folder = copy_of(model_dir)
    try:
        (folder / META_FILE).write_text(json.dumps(edited, allow_nan=True))
        out = load_or_error(folder)
        if not isinstance(out, ArtifactError):  # accepted: the edit left what loading needs intact
            model, loaded = out
            assert loaded["class_names"] == CLASSES and model(torch.zeros(1, 3, 16, 16)).shape == (1, 3)
    finally:
        shutil.rmtree(folder.parent)


SHAPES = st.lists(st.integers(0, 5), max_size=4).map(tuple)
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool])


@fuzz(50)
@given(data=st.data())
def test_edited_weights_load_or_give_an_artifact_error(model_dir, data):
    """Tensors reshaped, retyped, dropped, added; the safetensors bytes truncated or bit-flipped."""
    from safetensors.torch import load_file, save_file

    COUNT.add("artifact: edited weights")
    folder = copy_of(model_dir)
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
        names = sorted(state)
        edit = data.draw(st.sampled_from(["shape", "dtype", "drop", "add", "bytes"]))
        if edit == "bytes":
            raw = (folder / WEIGHTS_FILE).read_bytes()
            cut = data.draw(st.integers(0, len(raw)))
            flips = data.draw(st.lists(st.tuples(st.integers(0, min(cut, 600) - 1), st.integers(0, 7)), max_size=8)) if cut else []
            b = bytearray(raw[:cut])
            for i, bit in flips:  # in the JSON header mostly: names, shapes, offsets
                b[i] ^= 1 << bit
            (folder / WEIGHTS_FILE).write_bytes(bytes(b))
        else:
            name = data.draw(st.sampled_from(names))
            if edit == "shape":
                state[name] = torch.zeros(data.draw(SHAPES))
            elif edit == "dtype":
                state[name] = state[name].to(data.draw(DTYPES))
            elif edit == "drop":
                del state[name]
            else:
                state[data.draw(st.text(min_size=1, max_size=12))] = torch.zeros(data.draw(SHAPES))
            save_file(state, str(folder / WEIGHTS_FILE))
        out = load_or_error(folder)
        if edit in ("shape", "drop", "add") and not isinstance(out, ArtifactError):
            assert edit == "shape" or (edit == "add" and set(state) == set(names)), edit  # only an unchanged layout loads
    finally:
        shutil.rmtree(folder.parent)


class WritesMarker:
    """Unpickling this creates the file `path`: proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@fuzz(30)
@given(
    protocol=st.integers(0, pickle.HIGHEST_PROTOCOL), prefix=st.sampled_from([b"", b"\x00" * 8, struct.pack("<Q", 40)]), via=st.booleans()
)
def test_a_pickle_in_place_of_the_weights_is_refused_and_never_runs(model_dir, protocol, prefix, via):
    """Any pickle protocol (0-5), bare or behind bytes that look like a safetensors header, or torch.save's zip: refused."""
    COUNT.add("artifact: pickles")
    folder = copy_of(model_dir)
    marker = folder.parent / "unpickled"
    try:
        payload = {"fc.weight": WritesMarker(str(marker))}
        if via:  # torch.save writes a zip holding a pickle
            buf = io.BytesIO()
            torch.save(payload, buf, pickle_protocol=max(protocol, 2))
            blob = buf.getvalue()
        else:
            blob = prefix + pickle.dumps(payload, protocol=protocol)
        (folder / WEIGHTS_FILE).write_bytes(blob)
        out = load_or_error(folder)
        assert isinstance(out, ArtifactError) and WEIGHTS_FILE in str(out), out
        assert not marker.exists()
    finally:
        shutil.rmtree(folder.parent)


HUGE_MODEL_SCRIPT = """
import resource, sys
from imgcls.artifact import ArtifactError, load_artifact
# A safety net: were the model built for real, it would fail here instead of taking the machine's memory.
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + 2 * 2**30, resource.RLIM_INFINITY))
try:
    load_artifact(sys.argv[1])
except ArtifactError as e:
    print(e)
"""


def test_model_json_asking_for_a_huge_model_is_refused_before_it_is_built(model_dir):
    """model_kwargs for 58 GB of conv weights: refused from the weights' shapes, nothing allocated."""
    import subprocess
    import sys

    COUNT.add("artifact: huge layout")
    folder = copy_of(model_dir)
    try:
        meta = json.loads((folder / META_FILE).read_text())
        (folder / META_FILE).write_text(json.dumps({**meta, "model_kwargs": {"widths": [8, 8, 40_000]}}))
        r = subprocess.run([sys.executable, "-c", HUGE_MODEL_SCRIPT, str(folder)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "shape mismatches" in r.stdout and WEIGHTS_FILE in r.stdout and "cannot build" not in r.stdout, r.stdout
    finally:
        shutil.rmtree(folder.parent)
