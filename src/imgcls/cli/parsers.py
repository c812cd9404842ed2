"""The `imgcls` command line: every subcommand's flags and help, and `build_parser`."""

from __future__ import annotations

import argparse
from typing import Any

from imgcls.cli.commands import (
    cmd_audit,
    cmd_demo,
    cmd_evaluate,
    cmd_explain,
    cmd_export,
    cmd_models,
    cmd_predict,
    cmd_report,
    cmd_serve,
    cmd_train,
)
from imgcls.cli.train_args import OUTSIDE_ROOT_HELP, add_train_args
from imgcls.config import (
    BACKENDS,
    COMPILE_MODES,
    PRECISIONS,
    TTA_CHOICES,
    UNKNOWN_ACCEPT,
)

EPILOG = """examples:
  imgcls demo                                   train and evaluate on the bundled 8x8 digits, offline
  imgcls train DATA --out runs/exp1             DATA: class folders, train/val/test folders, or a CSV (path,label)
  imgcls evaluate runs/exp1 DATA/test --json
  imgcls predict runs/exp1 photo.jpg 'more/*.png' --top-k 3
  imgcls predict imagenet cat.jpg               pretrained ImageNet classifier (EfficientNet-Lite0)
  imgcls export runs/exp1 --quantize int8       runs/exp1/model.onnx (+ model.int8.onnx), checked against torch
  imgcls explain runs/exp1 cat.jpg --out cams   cams/cat.png: Grad-CAM heat map over the image
  imgcls report runs/exp1 DATA --out r.html     one HTML file: metrics, curves, top losses with Grad-CAM, calibration
  imgcls audit DATA --out audit                duplicates, leakage, likely label errors, odd images: audit/audit.html
  imgcls serve runs/exp1 --port 8000            HTTP API and web page at http://127.0.0.1:8000 (needs imgcls[serve])
"""


COMPILE_HELP = (
    "torch.compile the model for inference: auto when the job would take 1.5 minutes or more without it "
    "(compiling takes 10-30 s, then the model runs 1.2-2.3x faster on CPU), on, or off (default auto)"
)
TTA_HELP = (
    "test-time augmentation: average the logits over mirrored and/or 1-px shifted copies; "
    "auto: what the model folder recommends (model.json 'tta': the fast recipe's "
    "flip-translate, or translate when trained without flips) (default auto)"
)


THREADS_HELP = "torch intra-op threads (0: one or every usable core, whichever the first batches run faster)"
UNKNOWN_HELP = (
    "answer 'unknown' (with the best guess) below this score instead of model.json's threshold, in the units of the model's "
    "'unknown' method (msp: the calibrated top probability, e.g. 0.5; knn: a cosine similarity; mahalanobis: minus a squared "
    "distance); 0 turns 'unknown' answers off "
    f"(default: model.json's threshold, which accepts {UNKNOWN_ACCEPT * 100:.0f}%% of the validation images)"
)
COVERAGE_HELP = (
    "add each image's prediction set: the classes that hold the true one with this probability (e.g. 0.9; split conformal "
    "on the validation images' scores in model.json)"
)


def _add_report_command(sub: Any) -> None:
    x = sub.add_parser(
        "report",
        help="one self-contained HTML file: metrics, curves, confusions, top losses with Grad-CAM, calibration",
        description="Evaluates MODEL on DATA and writes one HTML file that opens offline (every image embedded): metrics, "
        "per-class table, confusion matrix, training curves, top losses with Grad-CAM, confused pairs, "
        "reliability diagram and, when there is one, the data audit's summary.",
    )
    x.add_argument("model", help="model folder written by `imgcls train`")
    x.add_argument("data", help="labeled data in any layout `imgcls train` accepts")
    x.add_argument("--out", required=True, help="the HTML file to write (e.g. report.html)")
    x.add_argument("--split", choices=["train", "val", "test", "all"], help="which split of DATA (default: test, else val, else all)")
    x.add_argument("--audit", help="an audit.json from `imgcls audit` to summarise (default MODEL/audit.json when there is one)")
    x.add_argument("--batch-size", type=int, help="images per forward pass (default: by input size)")
    x.add_argument("--tta", choices=TTA_CHOICES, default="auto", help=TTA_HELP)
    x.add_argument("--allow-outside-root", action="store_true", help=OUTSIDE_ROOT_HELP)
    x.add_argument("--quiet", action="store_true", help="no progress bars")
    x.set_defaults(func=cmd_report)


