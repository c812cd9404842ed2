"""`imgcls demo`: the whole path on real data that ships with scikit-learn, offline.

The data are the 1,797 8x8 handwritten digit scans of the UCI "Optical Recognition of
Handwritten Digits" set (`sklearn.datasets.load_digits`). They are written out as PNG files in
train/ and test/ class folders (stratified, 20% test, seed 0), so the demo exercises the same
folder indexing, decoding, caching, training, evaluation and prediction a user's data goes through.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from imgcls.atomic import atomic_path


def write_digits(root: Path, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write the digits as DATA/{train,test}/<digit>/NNNN.png (8x8 greyscale); return DATA."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels -> 0..255
    idx = np.arange(len(images))
    tr, te = train_test_split(idx, test_size=test_fraction, stratify=digits.target, random_state=seed)
    for split, ids in (("train", tr), ("test", te)):
        for i in ids:
            d = root / split / str(digits.target[i])
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"{i:04d}.png"
            if not path.exists():
                with atomic_path(path) as tmp:  # a run killed mid-write leaves no half PNG that `exists()` would keep
                    Image.fromarray(images[i], mode="L").save(tmp, format="PNG")
    return root


def run_demo(out: str | Path = "imgcls-demo", epochs: int = 20, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Write the digits, train with `--model auto` (the CLI's default; it picks small_cnn from scratch for
    8x8 scans and says why), evaluate on the held-out test split, predict a few."""
    from imgcls.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from imgcls.evaluate import evaluate
    from imgcls.predict import Classifier
    from imgcls.training.fit import fit
    from imgcls.transforms import AugmentSpec

    t0 = time.perf_counter()
    out = Path(out)
    data = write_digits(out / "digits")
    log(f"wrote scikit-learn's 1,797 handwritten digits (8x8) to {data}/train and {data}/test")
    cfg = RunConfig(
        data=DataConfig(path=str(data), img_size=16, val_fraction=0.1, seed=0),
        model=ModelConfig(name="auto"),  # what `imgcls train` does without --model
        # Digits are handed: no flips (so the recipe's test-time augmentation is translate only).
        # 16 px is enough for 8x8 scans and 4x cheaper than 32 px. Optimizer, learning rate, batch
        # size and schedule are the default recipe's (small_cnn from scratch: "fast").
        train=TrainConfig(out=str(out / "model"), epochs=epochs, augment=AugmentSpec(hflip=False, crop="translate", translate=0.125)),
    )
    run = fit(cfg, progress=progress, log=log, overwrite=True)  # OUT/model is the demo's own: a second demo replaces it
    m = evaluate(run, data, split="test", progress=progress, log=log)
    log(
        f"\ntest split: {m['num_samples']} images  accuracy {m['accuracy']:.4f}  "
        f"macro-F1 {m['macro_f1']:.4f}  balanced accuracy {m['balanced_accuracy']:.4f}"
    )
    clf = Classifier.load(run)
    rng = np.random.default_rng(0)
    test_files = sorted((data / "test").rglob("*.png"))
    picks = [test_files[i] for i in rng.choice(len(test_files), size=5, replace=False)]
    log("\npredictions on held-out test images:")
    for r in clf.predict([str(p) for p in picks], top_k=3):
        probs = "  ".join(f"{t['label']}:{t['score']:.3f}" for t in r["top_k"])
        guess = r.get("best_guess")  # an "unknown" answer still shows what the model thinks it is
        answer = f"unknown (best guess {guess['label']} {guess['score']:.3f})" if guess else f"{r['label']} ({r['score']:.3f})"
        log(f"  {Path(r['path']).relative_to(data)}  true {Path(r['path']).parent.name}  predicted {answer}   top-3 {probs}")
    log(f"\nmodel:  {run}  (model.safetensors + model.json)")
    log(f"report: {m['report']}")
    log(f"done in {time.perf_counter() - t0:.0f} s. Next: imgcls predict {run} IMAGE.png")
    return run
