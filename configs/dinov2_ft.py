"""Full fine-tuning of DINOv2 with layer-wise learning-rate decay, on your own folder of images.

    python -m jaxclf.train --config configs/dinov2_ft.py:s \\
        --config.data.root=/path/to/images      # train/<class>/* (and val/<class>/*, else 15% held out)
    python -m jaxclf.evaluate --workdir runs/dinov2_ft_s

ARG picks the weights as in configs/dinov2_linear_probe.py (s, b, l, or s_reg4, b_reg4, l_reg4): DINOv2
from timm's hub files, 518 px position embedding resampled (bicubic) to 224 px, a new zero head.

The recipe is the BEiT / DINOv2 fine-tuning one scaled to a small data set: AdamW (lr 5e-5 at batch 64,
weight decay 0.05 on weight matrices only), layer decay 0.75 (the head at lr, block i at
lr * 0.75 ** (13 - i) for ViT-S/B's 12 blocks, the embeddings lowest; `model.layer_id`), stochastic depth
0.1, gradient clipping at 1.0, one warmup epoch then cosine, label smoothing 0.1, 30 epochs with early
stopping on val/accuracy (patience 5 evaluations). For ViT-L raise drop_path_rate to 0.2 and layer decay to 0.8.

Expected result: not reproduced with jaxclf (no pretrained weights on these machines), and no published
number goes with this exact recipe. Compare with the linear probe (configs/dinov2_linear_probe.py) on the
same folder: fine-tuning should beat it once there are a few hundred images per class.
"""

import os

from jaxclf.config import base_config, import_file

# The ARG -> model and weights rule is the linear probe config's (one place for both recipes).
dinov2_model = import_file(os.path.join(os.path.dirname(__file__), "dinov2_linear_probe.py")).dinov2_model


def get_config(arg: str = "s"):
    config = base_config()
    config.model_name, config.model_init = dinov2_model(arg)
    config.model.img_size = 224
    config.model.drop_path_rate = 0.1
    config.model_init_pos_interpolation = "bicubic"
    config.data.val_fraction = 0.15  # used only when the folder has no val/
    config.data.pp_train = "decode|inception_crop(224, scale=(0.35, 1.0))|flip_lr|color_jitter(0.2, 0.2, 0.2)"
    config.data.pp_eval = "decode|resize_small(256)|central_crop(224)"
    config.batch_size = 64
    config.num_epochs = 30.0
    config.optim.name = "adamw"
    config.optim.lr = 5e-5
    config.optim.weight_decay = 0.05
    config.optim.layer_decay = 0.75
    config.optim.clip_grad_norm = 1.0
    config.optim.warmup_epochs = 1.0
    config.optim.schedule = "cosine"
    config.label_smoothing = 0.1
    config.early_stopping_patience = 5
    return config
