"""The pointing game for every model family at realistic sizes (issue 13): does the Grad-CAM map's
peak fall on the small patch that alone decides the class?

    python bench/pointing.py [--families small_cnn,resnet18,vgg11_bn,efficientnet_lite0] [--seeds 0 1 2]
                             [--size PX] [--n-train N] [--epochs E] [--n-test N] [--quick] [--no-wait]

The task, the training and the scoring are tests/test_pointing.py's (imported from there): noise
images with a red or blue square (the class) and a yellow one (in every image) at random places;
small_cnn, ResNet-18 and VGG-11-BN trained from scratch with AdamW and `train_one_epoch`,
EfficientNet-Lite0 a linear probe on its ImageNet features; a hit is the map's peak within half a
cell of the target layer of the patch. Here the images are larger (REALISTIC below; --size sets one
size for all, the patch scaled with it), there are more of them, and each family runs once per
seed. --quick plays the test suite's games instead (the sizes the tests use), to compare.

Prints a markdown table per seed and one over the seeds: family, image size, target layer and its
cells a side, training seconds, train accuracy, held-out accuracy, hit rate with the default target
layer and with the standard one (the last conv block, what pytorch-grad-cam reads, with its cells
and its own chance: a 1-cell map "hits" everything within half a cell), the chance hit rate of a
random peak, and the seconds per explanation (a batch of 16 per forward/backward pass, decoding and
the overlay included). Expected run time on 2 idle cores, estimated from the per-step costs of the
test-size runs (not run at these sizes here): about 10 minutes per seed, 30 for the default 3
seeds, most of it training ResNet-18 and VGG-11 from scratch at 128 px; --seeds 0 for one;
--quick about 1-2 minutes per seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))
from common import machine_summary, markdown_table, wait_for_quiet  # noqa: E402

from imgcls.inference.targets import candidate_layers  # noqa: E402
from imgcls.models import MissingWeightsError  # noqa: E402
from imgcls.runtime import batched_logits  # noqa: E402
from test_pointing import GAMES, Game, patch_set, play, train_model  # noqa: E402

REALISTIC = {
    "small_cnn": Game("small_cnn", size=64, patch=16, n_train=256, epochs=4, lr=3e-3),
    "resnet18": Game("resnet18", size=128, patch=24, n_train=256, epochs=4, lr=1e-3),
    "vgg11_bn": Game("vgg11_bn", size=128, patch=24, n_train=256, epochs=4, lr=3e-4, model_kwargs={"dropout": 0.0}),
    "efficientnet_lite0": Game("efficientnet_lite0", size=224, patch=40, n_train=256),
}
HEADER = ["family", "image px", "patch px", "layer (cells)", "train s", "train acc", "test acc", "hit rate", "standard layer", "chance"]
HEADER += ["s / explanation"]


def game_for(arch: str, args: argparse.Namespace) -> Game:
    game = (GAMES if args.quick else REALISTIC)[arch]
    if args.size:
        game = dataclasses.replace(game, size=args.size, patch=max(2, round(game.patch * args.size / game.size)))
    if args.n_train:
        game = dataclasses.replace(game, n_train=args.n_train)
    if args.epochs and not game.pretrained:
        game = dataclasses.replace(game, epochs=args.epochs)
    return game


def run_one(arch: str, game: Game, seed: int, n_test: int) -> list[object] | None:
    """Train and play one family once; the table row, or None when its weights are missing."""
    rng = np.random.default_rng(seed)
    images, labels, _ = patch_set(game.n_train, game.size, game.patch, rng)
    t0 = time.perf_counter()
    try:
        model = train_model(game, images, labels, seed)
    except MissingWeightsError as e:
        print(f"{arch}: skipped ({e})")
        return None
    train_s = time.perf_counter() - t0
    logits = batched_logits(model, images, game.spec(), device=torch.device("cpu"))  # (N, 2)
    train_acc = float((logits.argmax(1).numpy() == labels).mean())
    state = rng.bit_generator.state  # both layers explain the same held-out images
    score = play(model, game, n_test, rng)
    rng.bit_generator.state = state
    standard = play(model, game, n_test, rng, layer=candidate_layers(model)[0].name)
    return [
        arch,
        game.size,
        game.patch,
        f"{score.layer} ({score.cells})",
        f"{train_s:.1f}",
        f"{train_acc:.2f}",
        f"{score.accuracy:.2f}",
        f"{score.hit_rate:.2f}",
        f"{standard.hit_rate:.2f} ({standard.layer} {standard.cells}, chance {standard.chance:.2f})",
        f"{score.chance:.2f}",
        f"{score.seconds_per_image:.3f}",
    ]


def summarise(rows: list[list[object]]) -> list[list[object]]:
    """One row per family over the seeds: mean (min-max) of the hit rates and accuracies."""
    out = []
    for arch in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == arch]

        def span(i: int, mine: list[list[object]] = mine, fmt: str = ".2f") -> str:
            v = [float(str(r[i]).split()[0]) for r in mine]
            return f"{np.mean(v):{fmt}} ({min(v):{fmt}}-{max(v):{fmt}})" if len(v) > 1 else f"{v[0]:{fmt}}"

        first = mine[0]
        standard_layer = str(first[8]).split(" ", 1)[1]
        out.append(
            [
                arch,
                first[1],
                first[2],
                first[3],
                span(4),
                span(5),
                span(6),
                span(7),
                f"{span(8)} {standard_layer}",
                first[9],
                span(10, fmt=".3f"),
            ]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(REALISTIC), help="comma-separated model names")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, help="one image size for every family (the patch scales with it)")
    p.add_argument("--n-train", type=int, help="training images (default: per family, see REALISTIC)")
    p.add_argument("--epochs", type=int, help="epochs for the families trained from scratch")
    p.add_argument("--n-test", type=int, default=100, help="held-out images explained per family and seed")
    p.add_argument("--quick", action="store_true", help="the test suite's games (tests/test_pointing.py GAMES)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine before timing")
    args = p.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in REALISTIC]
    if unknown:
        p.error(f"unknown families {unknown}; choose from {', '.join(REALISTIC)}")
    print(f"# pointing game: {machine_summary()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"command: python bench/pointing.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    rows = []
    for seed in args.seeds:
        if not args.no_wait:
            load, waited, noisy = wait_for_quiet()
            print(f"seed {seed}: load {load:.2f}{' (noisy: timings under load)' if noisy else ''}")
        seed_rows = [row for arch in families if (row := run_one(arch, game_for(arch, args), seed, args.n_test)) is not None]
        print(f"\n## seed {seed}\n\n{markdown_table(HEADER, seed_rows)}\n", flush=True)
        rows += seed_rows
    if len(args.seeds) > 1 and rows:
        print(f"## over seeds {' '.join(map(str, args.seeds))}: mean (min-max)\n\n{markdown_table(HEADER, summarise(rows))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
