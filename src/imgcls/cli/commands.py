"""The `imgcls` subcommands: each builds its arguments from the parsed flags and calls exactly one
library function. Library modules are imported inside each command, so `imgcls --help` does not
load torch."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgcls.training.distributed import Ranks


def _run_config(a: argparse.Namespace) -> Any:
    from imgcls.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from imgcls.transforms import AugmentSpec

    return RunConfig(
        data=DataConfig(
            path=a.data,
            img_size=a.img_size,
            resize_mode=a.resize_mode,
            val_fraction=a.val_fraction,
            seed=a.seed,
            cache_dir=a.cache_dir,
            workers=a.workers,
            allow_outside_root=a.allow_outside_root,
            exclude_from=a.exclude_from,
            task=a.task,
            label_sep=a.label_sep,
        ),
        model=ModelConfig(
            name=a.model,
            pretrained=a.pretrained,
            weights=a.weights,
            weights_sha256=a.weights_sha256,
            strategy=a.strategy,
            activation=a.activation,
        ),
        train=TrainConfig(
            out=a.out,
            epochs=a.epochs,
            time_budget=a.time_budget,
            recipe=a.recipe,
            batch_size=a.batch_size,
            lr=a.lr,
            optimizer=a.optimizer,
            momentum=a.momentum,
            weight_decay=a.weight_decay,
            schedule=a.schedule,
            warmup_epochs=a.warmup_epochs,
            label_smoothing=a.label_smoothing,
            grad_clip=a.grad_clip,
            precision=a.precision,
            channels_last=not a.no_channels_last,
            compile=a.compile,
            patience=a.patience,
            deterministic=a.deterministic,
            threads=a.threads,
            device=a.device,
            class_balance=a.class_balance,
            unknown_method=a.unknown_method,
            pos_weight=a.pos_weight,
            label_precision=a.label_precision,
            progressive_resize=a.progressive_resize,
            tta_select=a.tta_select,
            augment=AugmentSpec(hflip=not a.no_hflip, crop=a.crop, translate=a.translate, color_jitter=a.color_jitter, rotate=a.rotate),
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
    from imgcls.training.distributed import DistributedError, ranks_from_env

    ranks = ranks_from_env(os.environ)  # under torchrun (WORLD_SIZE > 1) this process is one rank of a distributed run
    try:
        fit(cfg, resume=a.resume, overwrite=a.overwrite, progress=not a.quiet, ranks=ranks)
    except DistributedError as e:
        print(f"imgcls: error: {e}", file=sys.stderr)
        _exit_rank(ranks, 1)
        return 1
    _exit_rank(ranks, 0)
    return 0


def _exit_rank(ranks: Ranks | None, code: int) -> None:
    """End a torchrun worker here, without Python's shutdown: torch's gloo threads outlive
    destroy_process_group and may still be releasing the last collective's tensors, which takes
    the GIL; during interpreter shutdown that kills the process with SIGABRT ("terminate called
    without an active exception"; 2 of 6 short runs in one loop here, caught in a core dump), and
    torchrun then fails the finished run. The run folder is complete by now (written atomically).
    Errors other than DistributedError (bad input) still go through `main`'s message and exit."""
    if ranks is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fmt(v: float) -> str:
    return "n/a" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}"


