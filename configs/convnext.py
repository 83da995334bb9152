"""Fine-tune ConvNeXt-T (ImageNet-12k, fine-tuned on ImageNet-1k) at 224 px on your own image folder
(train/<class>/*, val/<class>/*).

    python -m jaxclf.train --config configs/convnext.py --config.data.root=/path/to/images   # -> runs/convnext

The weights are timm's `timm/convnext_tiny.in12k_ft_in1k` (timm publishes 84.2% ImageNet-1k top-1), from the
Hugging Face hub on first use, converted once; any ConvNeXt size takes the same recipe
(--config.model_name=convnext_small --config.model_init=timm/convnext_small.in12k_ft_in1k).
The recipe is ConvNeXt's fine-tuning one (Liu et al., 2022, and timm's): AdamW, layer-wise lr decay 0.8
from the head down (one rate per block, from the model's own layer ids), stochastic depth 0.1, label
smoothing 0.1, cosine decay, mixup/cutmix lighter than pre-training's; lr 1e-4 per 256 images and weight
decay 0.05 for a dataset smaller than ImageNet. The head is replaced (zero-initialised) for your classes.
Expected result: not measured on this repository's machines (they reach no hub).
"""

from jaxclf.config import base_config


def get_config():
    config = base_config()
    config.model_name = "convnext_tiny"
    config.model_init = "timm/convnext_tiny.in12k_ft_in1k"
    config.model.drop_path_rate = 0.1
    config.data.pp_train = "decode|inception_crop(224)|flip_lr"
    config.data.pp_eval = "decode|resize_small(256)|central_crop(224)"
    config.batch_size = 128
    config.num_epochs = 30.0
    config.optim.name = "adamw"
    config.optim.lr = 1e-4 * config.batch_size / 256
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 1.0
    config.optim.layer_decay = 0.8
    config.label_smoothing = 0.1
    config.mixup_alpha = 0.2
    config.cutmix_alpha = 0.2
    return config
