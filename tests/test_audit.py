"""imgcls audit: every finding kind on generated data with planted problems, the JSON and HTML
outputs, the helpers training uses (quick_checks, excluded_paths) and the CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from imgcls.audit import FINDING_KINDS, AuditOptions, drop_excluded, excluded_paths, quick_checks, run_audit, write_report
from imgcls.audit.labels import find_label_issues
from imgcls.audit.pixels import hamming, pixel_stats
from imgcls.data import decode_images, index_dataset
from imgcls.transforms import PreprocessSpec
from synth import draw_sample, make_class_folders


def quiet(_: str) -> None:
    pass


CLASSES = ("circle", "square", "triangle")


def varied_sample(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """synth's class picture blended with a smooth random colour field: every image clearly its own
    (synth's pictures alone are often alike at 32 px, which is right for them but blurs these tests)."""
    field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    return Image.blend(draw_sample(label, len(CLASSES), size, rng), field, 0.5)


def plant_problems(root: Path) -> Path:
    """Split folders (3 classes, 32 px) with one of each problem planted; names say what they are."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("valid", 6), ("test", 6)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                varied_sample(label, 32, rng).save(root / split / name / f"{i:03d}.png")
    tr = root / "train"
    shutil.copy(tr / "circle/000.png", root / "test/circle/dup_exact.png")  # exact copy, train -> test
    Image.open(tr / "square/001.png").save(root / "valid/square/reenc.jpg", quality=70)  # re-encoded, train -> valid
    Image.open(tr / "triangle/002.png").resize((48, 48), Image.Resampling.BICUBIC).save(tr / "circle/resized.png")  # resized, other class
    shutil.copy(tr / "square/003.png", tr / "triangle/conflict.png")  # exact copy, other class
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 12, (32, 32, 3), dtype=np.uint8)).save(tr / "circle/dark.png")
    Image.new("RGB", (32, 32), (200, 200, 200)).save(tr / "square/blank.png")
    draw_sample(2, 3, 6, rng).save(tr / "triangle/tiny.png")
    draw_sample(0, 3, 32, rng).convert("CMYK").save(tr / "circle/cmyk.jpg")
    draw_sample(1, 3, 32, rng).convert("RGBA").save(tr / "square/alpha.png")
    draw_sample(2, 3, 32, rng).convert("P").save(tr / "triangle/palette.png")
    draw_sample(0, 3, 32, rng).filter(ImageFilter.GaussianBlur(4)).save(tr / "circle/blurry.png")
    draw_sample(1, 3, 32, rng).resize((128, 32)).save(tr / "square/wide.png")
    (tr / "circle/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tr / "square/notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return plant_problems(tmp_path_factory.mktemp("audit") / "data")


@pytest.fixture(scope="module")
def reports(planted) -> dict[str, dict]:
    """The audit of the planted data set without features and with raw-pixel features."""
    return {mode: run_audit(planted, AuditOptions(features=mode), progress=False, log=quiet) for mode in ("none", "pixels")}


def paths_of(report: dict, kind: str) -> list[str]:
    return [p for e in report["findings"][kind] for p in e["paths"]]


def group_with(report: dict, kind: str, *paths: str) -> dict:
    """The one group of `kind` that holds all `paths` (fails if there is none)."""
    hits = [e for e in report["findings"][kind] if set(paths) <= set(e["paths"])]
    assert len(hits) == 1, f"{paths} not grouped in {kind}: {report['findings'][kind]}"
    return hits[0]


def test_unreadable_and_unsupported_files_with_the_decoders_reason(reports):
    entries = {e["paths"][0]: e for e in reports["none"]["findings"]["unreadable"]}
    assert set(entries) == {"train/circle/broken.jpg", "train/square/notes.txt"}
    assert entries["train/circle/broken.jpg"]["reason"].startswith("truncated or corrupt image data")
    assert entries["train/circle/broken.jpg"]["labels"] == ["circle"] and entries["train/circle/broken.jpg"]["splits"] == ["train"]
    assert "not an image extension: .txt" in entries["train/square/notes.txt"]["reason"]


def test_exact_duplicates_across_splits_and_across_classes(reports):
    r = reports["none"]
    leak = group_with(r, "exact_duplicates", "train/circle/000.png", "test/circle/dup_exact.png")
    assert (leak["relation"], leak["across_splits"], leak["across_classes"]) == ("across_splits", True, False)
    assert leak["exclude"] == ["train/circle/000.png"]  # the test copy stays, the training copy goes
    conflict = group_with(r, "exact_duplicates", "train/square/003.png", "train/triangle/conflict.png")
    assert conflict["relation"] == "across_classes" and sorted(conflict["labels"]) == ["square", "triangle"]
    assert sorted(conflict["exclude"]) == sorted(conflict["paths"])  # no way to know which label is right
    assert len(conflict["sha1"]) == 40
    assert r["findings"]["exact_duplicates"][0]["relation"] == "across_classes"  # the most serious first


@pytest.mark.parametrize("mode", ["none", "pixels"])
def test_resized_and_reencoded_copies_are_near_duplicates(reports, mode):
    r = reports[mode]
    reenc = group_with(r, "near_duplicates", "train/square/001.png", "valid/square/reenc.jpg")
    assert reenc["across_splits"] and "train/square/001.png" in reenc["exclude"] and "valid/square/reenc.jpg" not in reenc["exclude"]
    resized = group_with(r, "near_duplicates", "train/triangle/002.png", "train/circle/resized.png")
    assert resized["relation"] == "across_classes" and resized["max_hash_bits"] <= 6
    assert (resized["min_cosine"] is None) == (mode == "none")
    # byte-identical pairs are reported once, as exact duplicates, not again as near-duplicates
    assert not any(set(e["paths"]) == {"train/circle/000.png", "test/circle/dup_exact.png"} for e in r["findings"]["near_duplicates"])


def test_near_duplicates_leave_different_pictures_apart(tmp_path):
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(12):  # smooth random colour fields: every picture different
            field = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(field).resize((40, 40), Image.Resampling.BICUBIC).save(tmp_path / c / f"{i}.png")
    Image.open(tmp_path / "a/0.png").resize((64, 64)).save(tmp_path / "b/copy.jpg", quality=85)
    for mode in ("none", "pixels"):
        r = run_audit(tmp_path, AuditOptions(features=mode), progress=False, log=quiet)
        assert [sorted(e["paths"]) for e in r["findings"]["near_duplicates"]] == [["a/0.png", "b/copy.jpg"]], mode


def test_cropped_copy_found_by_pretrained_features(tmp_path):
    data = pytest.importorskip("skimage.data")  # photos: the pretrained features are made for them
    for folder, names in (
        ("a", ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "logo")),
        ("b", ("camera", "coins", "moon", "brick", "grass", "gravel", "horse", "page")),
    ):
        (tmp_path / folder).mkdir()
        for name in names:
            Image.fromarray(getattr(data, name)()).convert("RGB").save(tmp_path / folder / f"{name}.jpg", quality=90)
    cat = Image.open(tmp_path / "a/chelsea.jpg")
    w, h = cat.size
    cat.crop((w // 20, h // 20, w - w // 20, h - h // 20)).save(tmp_path / "b/crop.jpg", quality=85)  # 5 % off each side, other class
    r = run_audit(tmp_path, AuditOptions(features="efficientnet_lite0"), progress=False, log=quiet)
    assert [sorted(e["paths"]) for e in r["findings"]["near_duplicates"]] == [["a/chelsea.jpg", "b/crop.jpg"]]
    group = r["findings"]["near_duplicates"][0]
    assert group["relation"] == "across_classes" and group["min_cosine"] >= 0.85
    assert r["settings"]["features"] == "efficientnet_lite0" and r["settings"]["feature_spec"]["img_size"] == 128


def test_odd_images_are_flagged(reports):
    r = reports["none"]
    assert paths_of(r, "dark") == ["train/circle/dark.png"]
    assert set(paths_of(r, "near_constant")) == {"train/circle/dark.png", "train/square/blank.png"}
    assert paths_of(r, "tiny") == ["train/triangle/tiny.png"]
    assert r["findings"]["tiny"][0]["width"] == 6
    assert paths_of(r, "extreme_aspect") == ["train/square/wide.png"] and r["findings"]["extreme_aspect"][0]["aspect_ratio"] == 4.0
    modes = {e["paths"][0]: e["mode"] for e in r["findings"]["unusual_mode"]}
    assert modes == {"train/circle/cmyk.jpg": "CMYK", "train/square/alpha.png": "RGBA", "train/triangle/palette.png": "P"}
    assert "train/circle/blurry.png" in paths_of(r, "blurry")
    sharp = {p for p in paths_of(r, "blurry")} - {"train/circle/blurry.png", "train/triangle/tiny.png"}
    assert not sharp  # none of the generated, noisy pictures


def test_class_counts_and_imbalance_ratio(tmp_path):
    rng = np.random.default_rng(0)
    for label, (name, n) in enumerate((("big", 30), ("mid", 10), ("small", 3))):
        for i in range(n):
            (tmp_path / name).mkdir(exist_ok=True)
            draw_sample(label, 3, 16, rng).save(tmp_path / name / f"{i}.png")
    r = run_audit(tmp_path, AuditOptions(features="none"), progress=False, log=quiet)
    assert r["imbalance_ratio"] == 10.0
    assert {k: v["total"] for k, v in r["class_counts"].items()} == {"big": 30, "mid": 10, "small": 3}
    assert r["class_counts"]["big"] == {"all": 30, "total": 30}


def test_flipped_labels_rank_first_on_separable_data(tmp_path):
    make_class_folders(tmp_path, classes=("circle", "square", "triangle"), per_class=30, size=24, seed=2)
    flipped = {}
    for src, dst, i in (("circle", "square", 1), ("circle", "triangle", 2), ("square", "circle", 3), ("triangle", "square", 4)):
        os.replace(tmp_path / src / f"{i:03d}.png", tmp_path / dst / f"flipped{i}.png")
        flipped[f"{dst}/flipped{i}.png"] = src
    r = run_audit(tmp_path, AuditOptions(features="pixels"), progress=False, log=quiet)
    issues = r["findings"]["label_issues"]
    assert {e["paths"][0] for e in issues[: len(flipped)]} == set(flipped)
    assert all(e["suggested"] == flipped[e["paths"][0]] and e["given"] != e["suggested"] for e in issues[: len(flipped)])
    assert len(issues) <= 2 * len(flipped)
    assert [e["rank"] for e in issues] == list(range(1, len(issues) + 1))
    assert [e["self_confidence"] for e in issues] == sorted(e["self_confidence"] for e in issues)
    assert r["probe_accuracy"] > 0.85


def _noisy_probs(seed: int, k: int, n: int, strength: float, flips: list[int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = np.arange(n) % k
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), true] += strength
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = true.copy()
    labels[flips] = (labels[flips] + 1) % k
    return labels, probs


@pytest.mark.parametrize(
    "case, expected",
    [
        ((7, 4, 60, 3.0, [3, 10, 22, 41, 57]), [41, 3, 57]),
        ((8, 6, 120, 2.5, [1, 7, 30, 31, 64, 99, 110]), [31, 99, 64, 30, 1, 13, 53, 4]),
    ],
)
def test_confident_learning_matches_cleanlab(case, expected):
    # expected: cleanlab 2.9.0 filter.find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    labels, probs = _noisy_probs(*case)
    assert find_label_issues(labels, probs).tolist() == expected


def test_perceptual_hash_keeps_copies_close():
    rng = np.random.default_rng(1)
    img = draw_sample(0, 3, 64, rng)
    other = draw_sample(1, 3, 64, rng)
    resized = img.resize((40, 40), Image.Resampling.BICUBIC).resize((64, 64))
    s = pixel_stats(np.stack([np.asarray(x) for x in (img, resized, other)]))
    bits = hamming(s.phash[:, None], s.phash[None, :])
    assert bits[0, 1] <= 4 and bits[0, 2] >= 12 and bits[0, 0] == 0


def test_report_has_the_documented_keys_and_round_trips(reports, tmp_path):
    r = reports["pixels"]
    assert {
        "version",
        "data",
        "root",
        "layout",
        "class_names",
        "splits",
        "num_images",
        "ignored",
        "class_counts",
        "imbalance_ratio",
        "probe_accuracy",
        "settings",
        "timings",
        "findings",
    } <= set(r)
    assert tuple(r["findings"]) == FINDING_KINDS
    for kind, entries in r["findings"].items():
        for e in entries:
            assert len(e["paths"]) == len(e["labels"]) == len(e["splits"]) >= 1, kind
            assert set(e["exclude"]) <= set(e["paths"]), kind
    json_path, html_path = write_report(r, tmp_path)
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(r))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.html", "audit.json"]


def test_html_is_one_file_with_embedded_thumbnails(reports, tmp_path):
    _, html_path = write_report(reports["none"], tmp_path)
    page = html_path.read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    readable = sum(len(e["paths"]) for kind, entries in reports["none"]["findings"].items() if kind != "unreadable" for e in entries)
    assert readable >= 15 and page.count('src="data:image/jpeg;base64,') == readable  # one thumbnail per listed image
    assert 'src="http' not in page and "<link" not in page and "<script" not in page  # nothing loaded from elsewhere
    assert "train/circle/broken.jpg" in page and "no image" in page  # the unreadable file is listed without a thumbnail
    for kind in FINDING_KINDS:
        assert f'id="{kind}"' in page


def test_excluded_paths_and_drop_excluded(reports, planted, tmp_path):
    json_path, _ = write_report(reports["none"], tmp_path)
    excluded = excluded_paths(json_path)
    expect = [
        "train/square/003.png",
        "train/triangle/conflict.png",
        "train/circle/000.png",
        "train/circle/broken.jpg",
        "train/square/blank.png",
    ]
    assert {os.path.realpath(planted / p) for p in expect} <= excluded
    assert os.path.realpath(planted / "test/circle/dup_exact.png") not in excluded
    index = index_dataset(planted)
    kept, dropped = drop_excluded(index.splits["train"], excluded)
    assert dropped >= 4 and not any(Path(p).name == "conflict.png" for p, _ in kept)
    assert excluded_paths(json_path, kinds=("unreadable",)) == {os.path.realpath(planted / "train/circle/broken.jpg")}
    link = tmp_path / "link"  # training may reach the same files through another path
    link.symlink_to(planted)
    kept, dropped = drop_excluded(index_dataset(link).splits["train"], excluded)
    assert dropped >= 4 and not any(Path(p).name == "conflict.png" for p, _ in kept)


def test_quick_checks_warn_about_leakage_conflicts_and_imbalance(planted, tmp_path):
    index = index_dataset(planted)
    paths = [p for rows in index.splits.values() for p, _ in rows]
    dec = decode_images(paths, PreprocessSpec(img_size=16), progress=False)
    warnings = quick_checks(index, dict(zip(dec.paths, dec.hashes)))
    assert len(warnings) == 2
    assert "more than one split" in warnings[0] and "more than one class" in warnings[1]
    assert all(f"imgcls audit {index.root}" in w for w in warnings)
    clean = index_dataset(make_class_folders(tmp_path / "clean", per_class=4, size=16))
    assert quick_checks(clean, {}) == []
    clean.splits["all"] = [(f"x{i}.png", 0) for i in range(9)] + [("y.png", 1), ("z.png", 2)]  # 9:1, under the 10:1 warning
    assert quick_checks(clean, {}) == []
    clean.splits["all"] = [(f"x{i}.png", 0) for i in range(20)] + [("y.png", 1), ("z.png", 2), ("w.png", 2)]
    assert [w for w in quick_checks(clean, {}) if "imbalanced 20.0:1 (circle 20, square 1 images)" in w]
    clean.splits["all"] = [(f"x{i}.png", 0) for i in range(20)] + [("y.png", 1)]
    assert quick_checks(clean, {}) == ["classes without images: triangle"]


def test_cli_audit_writes_both_files_and_prints_json(planted, tmp_path, capsys):
    from imgcls.cli import main

    assert main(["audit", str(planted), "--out", str(tmp_path / "a"), "--no-features", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "exact duplicates: 2 groups" in out and "audit.html" in out
    assert (tmp_path / "a/audit.json").is_file() and (tmp_path / "a/audit.html").is_file()
    assert main(["audit", str(planted), "--out", str(tmp_path / "b"), "--no-features", "--quiet", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["settings"]["features"] == "none" and len(doc["findings"]["unreadable"]) == 2
    assert main(["audit", str(tmp_path / "missing"), "--out", str(tmp_path / "c"), "--quiet"]) == 2


def test_a_data_set_with_nothing_decodable_is_still_audited(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    r = run_audit(tmp_path, AuditOptions(features="pixels"), progress=False, log=quiet)
    assert sorted(paths_of(r, "unreadable")) == ["a/x.png", "b/x.png"]
    assert r["probe_accuracy"] is None and all(not r["findings"][k] for k in FINDING_KINDS if k != "unreadable")


def test_a_multi_label_manifest_is_refused_with_the_reason(tmp_path):
    folder = make_class_folders(tmp_path / "d", per_class=2, size=16)
    rows = [f"{p.relative_to(folder)},{p.parent.name};other" for p in sorted(folder.rglob("*.png"))]
    manifest = folder / "labels.csv"
    manifest.write_text("path,labels\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="multi-label manifest.*imgcls audit checks single-label data"):
        run_audit(manifest, progress=False, log=lambda s: None)


def test_near_duplicate_groups_do_not_chain():
    """a~b and b~c but a and c far apart: two images match the leader, the chain stops there.

    A transitive closure joined 4,489 EuroSAT water and forest tiles into one group (cosine 0.22
    between members); each group member must match its group's first image."""
    from imgcls.audit.neighbours import DuplicateRule, search

    angles = np.radians([0.0, 20.0, 40.0, 60.0, 80.0, 100.0])  # neighbours at cos 0.94, two apart at 0.77
    embed = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    phash = np.arange(6, dtype=np.uint64) * np.uint64(0xFFFF)  # hashes far apart: the features decide
    signature = np.eye(6, dtype=np.float32)
    found = search(phash, signature, embed, DuplicateRule(min_cosine=0.92, feature_neighbour_ratio=100.0), k=2)  # no ratio test here
    assert found.groups == [[0, 1], [2, 3], [4, 5]]
    for group in found.groups:
        assert all(embed[g] @ embed[group[0]] >= 0.92 for g in group)


def test_near_constant_images_are_not_near_duplicates_of_each_other():
    from imgcls.audit.neighbours import DuplicateRule, search

    embed = np.tile(np.array([[1.0, 0.0]], np.float32), (4, 1))  # all alike
    phash = np.zeros(4, np.uint64)
    signature = np.ones((4, 3), np.float32) / np.sqrt(3)
    comparable = np.array([True, True, False, False])
    found = search(phash, signature, embed, DuplicateRule(), k=2, comparable=comparable)
    assert found.groups == [[0, 1]]


def test_blank_images_typical_of_a_class_are_not_flagged(tmp_path):
    """A class of calm water (near-constant tiles) is what that class looks like: counted under
    "typical", not flagged or excluded; one blank image in a textured class still is."""
    rng = np.random.default_rng(0)
    for c in ("water", "town"):
        (tmp_path / c).mkdir()
    for i in range(12):
        level = 60 + 5 * i
        Image.new("RGB", (32, 32), (level // 2, level // 2, level)).save(tmp_path / "water" / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "town" / f"{i}.png")
    Image.new("RGB", (32, 32), (128, 128, 128)).save(tmp_path / "town" / "blank.png")
    r = run_audit(tmp_path, AuditOptions(features="none"), progress=False, log=quiet)
    assert [e["paths"] for e in r["findings"]["near_constant"]] == [["town/blank.png"]]
    assert r["typical"] == {"near_constant": {"water": 12}}
    assert not any("water/" in p for e in r["findings"]["near_duplicates"] for p in e["paths"])


def _digit(rng: np.random.Generator, size: int = 28) -> Image.Image:
    """A white stroke figure on black, like an MNIST digit: the whole data set is dark."""
    from PIL import ImageDraw

    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    corners = np.array([(6, 6), (22, 8), (8, 22)]) * size / 28
    pts = [tuple(int(v) for v in c + rng.integers(-2, 3, 2)) for c in corners]
    d.line(pts, fill=150, width=2)  # mean grey about 8-15: under the absolute bound of 20
    return img.convert("RGB")


def test_dark_and_bright_are_relative_to_the_class(tmp_path):
    """White strokes on black (MNIST) are not "dark", black ink on white pages not "bright"; an
    under-exposed and an over-exposed photo among normal ones are."""
    rng = np.random.default_rng(0)
    for c in ("digits", "pages", "photos"):
        (tmp_path / c).mkdir()
    for i in range(15):
        _digit(rng).save(tmp_path / "digits" / f"{i}.png")
        Image.fromarray(255 - np.asarray(_digit(rng))).save(tmp_path / "pages" / f"{i}.png")
        photo = varied_sample(i % 3, 32, rng)
        photo.save(tmp_path / "photos" / f"{i}.png")
    dim = np.asarray(varied_sample(0, 32, rng)).astype(np.float32)
    Image.fromarray((dim * 12 / dim.mean()).clip(0, 255).astype(np.uint8)).save(tmp_path / "photos" / "under.png")
    Image.fromarray((255 - (255 - dim) * 0.06).clip(0, 255).astype(np.uint8)).save(tmp_path / "photos" / "over.png")
    r = run_audit(tmp_path, AuditOptions(features="none"), progress=False, log=quiet)
    assert paths_of(r, "dark") == ["photos/under.png"]
    assert paths_of(r, "bright") == ["photos/over.png"]
    assert r["typical"]["dark"] == {"digits": 15} and r["typical"]["bright"] == {"pages": 15}
    assert r["settings"]["dark_relative"] > 0 and "bright" in r["findings"]


def test_hash_near_duplicates_adapt_to_look_alike_images(tmp_path):
    """Many near-identical simple images (one vertical stroke each, like MNIST's "1"s) match each
    other by hash and coarse signature; the neighbourhood ratio test leaves them apart, while a
    resized + re-encoded copy of a distinct picture and a mirrored copy are still found."""
    from PIL import ImageDraw

    rng = np.random.default_rng(1)
    (tmp_path / "ones").mkdir()
    (tmp_path / "other").mkdir()
    for i in range(60):  # strokes drawn at 4x and reduced: continuous variation, like handwriting
        x, dx, y0, y1, w = rng.uniform((11, -2, 3, 20, 2), (16, 2, 7, 24, 3)) * 4
        img = Image.new("L", (112, 112), 0)
        ImageDraw.Draw(img).line([(x, y0), (x + dx, y1)], fill=255, width=int(w))
        img.resize((28, 28), Image.Resampling.BOX).convert("RGB").save(tmp_path / "ones" / f"{i}.png")
    for i in range(12):
        varied_sample(i % 3, 28, rng).save(tmp_path / "other" / f"{i}.png")
    Image.open(tmp_path / "other/0.png").resize((22, 22), Image.Resampling.BICUBIC).save(tmp_path / "other/copy.jpg", quality=80)
    Image.open(tmp_path / "other/1.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "other/mirror.png")
    from imgcls.audit.neighbours import DuplicateRule

    def grouped(rule: DuplicateRule) -> list[list[str]]:
        r = run_audit(tmp_path, AuditOptions(features="none", duplicates=rule), progress=False, log=quiet)
        return sorted(sorted(e["paths"]) for e in r["findings"]["near_duplicates"])

    def ones(groups: list[list[str]]) -> int:
        return sum(p.startswith("ones/") for g in groups for p in g)

    groups, unchecked = grouped(DuplicateRule()), grouped(DuplicateRule(neighbour_ratio=1e9))
    assert ["other/0.png", "other/copy.jpg"] in groups and ["other/1.png", "other/mirror.png"] in groups
    # fewer look-alikes grouped (22 of 60 against 31 here; on 20,000 MNIST digits 31 groups against 1,030)
    assert ones(unchecked) >= 20 and ones(groups) < ones(unchecked), (ones(groups), ones(unchecked))


def test_mirrored_hash_matches_the_mirrored_image():
    rng = np.random.default_rng(2)
    imgs = np.stack([np.asarray(varied_sample(i % 3, 48, rng)) for i in range(4)])
    s, m = pixel_stats(imgs), pixel_stats(np.ascontiguousarray(imgs[:, :, ::-1]))
    assert (hamming(s.phash_mirror, m.phash) == 0).all() and (hamming(s.phash, m.phash) >= 16).all()


@pytest.mark.parametrize("side, expected", [(28, 96), (32, 96), (64, 96), (96, 128), (500, 128), (0, 128)])
def test_feature_size_follows_the_image_size(side, expected):
    from imgcls.audit.features import choose_feature_size

    assert choose_feature_size(side) == expected


def test_feature_size_is_chosen_from_the_data_and_recorded(tmp_path):
    make_class_folders(tmp_path, classes=("circle", "square"), per_class=12, size=32, seed=3)
    r = run_audit(tmp_path, AuditOptions(features="efficientnet_lite0", pretrained=False), progress=False, log=quiet)
    assert r["settings"]["feature_size"] == 96 and r["settings"]["feature_spec"]["img_size"] == 96
    assert r["settings"]["feature_size_chosen"].startswith("auto") and r["settings"]["median_short_side"] == 32


def test_feature_rules_off_leaves_feature_only_matches_out():
    """The same pairs as above with feature_rules=False: no group (the hashes are far apart), and the
    neighbourhoods (outlier scores) are still computed."""
    from imgcls.audit.neighbours import DuplicateRule, search

    angles = np.radians([0.0, 20.0, 40.0, 60.0, 80.0, 100.0])
    embed = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    phash = np.arange(6, dtype=np.uint64) * np.uint64(0xFFFF)
    found = search(
        phash, np.eye(6, dtype=np.float32), embed, DuplicateRule(min_cosine=0.92, feature_neighbour_ratio=100.0), k=2, feature_rules=False
    )
    assert found.groups == [] and found.knn_similarity is not None and found.knn_similarity.shape == (6,)


def test_copy_check_tells_whether_features_find_copies():
    """Copies closer to their originals than any other image: the feature rules are used; copies
    that look-alike originals beat (MNIST's digits at 96 px): they are left out."""
    from imgcls.audit import calibrate

    rng = np.random.default_rng(0)
    spread = rng.normal(size=(300, 32)).astype(np.float32)
    rows = calibrate.sample_rows(300, seed=0)
    near = spread[rows] + 0.05 * rng.normal(size=(len(rows), 32)).astype(np.float32)
    good = calibrate.check_copies(spread, rows, near)
    assert good.found_share > 0.95 and good.features_find_copies and good.median_cosine > 0.9
    # look-alikes: every original has a twin much closer than its copy is
    twins = np.concatenate([spread[:150], spread[:150] + 0.01 * rng.normal(size=(150, 32)).astype(np.float32)])
    far = twins[rows] + 1.0 * rng.normal(size=(len(rows), 32)).astype(np.float32)
    bad = calibrate.check_copies(twins, rows, far)
    assert bad.found_share < 0.2 and not bad.features_find_copies
    assert bad.to_dict()["feature_rules"].startswith("left out")


def test_make_copy_keeps_the_decoded_shape():
    from imgcls.audit import calibrate

    img = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    copy = calibrate.make_copy(img, native_side=28)
    assert copy.shape == img.shape and copy.dtype == np.uint8 and not np.array_equal(copy, img)


def test_audit_reports_its_copy_check(reports):
    check = reports["pixels"]["settings"]["copy_check"]
    assert check["sampled"] > 0 and check["feature_rules"] == "used"  # distinct generated pictures: copies stand out
    assert reports["none"]["settings"]["copy_check"] is None


def test_html_says_when_near_duplicates_are_found_by_hash_only(reports):
    from imgcls.audit.html import render_html

    used = render_html(reports["pixels"])
    assert "perceptual hash and feature similarity" in used
    left_out = {**reports["pixels"], "settings": {**reports["pixels"]["settings"]}}
    left_out["settings"]["copy_check"] = {"sampled": 200, "found_share": 0.035, "feature_rules": "left out: ..."}
    page = render_html(left_out)
    assert "by perceptual hash only" in page and "4%" in page and "perceptual hash and feature similarity" not in page
