"""Shared test setup: the helper modules next to the tests, and one small trained model."""

from __future__ import annotations

import pathlib
import sys

import pytest

TESTS_DIR = pathlib.Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `from synth import ...` also under --import-mode=importlib
    sys.path.insert(0, str(TESTS_DIR))

from synth import make_split_folders  # noqa: E402  (after the sys.path line)


def quiet(_: str) -> None:
    """A `log` callback that drops every message."""


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(run folder, data folder): small_cnn trained 3 epochs on train/valid/test split folders.

    Images are 24 px, mixed .png/.jpg/.PNG/.JPG; the model sees 16 px. Shared by the evaluate,
    predict and CLI tests, which only read the run folder (reports go to their own tmp folders).
    """
    from imgcls.config import DataConfig, RunConfig, TrainConfig
    from imgcls.training.fit import fit
    from imgcls.transforms import AugmentSpec

    base = tmp_path_factory.mktemp("trained")
    data = make_split_folders(base / "data", per_split={"train": 16, "valid": 6, "test": 6}, size=24, seed=1, ext="mixed")
    cfg = RunConfig(
        data=DataConfig(path=str(data), img_size=16, seed=0),
        train=TrainConfig(out=str(base / "run"), epochs=3, batch_size=8, augment=AugmentSpec(crop="translate")),
    )
    run = fit(cfg, progress=False, log=quiet)
    return run, data