def _add_serve_command(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="HTTP API and web page for a model (needs imgcls[serve])",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="POST /v1/predict (multipart field 'file', repeatable, or a raw "
        "image body), GET /v1/health, /v1/model, /docs; the web page at /.",
    )
    s.add_argument("model", help="model folder written by `imgcls train`, or 'imagenet' (or imagenet:ARCH)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--backend", choices=BACKENDS, default="torch", help="inference runtime")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda")
    s.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="auto: bf16 autocast on CPUs with AMX/AVX512-BF16 and on CUDA, else fp32"
    )
    s.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: one or every usable core, timed on the first batches)"
    )
    s.add_argument("--unknown-threshold", type=float, metavar="X", help=UNKNOWN_HELP)
    g = s.add_argument_group("limits and batching")
    g.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body; larger gets 413")
    g.add_argument("--max-images", type=int, default=16, help="most images per request; more gets 400")
    g.add_argument("--max-batch", type=int, default=16, help="most images per forward pass")
    g.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to wait for more requests to fill a batch")
    g.add_argument("--queue-size", type=int, default=64, help="requests waiting for the model; one more gets 503 at once")
    g.add_argument("--no-batching", action="store_true", help="one forward pass per request (the benchmark's baseline)")
    g.add_argument("--decode-workers", type=int, default=0, help="threads decoding uploads (0: usable cores - 1, 1 to 4)")
    g.add_argument("--default-top-k", type=int, default=5, help="classes listed per image when a request gives no top_k")
    g.add_argument("--body-timeout-s", type=float, default=20.0, help="seconds for a request's whole body to arrive; later gets 408")
    g.add_argument(
        "--max-client-requests", type=int, default=32, help="requests one client address may have in progress; more get 429 (0: no limit)"
    )
    g.add_argument(
        "--max-decoded-mb", type=float, default=256.0, help="most memory decoding one image may take (from its header); more gets 413"
    )
    g.add_argument(
        "--decode-budget-mb",
        type=float,
        default=512.0,
        help="memory all images being decoded at once may take; an image that does not fit waits briefly, then 503",
    )
    e = s.add_argument_group("engine")
    e.add_argument(
        "--buckets",
        type=_buckets_arg,
        default=None,
        metavar="auto|off|B1,B2,...",
        help="batch sizes each forward pass is padded to, increasing, the largest = --max-batch; auto: 1,4,8,... up to "
        "--max-batch when compiled or onnx, unpadded when eager; off: never pad",
    )
    e.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="auto",
        help="torch.compile each bucket shape at start-up, so no request pays a compile; auto: when torch.compile works "
        "here and the model is large enough to gain (else eager, the reason in the log); on: compile or fail",
    )
    s.set_defaults(func=cmd_serve)


def _buckets_arg(text: str) -> tuple[int, ...] | None:
    """--buckets: 'auto' -> None, 'off' -> (), '1,4,8,16' -> (1, 4, 8, 16)."""
    if text == "auto":
        return None
    if text == "off":
        return ()
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, off or comma-separated batch sizes like 1,4,8,16, got {text!r}") from None


