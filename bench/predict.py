"""Prediction speed: `Classifier.iter_predict` on image paths against a naive one-image loop,
and batch-1 latency of the forward pass.

    python bench/predict.py
    python bench/predict.py --naive-images 200 --latency-calls 100

Throughput: efficientnet_lite0 (pretrained ImageNet classifier, `Classifier.imagenet()`) on all
10,000 CIFAR-10 test JPEGs and the 1,360 Oxford-17 flower photos, through `iter_predict` (threads
decoding with JPEG draft mode, cache-sized batches, bf16 weights converted once on AMX CPUs),
once with `compile="off"` and once with the default `compile="auto"` (which compiles the model
with torch.compile when the job is long enough; the compile time is inside its figure). The
naive loop is what a first script does: open, convert, resize, centre-crop, normalise and run
one image at a time in fp32; it runs on the first --naive-images files of each set (it is slow)
and its images/s is compared with iter_predict's on all of them.

On the flowers it also runs the onnxruntime paths (issue 17): the same pretrained model saved as a
model folder under bench/out/predict/ and exported once (`export_onnx(..., quantize="int8")`,
calibrated on every 4th photo, half of those held out for the recorded agreement), then
iter_predict with backend onnx (fp32), onnx-int8, and auto (which of those the folder's files
allow, see `runners.choose_onnx_runner`), beside torch fp32 eager; each row gives img/s, the
ratio to the naive loop and top-1 agreement with the eager (bf16) row and with torch fp32 on all
photos, and the process's CPU ms per image (steadier than img/s on a shared machine: the same
path swung 36-115 img/s between runs at load 1.5-3). --backends picks the rows, --limit N runs
on N evenly spaced photos (a smoke check):

    python bench/predict.py --sets flowers --skip-latency --limit 100 --naive-images 50

Latency: one prepared image (decoded and resized) through `Classifier.predict_arrays`, p50/p99
over --latency-calls calls, for efficientnet_lite0 at 224 px and small_cnn at 32 px: the
Classifier as shipped (bf16 weights + channels_last converted once), the previous way (fp32
weights under bf16 autocast: every call re-casts the weights), plain fp32, and torch.compile
with freezing (compile time reported, not included in the latency), and, for efficientnet_lite0,
the exported folder through backend onnx and onnx-int8.
Waits for a quiet machine (1-minute load < 1.5) and records the load at start and end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
MAX_WAIT = [600.0]  # seconds to wait for a quiet machine before measuring anyway (marked noisy)
from common import DATASETS_DIR, OUT_DIR, load1, machine_summary, markdown_table, unpack, wait_for_quiet  # noqa: E402

ROWS = ("eager", "compile", "fp32", "onnx", "onnx-int8", "auto")  # --backends: the iter_predict rows
ONNX_ROWS = ("onnx", "onnx-int8", "auto")  # on the flowers only: the export is calibrated on them


def naive_loop(model, spec, paths: list[str]) -> float:
    """Seconds to predict `paths` one by one: PIL open/convert/resize/crop, NumPy normalise, fp32 forward."""
    import torch
    from PIL import Image

    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    s, c = spec.cache_size, spec.img_size
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in paths:
            with Image.open(p) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = s / min(w, h)
                im = im.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.Resampling.BILINEAR)
                left, top = (im.width - c) // 2, (im.height - c) // 2
                a = np.asarray(im.crop((left, top, left + c, top + c)), dtype=np.float32) / 255.0
            x = torch.from_numpy(((a - mean) / std).transpose(2, 0, 1).copy())[None]
            model(x).softmax(1)
    return time.perf_counter() - t0


def latency(fn, x, calls: int) -> tuple[float, float]:
    for _ in range(3):
        fn(x)
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3, ts[min(len(ts) - 1, int(round(0.99 * len(ts))) - 1)] * 1e3


def latency_rows(arch: str, calls: int, sample_path: str, onnx_dir: Path | None = None) -> list[list[object]]:
    import copy

    import torch

    from imgcls.models import create_model, get_entry
    from imgcls.predict import Classifier, TorchRunner
    from imgcls.runtime import prepare_inference_model

    entry = get_entry(arch)
    pretrained = arch != "small_cnn"
    model = create_model(arch, num_classes=entry.pretrained_classes if pretrained else 10, pretrained=pretrained).eval()
    meta = {
        "arch": arch,
        "class_names": [str(i) for i in range(entry.pretrained_classes if pretrained else 10)],
        "preprocess": entry.default_spec.to_dict(),
    }
    clf = Classifier(copy.deepcopy(model), meta)
    x = clf.prepare(sample_path)[None]  # (1, S, S, 3) uint8
    cpu = torch.device("cpu")
    variants = [("Classifier (bf16 weights converted once)", lambda a: clf.predict_arrays(a, 1))]
    fp32_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    variants.append(("fp32 weights + bf16 autocast per call (before)", TorchRunner(fp32_cl, clf.spec, cpu, torch.bfloat16)))
    variants.append(("fp32", TorchRunner(copy.deepcopy(model), clf.spec, cpu, None)))
    for backend in ("onnx", "onnx-int8") if onnx_dir is not None else ():
        onnx_clf = Classifier.load(onnx_dir, backend=backend)
        variants.append((f"Classifier, backend {backend} (onnxruntime)", lambda a, c=onnx_clf: c.predict_arrays(a, 1)))
    rows = []
    la0, _, noisy = wait_for_quiet(max_wait_s=MAX_WAIT[0])
    for name, fn in variants:
        with torch.inference_mode():
            p50, p99 = latency(fn, x, calls)
        rows.append([arch, name, f"{p50:.2f}", f"{p99:.2f}", ""])
    # torch.compile with freezing (inductor folds BN and prepacks the bf16 weights)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    bf16_model, _ = prepare_inference_model(copy.deepcopy(model), cpu, torch.bfloat16)
    compiled = torch.compile(bf16_model, dynamic=False)
    t0 = time.perf_counter()
    runner = TorchRunner(compiled, clf.spec, cpu, None)
    with torch.inference_mode():
        runner(x, 1)
        compile_s = time.perf_counter() - t0
        p50, p99 = latency(runner, x, calls)
    rows.append([arch, "torch.compile(freezing) on bf16 weights", f"{p50:.2f}", f"{p99:.2f}", f"compile {compile_s:.0f} s"])
    la1 = load1()
    for r in rows:
        r.append(f"{la0:.2f} / {la1:.2f}" + (" (noisy)" if noisy else ""))
    return rows


def _evenly(paths: list[str], n: int) -> list[str]:
    """n evenly spaced paths (all when n is 0 or more than there are): the lists are ordered by class."""
    if not n or n >= len(paths):
        return paths
    return [paths[i] for i in np.linspace(0, len(paths) - 1, n).round().astype(int)]


def export_folder(flowers: list[str]) -> Path:
    """bench/out/predict/lite0: pretrained efficientnet_lite0 as a model folder with model.onnx and
    model.int8.onnx, calibrated on every 4th flower photo (half of those held out for the recorded
    agreement). Made once; kept while its files are up to date."""
    from imgcls.artifact import save_artifact
    from imgcls.export import export_onnx
    from imgcls.inference.runners import ONNX_FILE, ONNX_INT8_FILE
    from imgcls.models import create_model, get_entry
    from imgcls.models.imagenet import imagenet_class_names

    out = OUT_DIR / "predict"
    folder, calib = out / "lite0", out / "calibration"
    if (folder / ONNX_INT8_FILE).is_file() and (folder / ONNX_INT8_FILE).stat().st_mtime >= (folder / "model.json").stat().st_mtime:
        return folder
    entry = get_entry("efficientnet_lite0")
    model = create_model("efficientnet_lite0", num_classes=1000, pretrained=True).eval()
    meta = {"arch": "efficientnet_lite0", "class_names": imagenet_class_names(), "preprocess": entry.default_spec.to_dict()}
    save_artifact(folder, model, meta)
    calib.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(flowers[::4]):  # a flat folder of links: unlabeled images for the export
        link = calib / f"{i:04d}{Path(p).suffix}"
        if not link.exists():
            link.symlink_to(Path(p).resolve())
    n = len(flowers[::4])
    print(f"exporting {folder} (onnx + int8: calibrated on half of {n} photos, agreement on the other half; 1-2 min)", flush=True)
    export_onnx(folder, folder / ONNX_FILE, quantize="int8", data=calib, log=lambda m: print(f"  {m}", flush=True))
    return folder


def throughput_rows(name: str, paths: list[str], fp32_model, a: argparse.Namespace, onnx_dir: Path | None) -> list[list[object]]:
    """iter_predict img/s per --backends row on `paths`, the naive loop on the first --naive-images,
    and each row's top-1 agreement with the eager and the torch fp32 rows."""
    from imgcls.predict import Classifier

    log = lambda msg: print(f"  {msg}", flush=True)  # noqa: E731
    factories = {
        "eager": lambda: Classifier.imagenet(compile="off", log=log),
        "compile": lambda: Classifier.imagenet(compile="auto", log=log),
        "fp32": lambda: Classifier.imagenet(compile="off", precision="fp32", log=log),
    }
    if onnx_dir is not None:
        factories.update({b: (lambda b=b: Classifier.load(onnx_dir, backend=b, log=log)) for b in ONNX_ROWS})
    for f in paths:
        Path(f).read_bytes()  # warm page cache for both sides
    la0, _, noisy = wait_for_quiet(max_wait_s=MAX_WAIT[0])
    rates, labels = {}, {}
    for key in [k for k in a.backends if k in factories]:
        clf = factories[key]()
        list(clf.iter_predict(paths[:64], probabilities=False))  # warm-up (too short to compile)
        t0, c0 = time.perf_counter(), time.process_time()
        results = list(clf.iter_predict(paths, probabilities=False))  # as `imgcls predict` runs it
        seconds, cpu_ms = time.perf_counter() - t0, (time.process_time() - c0) * 1e3 / len(paths)
        labels[key] = [r.get("label") for r in results]
        n_ok = sum("error" not in r for r in results)
        shown = f"auto -> {clf.meta.get('backend', 'torch')}" if key == "auto" else key
        rates[key] = (shown, n_ok / seconds, seconds, cpu_ms)
        print(f"{name}: iter_predict {shown} {n_ok / seconds:.1f} img/s, {cpu_ms:.1f} CPU ms/img", flush=True)
    naive = paths[: a.naive_images]
    slow = len(naive) / naive_loop(fp32_model, Classifier.imagenet(compile="off").spec, naive)
    print(f"{name}: naive {slow:.1f} img/s", flush=True)
    load = f"{la0:.2f} / {load1():.2f}" + (" (noisy)" if noisy else "")

    def agree(key: str, ref: str) -> str:
        if ref not in labels:
            return ""
        return f"{np.mean([x == y for x, y in zip(labels[key], labels[ref])]):.2%}"

    return [
        [name, len(paths), shown, f"{fast:.1f}", f"{s:.1f}", f"{cpu:.1f}", len(naive), f"{slow:.1f}", f"{fast / slow:.2f}x"]
        + [agree(key, "eager"), agree(key, "fp32"), load]
        for key, (shown, fast, s, cpu) in rates.items()
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--naive-images", type=int, default=300, help="files per set for the naive loop (default 300)")
    p.add_argument("--latency-calls", type=int, default=200)
    p.add_argument(
        "--sets",
        nargs="+",
        choices=["cifar10", "flowers"],
        default=["cifar10", "flowers"],
        help="image sets for the throughput table (default both)",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        choices=ROWS,
        default=list(ROWS),
        help="iter_predict rows: eager (bf16, compile off), compile (auto), fp32 (torch eager fp32), onnx, onnx-int8, "
        "auto (backend auto on the exported folder); the onnx ones on the flowers only (default all)",
    )
    p.add_argument("--limit", type=int, default=0, help="iter_predict on this many evenly spaced images per set (0: all)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for load < 1.5 before each measurement (default 600)")
    a = p.parse_args()
    print(f"machine: {machine_summary()}", flush=True)
    MAX_WAIT[0] = a.max_wait
    import torch

    from imgcls.data import index_dataset

    torch.set_num_threads(2)
    cifar = unpack(DATASETS_DIR / "cifar10-jpg.tar.gz")
    flowers = unpack(DATASETS_DIR / "oxford17-flowers.tar.gz")
    sets = [
        ("CIFAR-10 test (32x32 JPEG)", [p for p, _ in index_dataset(cifar / "test").splits["all"]]),
        ("Oxford-17 flowers (~500x666 JPEG)", [p for p, _ in index_dataset(flowers).splits["all"]]),
    ]
    chosen = [name for key, (name, _) in zip(("cifar10", "flowers"), sets) if key in a.sets]
    wants_onnx = ("flowers" in a.sets and not a.skip_throughput and set(a.backends) & set(ONNX_ROWS)) or not a.skip_latency
    onnx_dir = export_folder(sets[1][1]) if wants_onnx else None
    if not a.skip_throughput:
        from imgcls.models import create_model

        fp32_model = create_model("efficientnet_lite0", num_classes=1000, pretrained=True).eval()  # the naive loop's model: fp32, NCHW
        rows = []
        for key, (name, paths) in zip(("cifar10", "flowers"), sets):
            if name in chosen:
                rows += throughput_rows(name, _evenly(paths, a.limit), fp32_model, a, onnx_dir if key == "flowers" else None)
        header = ["images (efficientnet_lite0, 224 px)", "n", "path", "iter_predict img/s", "s", "CPU ms/img", "naive n", "naive img/s"]
        print()
        print(markdown_table([*header, "speed-up", "top-1 = eager", "top-1 = fp32", "load start/end"], rows))
    if not a.skip_latency:
        rows = latency_rows("efficientnet_lite0", a.latency_calls, sets[1][1][0], onnx_dir) + latency_rows(
            "small_cnn", a.latency_calls, sets[0][1][0]
        )
        print()
        print(markdown_table(["model", "batch-1 forward (prepared image)", "p50 ms", "p99 ms", "note", "load start/end"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
