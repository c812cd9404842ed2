"""Tampered model folders: every edit of model.json or model.safetensors gives one ArtifactError that
names the file, and `imgcls predict` a one-line error; the weights are never unpickled."""

from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from PIL import Image

from imgcls.artifact import META_FILE, WEIGHTS_FILE, ArtifactError, load_artifact, load_meta, save_artifact
from imgcls.cli import main
from imgcls.models import create_model
from imgcls.transforms import PreprocessSpec

CLASSES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    """An untrained small_cnn for 3 classes at 16 px, saved as `imgcls train` saves it."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=len(CLASSES))
    meta = {"arch": "small_cnn", "class_names": CLASSES, "preprocess": PreprocessSpec(img_size=16).to_dict(), "tta": "none"}
    return save_artifact(tmp_path_factory.mktemp("model") / "run", model, meta)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.new("RGB", (20, 20), (200, 30, 30)).save(path)
    return path


# ----------------------------------------------------------------------------- the tamperings


def edit_meta(change: Callable[[dict[str, Any]], None]) -> Callable[[pathlib.Path], None]:
    """A tampering that edits model.json's dict in place."""

    def apply(folder: pathlib.Path) -> None:
        meta = json.loads((folder / META_FILE).read_text())
        change(meta)
        (folder / META_FILE).write_text(json.dumps(meta))

    return apply


def replace_meta(value: Any) -> Callable[[pathlib.Path], None]:
    return lambda folder: (folder / META_FILE).write_text(json.dumps(value))


def drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda m: m.__delitem__(key)


def write_meta_bytes(data: bytes) -> Callable[[pathlib.Path], None]:
    return lambda folder: (folder / META_FILE).write_bytes(data)


def edit_weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[pathlib.Path], None]:
    def apply(folder: pathlib.Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / WEIGHTS_FILE))
        change(state)
        save_file(state, str(folder / WEIGHTS_FILE))

    return apply


def write_weights_bytes(make: Callable[[bytes], bytes]) -> Callable[[pathlib.Path], None]:
    def apply(folder: pathlib.Path) -> None:
        f = folder / WEIGHTS_FILE
        f.write_bytes(make(f.read_bytes()))

    return apply


def first_float(state: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)


def set_value(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m.__setitem__(key, value)


def set_preprocess(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["preprocess"].__setitem__(key, value)


def torch_save(_: bytes) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"fc.weight": torch.zeros(2, 2)}, buf)
    return buf.getvalue()