def _add_export_command(sub: Any) -> None:
    x = sub.add_parser(
        "export",
        help="write an ONNX file (dynamic batch, class names and preprocessing "
        "in its metadata), checked against torch (needs imgcls[onnx])",
    )
    x.add_argument("model", help="model folder written by `imgcls train`")
    x.add_argument("--format", choices=["onnx"], default="onnx", help="output format (default onnx)")
    x.add_argument("--out", help="output file (default MODEL/model.onnx, which `--backend onnx` uses)")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    x.add_argument(
        "--quantize",
        choices=["int8"],
        help="also write OUT with .int8.onnx: static int8, calibrated on half the check images (at most 256); "
        "prints accuracy before and after and top-1 agreement with fp32 on the other half (recorded in the file)",
    )
    x.add_argument("--int8", dest="quantize", action="store_const", const="int8", help="the same as --quantize int8")
    x.add_argument(
        "--data", help="images for the parity check, calibration and accuracy (default: the validation split recorded in MODEL/split.json)"
    )
    x.set_defaults(func=cmd_export)


def _add_explain_command(sub: Any) -> None:
    x = sub.add_parser(
        "explain",
        help="Grad-CAM heat maps: which parts of each image the model based its label on",
        description="Writes OUT/<image name>.png per image: the image at its own size with a Grad-CAM heat map over it "
        "(resize_mode crop: the sides the model never sees are dimmed and their map is 0).",
    )
    x.add_argument("model", help="model folder written by `imgcls train`, or 'imagenet' (or imagenet:ARCH): the pretrained ImageNet model")
    x.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    x.add_argument(
        "--out",
        required=True,
        help="folder for the overlays (dog.2000.jpg -> OUT/dog.2000.png; OUT/<label>/... when two inputs share a name)",
    )
    x.add_argument("--class", dest="target_class", metavar="LABEL", help="explain this class instead of the predicted one")
    x.add_argument("--save-maps", action="store_true", help="also write each raw map as OUT/<name>.npy (H x W float32 in [0, 1])")
    x.add_argument("--json", action="store_true", help="print a JSON list: path, label, score, overlay (and map), or path, error")
    x.set_defaults(func=cmd_explain)


