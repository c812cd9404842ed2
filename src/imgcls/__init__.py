"""imgcls: image classification from a folder of labeled images.

Python API: `imgcls.load(MODEL_DIR).predict(images)`. Heavy modules (torch) load on first use,
so importing imgcls (and `imgcls --help`) stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from imgcls.predict import Classifier


def load(path: str, **kwargs: Any) -> Classifier:
    """Load a trained model folder for prediction: `imgcls.load("runs/x").predict("cat.jpg")`."""
    from imgcls.predict import Classifier

    return Classifier.load(path, **kwargs)


__all__ = ["__version__", "load"]