def cmd_evaluate(a: argparse.Namespace) -> int:
    from imgcls.evaluate import evaluate
    from imgcls.metrics import format_confusion_matrix

    m = evaluate(
        a.model,
        a.data,
        split=a.split,
        out_dir=a.out,
        batch_size=a.batch_size,
        tta=a.tta,
        compile=a.compile,
        allow_outside_root=a.allow_outside_root,
        progress=not (a.quiet or a.json),
        log=lambda s: print(s, file=sys.stderr),
        coverage=a.coverage,
        unknown_threshold=a.unknown_threshold,
        threads=a.threads or None,
    )
    m.pop("predictions")
    if a.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"{m['num_samples']} images ({m['split']} split of {m['data']})")
    if m.get("task") == "multi-label":
        from imgcls.multilabel import format_multilabel_metrics

        print(format_multilabel_metrics(m))
        print(f"\nmetrics: {m['report']}")
        return 0
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
        print(
            f"  {'accepted':<18} {_fmt(u['accepted'])}  ({u['num_accepted']} images with {u['method']} >= {u['threshold']:.4g}; "
            f"the rest answered 'unknown')"
        )
        print(f"  {'accuracy_accepted':<18} {acc}")
    if m.get("coverage_target") is not None:
        print(f"  {'coverage':<18} {_fmt(m['coverage'])}  (prediction sets at target {m['coverage_target']:g})")
        print(f"  {'mean_set_size':<18} {m['mean_set_size']:.2f}")