# (id, tampering, file the error must name, words the error must contain)
META_CASES = [
    ("no_arch", edit_meta(drop("arch")), META_FILE, "'arch' is missing"),
    ("no_class_names", edit_meta(drop("class_names")), META_FILE, "'class_names' is missing"),
    ("no_preprocess", edit_meta(drop("preprocess")), META_FILE, "'preprocess' is missing"),
    ("a_list", replace_meta([]), META_FILE, "expected a JSON object, found a list"),
    ("null", replace_meta(None), META_FILE, "expected a JSON object, found null"),
    ("a_string", replace_meta("model"), META_FILE, "found a string"),
    ("empty_object", replace_meta({}), META_FILE, "not an imgcls model description"),
    ("other_format", edit_meta(set_value("format", "keras")), META_FILE, "not an imgcls model description"),
    ("format_version_999", edit_meta(set_value("format_version", 999)), META_FILE, "newer imgcls"),
    ("format_version_string", edit_meta(set_value("format_version", "1")), META_FILE, 'must be a positive integer, found "1"'),
    ("no_format_version", edit_meta(drop("format_version")), META_FILE, "'format_version' is missing"),
    ("class_names_string", edit_meta(set_value("class_names", "cat,dog,owl")), META_FILE, "class_names must be a non-empty list"),
    ("class_names_dict", edit_meta(set_value("class_names", {"0": "cat", "1": "dog", "2": "owl"})), META_FILE, "found an object"),
    ("class_names_duplicates", edit_meta(set_value("class_names", ["cat", "dog", "cat"])), META_FILE, "'cat' more than once"),
    ("class_names_empty", edit_meta(set_value("class_names", [])), META_FILE, "found an empty list"),
    ("class_names_numbers", edit_meta(set_value("class_names", [1, 2, 3])), META_FILE, "non-empty strings, found 1"),
    ("class_name_blank", edit_meta(set_value("class_names", ["cat", " ", "owl"])), META_FILE, "non-empty strings"),
    ("num_classes_wrong", edit_meta(set_value("num_classes", 4)), META_FILE, "num_classes is 4 but class_names lists 3"),
    ("num_classes_string", edit_meta(set_value("num_classes", "3")), META_FILE, "num_classes must be a positive integer"),
    ("unknown_arch", edit_meta(set_value("arch", "no_such_net")), META_FILE, "no_such_net"),
    ("arch_number", edit_meta(set_value("arch", 42)), META_FILE, "arch must be a model name"),
    ("arch_version_string", edit_meta(set_value("arch_version", "two")), META_FILE, "arch_version must be a positive integer"),
    ("arch_version_other", edit_meta(set_value("arch_version", 99)), "run", "layout version 99"),
    ("preprocess_string", edit_meta(set_value("preprocess", "16px")), META_FILE, "preprocess must be an object"),
    ("preprocess_empty", edit_meta(set_value("preprocess", {})), META_FILE, "preprocess.img_size is missing"),
    ("img_size_negative", edit_meta(set_preprocess("img_size", -1)), META_FILE, "img_size"),
    ("img_size_float", edit_meta(set_preprocess("img_size", 16.5)), META_FILE, "img_size"),
    ("mean_nan", edit_meta(set_preprocess("mean", [math.nan, 0.5, 0.5])), META_FILE, "finite"),
    ("std_zero", edit_meta(set_preprocess("std", [0, 0, 0])), META_FILE, "std"),
    ("mean_number", edit_meta(set_preprocess("mean", 0.5)), META_FILE, "preprocess is not valid"),
    ("resize_mode_unknown", edit_meta(set_preprocess("resize_mode", "zoom")), META_FILE, "resize_mode"),
    ("tta_unknown", edit_meta(set_value("tta", "sideways")), META_FILE, "tta must be one of"),
    ("model_kwargs_list", edit_meta(set_value("model_kwargs", [])), META_FILE, "model_kwargs must be an object"),
    ("model_kwargs_unknown", edit_meta(set_value("model_kwargs", {"bogus": 1})), META_FILE, "cannot build small_cnn"),
    ("versions_string", edit_meta(set_value("versions", "1.0")), META_FILE, "versions must be an object"),
    ("config_data_string", edit_meta(set_value("config", {"data": "x"})), META_FILE, "config.data.max_pixels"),
    ("max_pixels_string", edit_meta(set_value("config", {"data": {"max_pixels": "all"}})), META_FILE, "config.data.max_pixels"),
    ("not_json", write_meta_bytes(b"{not json"), META_FILE, "not valid JSON"),
    ("empty_json", write_meta_bytes(b""), META_FILE, "not valid JSON"),
    ("not_utf8", write_meta_bytes('{"format": "imgcls-model", "arch": "caf\u00e9"}'.encode("latin-1")), META_FILE, "not UTF-8"),
    ("nested_deeply", write_meta_bytes(b"[" * 200_000 + b"]" * 200_000), META_FILE, "nested too deeply"),
]

