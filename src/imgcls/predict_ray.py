"""Batch prediction on a Ray cluster: `imgcls predict MODEL DIR --engine ray --out preds.parquet`.

The paths become a Ray dataset (`ray.data.from_items`); an actor pool (`map_batches` with
`Predictor`, a callable class) loads the model once per actor and answers each batch with
`Classifier.iter_predict`, the single-process path itself: imgcls's own decoder, the same
preprocessing, TTA, calibration and "unknown" rule, and a file that cannot be read becomes a row
with its "error", as in `imgcls predict --json`. The driver streams the rows, in input order, into
one Parquet or CSV file. MODEL and the files must be readable at the same paths on every node
(shared storage); without an address a local Ray starts on 127.0.0.1 only.

Needs the `ray` extra (`pip install "imgcls[ray]"`); `imgcls.cli` imports this module only for
--engine ray, and this module imports Ray only in `import_ray`, so that a local Ray can be kept
on the loopback interface.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from imgcls.predict import DECODE_CHUNK, Classifier

if TYPE_CHECKING:
    import ray.data

INSTALL_HINT = 'pip install "imgcls[ray]"'


def _missing(e: ModuleNotFoundError) -> ModuleNotFoundError:
    return ModuleNotFoundError(f"--engine ray needs {e.name}, which is not installed: {INSTALL_HINT}", name=e.name)


try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ModuleNotFoundError as e:  # the CLI prints this message
    raise _missing(e) from e

OUTPUT_SUFFIXES = (".parquet", ".csv")
# Nested answer fields: Parquet keeps them as lists/structs, CSV as JSON text.
NESTED_FIELDS = ("top_k", "best_guess", "set", "labels", "probabilities")


def answer_schema(class_names: list[str], multilabel: bool, coverage: bool) -> pa.Schema:
    """The columns of `imgcls predict --json`'s answers: path, label, score, top_k, best_guess
    (null unless "unknown"), set (with coverage) and error (null unless unreadable); a multi-label
    model's: path, labels, probabilities (one field per class) and error."""
    scored = pa.struct([("label", pa.string()), ("score", pa.float64())])
    if multilabel:
        probabilities = pa.struct([(c, pa.float64()) for c in class_names])
        fields = [("path", pa.string()), ("labels", pa.list_(scored)), ("probabilities", probabilities)]
    else:
        fields = [("path", pa.string()), ("label", pa.string()), ("score", pa.float64())]
        fields += [("top_k", pa.list_(scored)), ("best_guess", scored)]
        fields += [("set", pa.list_(pa.string()))] if coverage else []
    return pa.schema([*fields, ("error", pa.string())])


class Predictor:
    """Ray Data's callable class: loads the model once per actor, then answers batches of paths.

    load_kwargs go to `Classifier.load`; top_k, batch_size and coverage to `iter_predict`, whose
    decode threads number `threads` (the actor's CPUs) too.
    """

    def __init__(
        self, model: str, load_kwargs: dict[str, Any], top_k: int, batch_size: int | None, coverage: float | None, threads: int
    ) -> None:
        self.clf = Classifier.load(model, **load_kwargs)
        self.schema = answer_schema(self.clf.class_names, self.clf.multilabel, coverage is not None)
        self.top_k, self.batch_size, self.coverage, self.threads = top_k, batch_size, coverage, threads

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        paths = [str(p) for p in batch["path"]]
        results = self.clf.iter_predict(
            paths,
            top_k=self.top_k,
            batch_size=self.batch_size,
            workers=self.threads,
            probabilities=self.clf.multilabel,  # as `imgcls predict --json`: a multi-label answer keeps its scores
            coverage=self.coverage,
        )
        return pa.Table.from_pylist(list(results), schema=self.schema)


def import_ray(local: bool) -> ModuleType:
    """`ray` with `ray.data`; ModuleNotFoundError naming the extra when Ray is not installed.

    local: a Ray this process will start itself, kept on 127.0.0.1. Ray resolves even
    `_node_ip_address="127.0.0.1"` to the machine's outward address and listens on every interface,
    unless its cluster support is off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when Ray is first
    imported): then the driver, GCS, raylet and workers bind to 127.0.0.1 only (checked with
    `ss -tlnp`, Ray 2.60). Usage stats are off too (RAY_USAGE_STATS_ENABLED=0).
    """
    if local and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data
    except ModuleNotFoundError as e:
        raise _missing(e) from e
    return ray


def start_ray(address: str | None, num_cpus: int, log: Callable[[str], None] | None = None) -> bool:
    """Connect to the Ray cluster at `address`, or start a local Ray with `num_cpus` CPUs on
    127.0.0.1 (`import_ray`; no dashboard). Returns True when this call started or connected Ray
    (the caller shuts it down), False when Ray was already initialised."""
    ray = import_ray(local=not address)
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        return True
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ip = ray.util.get_node_ip_address()
    if ip != "127.0.0.1" and log:
        log(f"imgcls: the local Ray listens on {ip}, not only 127.0.0.1 (Ray was imported before imgcls could set it up)")
    return True


