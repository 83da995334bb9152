"""Fine-tune ImageNet-pretrained ViT-B/16 at 224 px on your own image folder (train/<class>/*, val/<class>/*).

    python -m jaxclf.train --config configs/vit_b.py --config.data.root=/path/to/images   # -> runs/vit_b

The weights are timm's AugReg ViT-B/16 (ImageNet-21k, fine-tuned on ImageNet-1k), downloaded from the
Hugging Face hub on first use and converted once; --config.model_init= takes another hub name, a
weights file or a `jaxclf.convert` folder.

AdamW with warmup and cosine decay, label smoothing and drop path, as timm fine-tunes ViTs. The
head is replaced (zero-initialised) for your classes; mean/std come from the weights.
--config.model_init='' trains from scratch. Computes in bfloat16 on GPUs (config.dtype='auto').
"""

from jaxclf.config import base_config


def get_config():
    config = base_config()
    config.model_name = "vit_base_patch16_224"
    config.model_init = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
    config.model.drop_path_rate = 0.1
    config.data.pp_train = "decode|inception_crop(224)|flip_lr"
    config.data.pp_eval = "decode|resize_small(248)|central_crop(224)"
    config.batch_size = 256
    config.num_epochs = 20.0
    config.optim.name = "adamw"
    config.optim.lr = 1e-4
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 2.0
    config.label_smoothing = 0.1
    return config
