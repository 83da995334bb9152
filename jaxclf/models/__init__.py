"""Image classifiers: the `Classifier` interface, the registry, and the registered families.

`models.create("resnet50", num_classes=10)` builds any registered model (jaxclf/models/base.py). A
family is one file that calls `register`; the families registered are the ones imported below.
"""

from jaxclf.models.base import (  # noqa: F401 (the package's interface)
    DTYPES,
    REMAT_POLICIES,
    Classifier,
    create,
    create_model,
    family,
    list_models,
    matches,
    options,
    register,
    remat_block,
)
from jaxclf.models import convnext, efficientnet, eva, resnet, resnetv2, vit  # noqa: F401,E402 (each registers its model names)
