"""Quickstart: ResNet-18 from scratch on scikit-learn's digits, written once as an image folder.

    make quickstart
    # = python -m jaxclf.train --config configs/quickstart.py   (workdir: runs/quickstart)

The 1,797 8x8 digits are upscaled to 32x32 PNGs under ~/.cache/jaxclf/digits (train/val, 80/20,
stratified) and read back through the same image-folder source as your own data. Expected on a
2-core CPU: >= 97% val/accuracy in about two minutes of training.
"""

import os

from jaxclf.config import base_config


def get_config():
    config = base_config()
    config.model_name = "resnet18"

    config.data.root = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "jaxclf", "digits")
    config.data.prepare = "sklearn_digits"
    # Digits must not be flipped; a mild random-resized crop is the augmentation.
    config.data.pp_train = "decode|inception_crop(32, scale=(0.6, 1.0), ratio=(0.8, 1.25))"
    config.data.pp_eval = "decode|central_crop(32)"
    config.data.mean = (0.5, 0.5, 0.5)
    config.data.std = (0.5, 0.5, 0.5)

    config.batch_size = 64
    config.num_epochs = 15.0
    config.optim.name = "sgd"
    config.optim.lr = 0.1
    config.optim.weight_decay = 5e-4
    config.optim.warmup_epochs = 1.0
    config.label_smoothing = 0.1
    config.log_every_steps = 20
    return config