WEIGHT_CASES = [
    ("truncated", write_weights_bytes(lambda b: b[: len(b) // 2]), WEIGHTS_FILE, "not a readable safetensors file"),
    ("empty", write_weights_bytes(lambda b: b""), WEIGHTS_FILE, "empty file (0 bytes)"),
    ("random", write_weights_bytes(lambda b: os.urandom(len(b))), WEIGHTS_FILE, "not a readable safetensors file"),
    ("header_only", write_weights_bytes(lambda b: b[:8]), WEIGHTS_FILE, "not a readable safetensors file"),
    ("pickle", write_weights_bytes(lambda b: pickle.dumps({"fc.weight": [[0.0]]})), WEIGHTS_FILE, "never unpickles"),
    ("torch_save", write_weights_bytes(torch_save), WEIGHTS_FILE, "never unpickles"),
    ("nan", edit_weights(lambda s: s[first_float(s)].view(-1).__setitem__(0, math.nan)), WEIGHTS_FILE, "NaN or infinite"),
    ("inf", edit_weights(lambda s: s[first_float(s)].view(-1).__setitem__(-1, math.inf)), WEIGHTS_FILE, "NaN or infinite"),
    ("ints", edit_weights(lambda s: s.__setitem__(first_float(s), s[first_float(s)].to(torch.int32))), WEIGHTS_FILE, "int32 values"),
    ("missing_tensor", edit_weights(lambda s: s.pop(first_float(s))), WEIGHTS_FILE, "missing keys"),
    ("extra_tensor", edit_weights(lambda s: s.__setitem__("backdoor.weight", torch.zeros(3))), WEIGHTS_FILE, "unexpected keys"),
    ("wrong_shape", edit_weights(lambda s: s.__setitem__(first_float(s), torch.zeros(2, 2))), WEIGHTS_FILE, "shape mismatches"),
    ("fewer_classes_in_json", edit_meta(set_value("class_names", ["cat", "dog"])), WEIGHTS_FILE, "lists 2 class names"),
    ("weights_a_folder", lambda f: ((f / WEIGHTS_FILE).unlink(), (f / WEIGHTS_FILE).mkdir()), WEIGHTS_FILE, "not a regular file"),
]
if hasattr(os, "mkfifo"):
    META_CASES.append(("meta_a_fifo", lambda f: ((f / META_FILE).unlink(), os.mkfifo(f / META_FILE)), META_FILE, "not a regular file"))
if os.path.exists("/dev/zero"):

    def link_to_dev_zero(folder: pathlib.Path) -> None:
        (folder / WEIGHTS_FILE).unlink()
        (folder / WEIGHTS_FILE).symlink_to("/dev/zero")

    WEIGHT_CASES.append(("weights_dev_zero", link_to_dev_zero, WEIGHTS_FILE, "not a regular file"))

CASES = META_CASES + WEIGHT_CASES


def tampered(model_dir: pathlib.Path, tmp_path: pathlib.Path, tamper: Callable[[pathlib.Path], Any]) -> pathlib.Path:
    folder = tmp_path / "run"
    shutil.copytree(model_dir, folder)
    tamper(folder)
    return folder


# ----------------------------------------------------------------------------- tests


def test_the_untouched_folder_loads_and_predicts(model_dir, image, capsys):
    model, meta = load_artifact(model_dir)
    assert meta["class_names"] == CLASSES and not model.training
    assert load_meta(model_dir) == meta
    assert main(["predict", str(model_dir), str(image), "--json", "--compile", "off"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] in CLASSES


@pytest.mark.parametrize("case, tamper, file, words", CASES, ids=[c[0] for c in CASES])
def test_tampered_folder_gives_one_clear_error(model_dir, tmp_path, case, tamper, file, words):
    folder = tampered(model_dir, tmp_path, tamper)
    with pytest.raises(ArtifactError) as info:
        load_artifact(folder)
    msg = str(info.value)
    assert file in msg and words in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("case, tamper, file, words", CASES, ids=[c[0] for c in CASES])
def test_tampered_folder_predict_prints_one_line(model_dir, tmp_path, image, capsys, case, tamper, file, words):
    folder = tampered(model_dir, tmp_path, tamper)
    code = main(["predict", str(folder), str(image), "--json", "--compile", "off"])
    out, err = capsys.readouterr()
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgcls: error: ") and file in lines[0], err


def test_load_meta_checks_without_weights(model_dir, tmp_path):
    folder = tampered(model_dir, tmp_path, edit_meta(set_value("num_classes", 2)))
    with pytest.raises(ArtifactError, match="num_classes is 2 but class_names lists 3"):
        load_meta(folder)


def test_a_pickle_in_place_of_the_weights_never_runs(model_dir, tmp_path, image):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tampered(model_dir, tmp_path, write_weights_bytes(lambda _: pickle.dumps({"fc.weight": Payload()})))
    cmd = [sys.executable, "-m", "imgcls.cli", "predict", str(folder), str(image)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and WEIGHTS_FILE in r.stderr and "never unpickles" in r.stderr
    assert not marker.exists()
    # A pickle without the usual opening bytes still cannot load: safetensors reads a JSON header.
    (folder / WEIGHTS_FILE).write_bytes(b"\x00" * 8 + pickle.dumps(Payload(), protocol=0))
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_artifact(folder)
    assert not marker.exists()


def test_predict_reports_a_zero_size_image_and_a_nul_path_and_keeps_the_batch(model_dir, image):
    from imgcls.predict import Classifier

    clf = Classifier.load(model_dir, compile="off")
    results = clf.predict([str(image), Image.new("RGB", (0, 0)), "bad\0name.png", str(image)], errors="report")
    assert [("error" in r) for r in results] == [False, True, True, False]
    assert results[0]["label"] in CLASSES and results[3]["label"] == results[0]["label"]
    assert "empty image (0x0 pixels)" in results[1]["error"]
    assert "NUL byte" in results[2]["error"]
