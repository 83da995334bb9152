"""The tutorial case: an ImageNet ResNet-18 fine-tuned on your own folder of a few hundred images per class.

    python -m jaxclf.train --config configs/small_folder.py \\
        --config.data.root=/path/to/images      # train/<class>/* (and val/<class>/*, else 15% held out)

The weights are torchvision's ImageNet ResNet-18 (IMAGENET1K_V1, as the tutorials use), from the
Hugging Face hub as timm/resnet18.tv_in1k: downloaded on first use and converted once.

What the PyTorch transfer-learning tutorials do, with the defaults a small data set needs: 224 px,
random-resized crop, flip and light colour jitter; SGD with momentum 0.9 and a cosine schedule
after one warmup epoch; label smoothing 0.1; 30 epochs with early stopping (patience 5
evaluations) on val/accuracy, keeping the best checkpoint. Imbalanced classes: add
--config.data.class_weights=balanced or --config.data.sampling=balanced. No published number
goes with this recipe; it is a starting point (set --config.model_init='' to train from scratch).
"""

from jaxclf.config import base_config


def get_config():
    config = base_config()
    config.model_name = "resnet18"
    config.model_init = "timm/resnet18.tv_in1k"
    config.data.val_fraction = 0.15  # used only when the folder has no val/
    config.data.pp_train = "decode|inception_crop(224, scale=(0.35, 1.0))|flip_lr|color_jitter(0.2, 0.2, 0.2)"
    config.data.pp_eval = "decode|resize_small(256)|central_crop(224)"
    config.batch_size = 32
    config.num_epochs = 30.0
    config.optim.name = "sgd"
    config.optim.momentum = 0.9
    config.optim.lr = 0.01
    config.optim.weight_decay = 1e-4
    config.optim.warmup_epochs = 1.0
    config.label_smoothing = 0.1
    config.early_stopping_patience = 5
    return config
