"""A seconds-long config that learns the 16 px digits well: a 3-layer CNN for the continual and distillation tests.

Usage: `--config tests/small_cnn_config.py:ROOT` with ROOT a digits folder a test wrote
(jaxclf.data.digits.write_digits_folder(ROOT, image_size=16)). tests/tiny_config.py's model pools
one conv layer globally and stays near 50% on the digits; this one keeps the layout (flatten).
"""

from flax import nnx

from jaxclf import models
from jaxclf.config import base_config


class SmallCNN(models.Classifier):
    """Conv-ReLU, Conv(stride 2)-BatchNorm-ReLU, Conv(stride 2)-ReLU, flatten, Linear."""

    def __init__(self, num_classes: int, rngs: nnx.Rngs, dtype=None, width: int = 16, image_size: int = 16):
        self.conv1 = nnx.Conv(3, width, (3, 3), rngs=rngs, dtype=dtype)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs, dtype=dtype)
        self.bn = nnx.BatchNorm(2 * width, rngs=rngs, dtype=dtype)
        self.conv3 = nnx.Conv(2 * width, 2 * width, (3, 3), strides=2, rngs=rngs, dtype=dtype)
        self.head = nnx.Linear(2 * width * (image_size // 4) ** 2, num_classes, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.bn(self.conv2(x)))
        x = nnx.relu(self.conv3(x))
        return self.head(x.reshape(x.shape[0], -1))


if "small_cnn" not in models.list_models():

    @models.register("small_cnn")
    def small_cnn(num_classes, rngs, dtype, width: int = 16, image_size: int = 16):
        return SmallCNN(num_classes, rngs, dtype, width, image_size)


def get_config(root: str = ""):
    config = base_config()
    config.model_name = "small_cnn"
    config.data.root = root
    config.data.pp_train = "decode|inception_crop(16, scale=(0.7, 1.0), ratio=(0.9, 1.1))"
    config.data.pp_eval = "decode"
    config.data.mean = (0.5, 0.5, 0.5)
    config.data.std = (0.5, 0.5, 0.5)
    config.data.num_workers = 0
    config.batch_size = 32
    config.total_steps = 150
    config.optim.name = "adamw"
    config.optim.lr = 3e-3
    config.optim.weight_decay = 1e-4
    config.log_every_steps = 50
    config.eval_every_epochs = 1000.0  # evaluate at the end only
    return config
