"""Fine-tune ImageNet-pretrained ResNet-50 on your own image folder (train/<class>/*, val/<class>/*).

    python -m jaxclf.train --config configs/resnet50.py --config.data.root=/path/to/images   # -> runs/resnet50

A torchvision-style transfer recipe at 224 px: SGD with momentum, lr 0.01 per 256 images,
cosine decay over 30 epochs, label smoothing 0.1.
The weights: timm's ResNet-50 A1 (ImageNet-1k, 80.4% top-1 at 288 px), from the Hugging Face hub on
first use, converted once; --config.model_init= takes another hub name (timm/resnet50.tv2_in1k for
torchvision's V2 weights), a torchvision/timm file or a Hugging Face folder (docs/weights.md);
--config.model_init='' trains from scratch.
"""

from jaxclf.config import base_config


def get_config():
    config = base_config()
    config.model_name = "resnet50"
    config.model_init = "timm/resnet50.a1_in1k"
    config.data.pp_train = "decode|inception_crop(224)|flip_lr"
    config.data.pp_eval = "decode|resize_small(256)|central_crop(224)"
    config.batch_size = 128
    config.num_epochs = 30.0
    config.optim.name = "sgd"
    config.optim.lr = 0.01 * config.batch_size / 256
    config.optim.weight_decay = 1e-4
    config.label_smoothing = 0.1
    return config
