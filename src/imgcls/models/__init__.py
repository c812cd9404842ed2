"""Model registry and the architectures it holds.

Each architecture module registers its models with `@register_model`; they are imported here,
explicitly, so `create_model` knows every name once `imgcls.models` is imported.
"""

from imgcls.models import efficientnet_lite, resnet, small_cnn, vgg  # noqa: F401  (each registers its models)
from imgcls.models.registry import MissingWeightsError, ModelEntry, create_model, get_entry, list_models, register_model

__all__ = ["MissingWeightsError", "ModelEntry", "create_model", "get_entry", "list_models", "register_model"]
