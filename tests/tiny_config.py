"""A seconds-long training config for tests: a tiny CNN on the digits folder at 16 px.

Usage: `--config tests/tiny_config.py:ROOT` where ROOT is a digits folder the test wrote
(jaxclf.data.digits.write_digits_folder(ROOT, image_size=16)). Registering the model here shows
the researcher's path too: a config file may define and register its own model.
"""

from flax import nnx

from jaxclf import models
from jaxclf.config import base_config


class TinyCNN(models.Classifier):
    """Conv(stride 2) + BatchNorm + global pool + Linear: cheap, yet has batch statistics."""

    def __init__(self, num_classes: int, rngs: nnx.Rngs, dtype=None, width: int = 16):
        self.conv = nnx.Conv(3, width, (3, 3), strides=2, rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))


if "tiny_cnn" not in models.list_models():

    @models.register("tiny_cnn")
    def tiny_cnn(num_classes, rngs, dtype, width: int = 16):
        return TinyCNN(num_classes, rngs, dtype, width)


def get_config(root: str = ""):
    config = base_config()
    config.model_name = "tiny_cnn"
    config.data.root = root
    config.data.pp_train = "decode|inception_crop(16, scale=(0.6, 1.0))"
    config.data.pp_eval = "decode"
    config.data.mean = (0.5, 0.5, 0.5)
    config.data.std = (0.5, 0.5, 0.5)
    config.data.num_workers = 0
    config.batch_size = 32
    config.total_steps = 12
    config.optim.lr = 0.1
    config.log_every_steps = 4
    config.eval_every_epochs = 1000.0  # evaluate at the end only
    return config