def predict_dataset(
    model: str,
    paths: list[str],
    num_workers: int,
    threads: int = 1,
    top_k: int = 5,
    batch_size: int | None = None,
    coverage: float | None = None,
    load_kwargs: dict[str, Any] | None = None,
) -> ray.data.Dataset:
    """The Ray dataset of answers for `paths`, in input order: `num_workers` actors (fewer for
    fewer blocks) of `threads` CPUs each (a GPU each for device "cuda"), each with the model loaded
    once (`Predictor`). Ray must be initialised (`start_ray`)."""
    ray = import_ray(local=False)
    load_kwargs = {"compile": "off", **(load_kwargs or {}), "threads": threads}  # many short actor calls: compiling would not pay
    per_call = batch_size or DECODE_CHUNK  # rows per actor call: one forward pass with --batch-size
    items = [{"path": p} for p in paths]
    # Blocks of at most per_call rows, and at least one per actor: a short list still keeps every actor busy.
    num_blocks = max(1, min(len(items), max(math.ceil(len(items) / per_call), num_workers)))
    ds = ray.data.from_items(items, override_num_blocks=num_blocks)
    # Rows in input order. Dataset.context (newer Ray) is this dataset's own; older Ray has only the process's.
    ctx = getattr(ds, "context", None) or ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # imgcls prints its own summary
    gpus = 1 if str(load_kwargs.get("device", "")).startswith("cuda") else 0
    return ds.map_batches(
        Predictor,
        batch_size=per_call,
        compute=ray.data.ActorPoolStrategy(size=min(num_workers, num_blocks)),
        fn_constructor_kwargs={
            "model": model,
            "load_kwargs": load_kwargs,
            "top_k": top_k,
            "batch_size": batch_size,
            "coverage": coverage,
            "threads": threads,
        },
        num_cpus=threads,
        num_gpus=gpus,
    )


def iter_rows(ds: ray.data.Dataset) -> Iterator[pa.Table]:
    """The dataset's answers as Arrow tables, in input order, as the actors finish them."""
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def write_predictions(tables: Iterable[pa.Table], out: str | os.PathLike, schema: pa.Schema) -> tuple[int, int]:
    """Stream answer tables into one .parquet or .csv file (`OUTPUT_SUFFIXES`); CSV keeps the
    nested fields as JSON text. Written to OUT.tmp, then renamed. Returns (rows, error rows)."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"{out}: the output must end in .parquet or .csv")
    tmp = out.with_name(out.name + ".tmp")
    n = n_err = 0
    with open(tmp, "w", newline="", encoding="utf-8") if suffix == ".csv" else open(tmp, "wb") as f:
        parquet = pq.ParquetWriter(f, schema) if suffix == ".parquet" else None
        writer = csv.writer(f) if parquet is None else None
        if writer is not None:
            writer.writerow(schema.names)
        for table in tables:
            table = table.select(schema.names).cast(schema)
            n, n_err = n + table.num_rows, n_err + table.num_rows - table.column("error").null_count
            if parquet is not None:
                parquet.write_table(table)
            else:
                writer.writerows(_csv_row(r, schema.names) for r in table.to_pylist())
        if parquet is not None:
            parquet.close()
    tmp.replace(out)
    return n, n_err


def _csv_row(row: dict[str, Any], names: list[str]) -> list[Any]:
    def cell(k: str) -> Any:
        v = row[k]
        if v is None:
            return ""
        return json.dumps(v) if k in NESTED_FIELDS else repr(v) if isinstance(v, float) else v

    return [cell(k) for k in names]


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A file from `write_predictions` -> the answers as `imgcls predict --json` gives them (empty
    fields left out)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        rows = pq.read_table(path).to_pylist()
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [_parse_csv_row(r) for r in csv.DictReader(f)]
    return [{k: v for k, v in r.items() if v is not None} for r in rows]


def _parse_csv_row(row: dict[str, str]) -> dict[str, Any]:
    def parse(k: str, v: str) -> Any:
        if v == "":
            return None
        return json.loads(v) if k in NESTED_FIELDS else float(v) if k == "score" else v

    return {k: parse(k, v) for k, v in row.items()}


def predict_to_file(
    model: str,
    paths: list[str],
    out: str | os.PathLike,
    address: str | None = None,
    num_workers: int = 2,
    threads: int = 1,
    top_k: int = 5,
    batch_size: int | None = None,
    coverage: float | None = None,
    load_kwargs: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[int, int]:
    """`imgcls predict --engine ray`: answers for `paths` from `num_workers` Ray actors, written to
    `out` (.parquet or .csv), one row per path. The model is loaded here once first, so a bad
    MODEL or --coverage fails before Ray starts. Returns (rows, error rows)."""
    if Path(out).suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"{out}: the output must end in .parquet or .csv")
    ray = import_ray(local=not address)  # a missing Ray fails before the model loads
    clf = Classifier.load(model, **{**(load_kwargs or {}), "compile": "off"})
    if coverage is not None:
        clf.trust.qhat(coverage)  # no conformal scores: a ValueError now, not in every actor
    schema = answer_schema(clf.class_names, clf.multilabel, coverage is not None)
    started = start_ray(address, num_workers * threads, log)
    try:
        if log:
            cpus = ray.cluster_resources().get("CPU", 0)
            log(f"imgcls: Ray, {len(paths)} files, {num_workers} actors of {threads} CPU(s) on a cluster of {cpus:g} CPUs")
        ds = predict_dataset(model, paths, num_workers, threads, top_k, batch_size, coverage, load_kwargs)
        return write_predictions(iter_rows(ds), out, schema)
    finally:
        if started:
            ray.shutdown()
