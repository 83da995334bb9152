"""A linear probe on frozen DINOv2 features: only the classifier trains, on your own folder of images.

    python -m jaxclf.train --config configs/dinov2_linear_probe.py:s \\
        --config.data.root=/path/to/images      # train/<class>/* (and val/<class>/*, else 15% held out)
    python -m jaxclf.evaluate --workdir runs/dinov2_linear_probe_s

ARG is the size, s, b or l (vit_{small,base,large}_patch14_dinov2, weights timm/vit_*_patch14_dinov2.lvd142m,
downloaded on first use and converted once), or s_reg4, b_reg4, l_reg4 for the models with registers
(timm/vit_*_patch14_reg4_dinov2.lvd142m). The weights are 518 px; their position embedding is resampled
(bicubic) to the 224 px grid when they are loaded. The weights have no classifier: the head starts at zeros.

Nothing is precomputed by hand: config.optim.freeze names every parameter but the head, which makes
them constants of the train step (no backward pass through the backbone, no optimizer state for it;
jaxclf/steps.py), so augmentation still varies per epoch. The features are the class token after the
final LayerNorm (timm's pooling); DINOv2's own linear evaluation concatenates the class token with the
mean patch token and grid-searches the learning rate, so expect it a little higher than this probe.

Expected result: not reproduced with jaxclf (no pretrained weights or ImageNet on these machines). The
reference numbers (facebookresearch/dinov2 README, ImageNet-1k top-1 of their linear evaluation):
ViT-S/14 81.1%, ViT-B/14 84.5%, ViT-L/14 86.3%. On a small folder data set it is a strong, cheap
baseline to run before full fine-tuning (configs/dinov2_ft.py).
"""

from jaxclf.config import base_config

SIZES = {"s": "small", "b": "base", "l": "large"}


def dinov2_model(arg: str) -> tuple[str, str]:
    """(jaxclf model name, hub weights) for ARG `s`, `b`, `l` or `s_reg4`, `b_reg4`, `l_reg4`."""
    size, _, registers = arg.partition("_")
    if size not in SIZES or registers not in ("", "reg4"):
        raise ValueError(f"config argument {arg!r}: use s, b or l, optionally with _reg4 (e.g. b_reg4)")
    name = f"vit_{SIZES[size]}_patch14_{registers + '_' if registers else ''}dinov2"
    return name, f"timm/{name}.lvd142m"


def get_config(arg: str = "s"):
    config = base_config()
    config.model_name, config.model_init = dinov2_model(arg)
    config.model.img_size = 224
    config.model_init_pos_interpolation = "bicubic"
    config.data.val_fraction = 0.15  # used only when the folder has no val/
    config.data.pp_train = "decode|inception_crop(224)|flip_lr"
    config.data.pp_eval = "decode|resize_small(256)|central_crop(224)"
    config.optim.freeze = "^(?!head/)"  # everything but the classifier
    config.batch_size = 128
    config.num_epochs = 10.0
    config.optim.name = "sgd"
    config.optim.momentum = 0.9
    config.optim.lr = 0.05
    config.optim.weight_decay = 0.0
    config.optim.schedule = "cosine"
    return config