def cmd_report(a: argparse.Namespace) -> int:
    from imgcls.evaluate import evaluate

    m = evaluate(
        a.model,
        a.data,
        split=a.split,
        batch_size=a.batch_size,
        tta=a.tta,
        allow_outside_root=a.allow_outside_root,
        progress=not a.quiet,
        log=lambda s: print(s, file=sys.stderr),
        report_file=a.out,
        audit=a.audit,
    )
    print(f"{m['num_samples']} images ({m['split']} split of {m['data']}): accuracy {_fmt(m['accuracy'])}, macro-F1 {_fmt(m['macro_f1'])}")
    print(f"report: {m['report']}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    if a.engine == "ray" or a.out:
        return _predict_ray(a)
    from imgcls.predict import Classifier, expand_inputs

    clf = Classifier.load(
        a.model,
        device=a.device,
        backend=a.backend,
        tta=a.tta,
        unknown_threshold=a.unknown_threshold,
        compile=a.compile,  # torch only; "auto" may pick torch
        log=lambda s: print(s, file=sys.stderr),
        threads=a.threads or None,
    )
    if a.coverage is not None:
        clf.trust.qhat(a.coverage)  # a model without conformal scores (or a multi-label one) fails before any image is read
    if clf.multilabel and a.unknown_threshold is not None:
        print("imgcls: --unknown-threshold does not apply to a multi-label model (a threshold per label instead); ignored", file=sys.stderr)
    paths = expand_inputs(a.paths)
    if not paths:
        print("imgcls: no input images", file=sys.stderr)
        return 1
    # A multi-label answer is its labels plus every label's score, so it keeps its "probabilities".
    results = list(clf.iter_predict(paths, top_k=a.top_k, batch_size=a.batch_size, probabilities=clf.multilabel, coverage=a.coverage))
    n_ok = sum("error" not in r for r in results)
    if a.explain and n_ok:
        from imgcls.predict import write_explanations

        written = write_explanations(a.model, results, a.explain)
        n = sum("overlay" in r for r in written)
        print(f"imgcls: {n} Grad-CAM overlays (each for its predicted label) in {a.explain}", file=sys.stderr)
    if a.json:
        print(json.dumps(results, indent=2))
    elif clf.multilabel:
        _write_multilabel(results, clf.class_names, a.csv)
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


def _predict_ray(a: argparse.Namespace) -> int:
    """`imgcls predict --engine ray --out FILE`: Ray actors answer, one row per file in FILE."""
    problem = (
        "--out needs --engine ray (the local engine prints --json or --csv)"
        if a.engine != "ray"
        else "--engine ray needs --out FILE.parquet or FILE.csv"
        if not a.out
        else "--engine ray writes its rows to --out; --json, --csv and --explain are for the local engine"
        if a.json or a.csv or a.explain
        else ""
    )
    if problem:
        print(f"imgcls: {problem}", file=sys.stderr)
        return 2
    from imgcls.predict import expand_inputs

    paths = expand_inputs(a.paths)
    if not paths:
        print("imgcls: no input images", file=sys.stderr)
        return 1
    load_kwargs = {"device": a.device, "backend": a.backend, "tta": a.tta, "unknown_threshold": a.unknown_threshold}
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    try:  # Ray or pyarrow missing: the message names `pip install "imgcls[ray]"`
        from imgcls.predict_ray import predict_to_file

        n, n_err = predict_to_file(
            a.model, paths, a.out, a.address, a.workers, a.threads or 1, a.top_k, a.batch_size, a.coverage, load_kwargs, log=log
        )
    except ModuleNotFoundError as e:
        print(f"imgcls: {e}", file=sys.stderr)
        return 2
    unread = f"; {n_err} of {n} inputs could not be read (their rows give the error)" if n_err else ""
    print(f"imgcls: {n} rows in {a.out}{unread}", file=sys.stderr)
    return 0 if n_err < n else 1


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


def _write_multilabel(results: list[dict[str, Any]], class_names: list[str], as_csv: bool) -> None:
    """predict's multi-label output: CSV rows (path, labels joined by ';', one score column per
    label, error) or text lines "path: label score, label score" (labels above their thresholds)."""
    if as_csv:
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(["path", "labels", *class_names, "error"])
        for r in results:
            probs = r.get("probabilities", {})
            scores = [f"{probs[c]:.6f}" if c in probs else "" for c in class_names]
            w.writerow([r["path"], ";".join(x["label"] for x in r.get("labels", [])), *scores, r.get("error", "")])
        return
    for r in results:
        if "error" in r:
            print(f"{r['path']}: ERROR: {r['error']}")
        else:
            shown = ", ".join(f"{x['label']} {x['score']:.3f}" for x in r["labels"]) or "(no label above its threshold)"
            print(f"{r['path']}: {shown}")


def _note_unknown(results: list[dict[str, Any]], trust: Any) -> None:
    n = sum("best_guess" in r for r in results)
    if n:
        print(
            f"imgcls: {n} of {len(results)} images answered 'unknown': {trust.unknown_method} below {trust.unknown_threshold:.4g} "
            "(--unknown-threshold sets another threshold, 0 turns this off)",
            file=sys.stderr,
        )


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
        max_upload_mb=a.max_upload_mb,
        max_images=a.max_images,
        max_batch=a.max_batch,
        batch_wait_ms=a.batch_wait_ms,
        queue_size=a.queue_size,
        batching=not a.no_batching,
        decode_workers=a.decode_workers,
        body_timeout_s=a.body_timeout_s,
        max_client_requests=a.max_client_requests,
        max_decoded_mb=a.max_decoded_mb,
        decode_budget_mb=a.decode_budget_mb,
        default_top_k=a.default_top_k,
        buckets=a.buckets,
        compile=a.compile,
    )
    if a.threads:
        set_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    clf = Classifier.load(
        a.model, device=a.device, precision=a.precision, backend=a.backend, unknown_threshold=a.unknown_threshold, threads=a.threads or None
    )
    run_server(clf, settings, host=a.host, port=a.port)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from pathlib import Path

    from imgcls.export import ONNX_FILE, export_onnx

    export_onnx(a.model, a.out or Path(a.model) / ONNX_FILE, opset=a.opset, quantize=a.quantize, data=a.data)
    return 0


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


def cmd_audit(a: argparse.Namespace) -> int:
    from imgcls.audit import AuditOptions, format_summary, run_audit, write_report

    given = {
        "features": "none" if a.no_features else a.model,
        "feature_size": a.feature_size,
        "folds": a.folds,
    }  # None: the library's default
    options = AuditOptions(
        **{k: v for k, v in given.items() if v is not None},
        seed=a.seed,
        workers=a.workers,
        precision=a.precision,
        allow_outside_root=a.allow_outside_root,
    )
    report = run_audit(a.data, options, progress=not a.quiet, log=lambda s: print(s, file=sys.stderr))
    json_path, html_path = write_report(report, a.out)
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_summary(report))
        print(
            f"\nreport: {html_path}  (all findings: {json_path}; train without "
            f"the suggested files: imgcls train ... --exclude-from {json_path})"
        )
    return 0