def _add_audit_command(sub: Any) -> None:
    x = sub.add_parser(
        "audit",
        help="data health: unreadable files, duplicates and leakage, likely label errors, outliers, odd images",
        description="Checks a data set (any layout `imgcls train` reads) and writes OUT/audit.json and OUT/audit.html "
        "(thumbnails embedded). Label errors and outliers use pretrained EfficientNet-Lite0 features; "
        "--no-features skips them for a fast audit.",
    )
    x.add_argument("data", help="dataset: folder of class folders, folder with train/ val/ test/ class folders, or a CSV manifest")
    x.add_argument("--out", default="imgcls-audit", help="folder for audit.json and audit.html (default ./imgcls-audit)")
    x.add_argument("--json", action="store_true", help="print the whole report as JSON instead of the summary")
    x.add_argument(
        "--no-features", action="store_true", help="no network: skip label errors and outliers, near-duplicates by perceptual hash only"
    )
    x.add_argument("--model", help="pretrained network for the features (default efficientnet_lite0)")
    x.add_argument(
        "--feature-size",
        type=int,
        help="input size for the feature pass in pixels (default: from the images' median short side, 96 up to 64 px images, "
        "128 for photos; 0: the model's own, slower)",
    )
    x.add_argument("--folds", type=int, help="k of the k-fold linear probe that scores the labels (default 5)")
    x.add_argument("--seed", type=int, default=0, help="seed for the probe's folds (default 0)")
    x.add_argument("--workers", type=int, default=0, help="decode processes (default: one per core)")
    x.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 on CPUs with AMX/AVX512-BF16, else fp32")
    x.add_argument("--allow-outside-root", action="store_true", help=OUTSIDE_ROOT_HELP)
    x.add_argument("--quiet", action="store_true", help="no progress bars")
    x.set_defaults(func=cmd_audit)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imgcls",
        description="Train, evaluate and run image classifiers from a folder of labeled images.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="train, evaluate and predict on scikit-learn's 8x8 handwritten digits (offline)")
    d.add_argument("--out", default="imgcls-demo", help="folder for the images, the model and the report (default ./imgcls-demo)")
    d.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser(
        "train", help="train a model on a dataset; the run folder becomes the model", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_train_args(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="accuracy, per-class metrics, confusion matrix and report for a model on labeled data")
    e.add_argument("model", help="model folder written by `imgcls train`")
    e.add_argument("data", help="labeled data in any layout `imgcls train` accepts")
    e.add_argument("--split", choices=["train", "val", "test", "all"], help="which split of DATA (default: test, else val, else all)")
    e.add_argument("--out", help="report folder (default MODEL/evaluation/<data name>)")
    e.add_argument("--batch-size", type=int, help="images per forward pass (default: by input size, 256 at 32 px, 8 at 224 px)")
    e.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    e.add_argument("--tta", choices=TTA_CHOICES, default="auto", help=TTA_HELP)
    e.add_argument("--compile", choices=COMPILE_MODES, default="auto", help=COMPILE_HELP)
    e.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    e.add_argument("--allow-outside-root", action="store_true", help=OUTSIDE_ROOT_HELP)
    e.add_argument("--coverage", type=float, metavar="P", help=COVERAGE_HELP + "; reports their empirical coverage and mean size")
    e.add_argument("--unknown-threshold", type=float, metavar="X", help=UNKNOWN_HELP + "; reports the share accepted and their accuracy")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="label and probabilities for image files, folders or globs")
    r.add_argument(
        "model", help="model folder written by `imgcls train`, or 'imagenet' (or imagenet:ARCH) for the pretrained ImageNet classifier"
    )
    r.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    r.add_argument("--top-k", type=int, default=5, help="how many classes to list per image (default 5)")
    out = r.add_mutually_exclusive_group()
    out.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list: path, label, score, top_k (best_guess when label is 'unknown', set with --coverage), or path, error",
    )
    out.add_argument("--csv", action="store_true", help="print CSV rows: path, label, score, top_k, error")
    r.add_argument("--batch-size", type=int, help="images per forward pass (default: by input size, 256 at 32 px, 8 at 224 px)")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    r.add_argument("--tta", choices=TTA_CHOICES, default="auto", help=TTA_HELP)
    r.add_argument("--compile", choices=COMPILE_MODES, default="auto", help=COMPILE_HELP + "; torch backend only")
    r.add_argument("--threads", type=int, default=0, help=THREADS_HELP + "; torch backend only")
    r.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="torch; onnx: onnxruntime on the CPU, MODEL is then a .onnx file or "
        "a folder with model.onnx from `imgcls export MODEL`; onnx-int8: its model.int8.onnx (export --int8); "
        "auto (default): on the CPU, model.int8.onnx when up to date and its export measured >= 99.5%% top-1 agreement "
        "with fp32 on held-out images, else an up-to-date model.onnx, else torch",
    )
    r.add_argument(
        "--explain",
        metavar="DIR",
        help="also write a Grad-CAM overlay per image to DIR, for its predicted label (as `imgcls explain` writes them)",
    )
    r.add_argument("--coverage", type=float, metavar="P", help=COVERAGE_HELP)
    r.add_argument("--unknown-threshold", type=float, metavar="X", help=UNKNOWN_HELP)
    g = r.add_argument_group('cluster (--engine ray, needs imgcls[ray]: pip install "imgcls[ray]")')
    g.add_argument("--engine", choices=("local", "ray"), default="local", help="local: this process; ray: Ray actors (default local)")
    g.add_argument("--address", help="Ray cluster address (e.g. ray://head:10001 or auto); default: a local Ray on 127.0.0.1")
    g.add_argument("--workers", type=int, default=2, help="Ray actors, each loading the model once, of --threads CPUs (default 2, 1)")
    g.add_argument("--out", help="with --engine ray: write one row per file (the --json fields) to OUT.parquet or OUT.csv")
    r.set_defaults(func=cmd_predict)

    m = sub.add_parser("models", help="list the available architectures")
    m.set_defaults(func=cmd_models)
    _add_serve_command(sub)
    _add_export_command(sub)
    _add_explain_command(sub)
    _add_report_command(sub)
    _add_audit_command(sub)
    return p


def _version() -> str:
    from imgcls import __version__

    return f"imgcls {__version__}"
