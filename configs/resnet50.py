"""Fine-tune ImageNet-pretrained ResNet-50 on your own image folder (train/<class>/*, val/<class>/*).

    python -m jaxclf.convert resnet50.pth --model resnet50 --out weights/resnet50   # once
    python -m jaxclf.train --config configs/resnet50.py --workdir runs/r50 \
        --config.data.root=/path/to/images

A torchvision-style transfer recipe at 224 px: SGD with momentum, lr 0.01 per 256 images,
cosine decay over 30 epochs, label smoothing 0.1.
The weights: torchvision's or timm's resnet50 file, or a Hugging Face ResNet folder (README,
"Pretrained weights"); --config.model_init='' trains from scratch.
"""

from jaxclf.config import base_config


def get_config():
    config = base_config()
    config.model_name = "resnet50"
    config.model_init = "weights/resnet50"
    config.data.pp_train = "decode|inception_crop(224)|flip_lr"
    config.data.pp_eval = "decode|resize_small(256)|central_crop(224)"
    config.batch_size = 128
    config.num_epochs = 30.0
    config.optim.name = "sgd"
    config.optim.lr = 0.01 * config.batch_size / 256
    config.optim.weight_decay = 1e-4
    config.label_smoothing = 0.1
    return config
