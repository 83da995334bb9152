"""Fine-tune ImageNet-pretrained MobileNetV3-Large at 224 px for a small device (phone, edge box), on your own
image folder (train/<class>/*, val/<class>/*), then export it to int8 ONNX.

    python -m jaxclf.train --config configs/edge.py --config.data.root=/path/to/images   # -> runs/edge
    python -m jaxclf.export --workdir runs/edge --format onnx --quantize int8 --calibration 256 --out edge_int8.onnx

The weights are timm's MobileNetV3-Large 1.0 (`timm/mobilenetv3_large_100.ra_in1k`, ImageNet-1k; timm
publishes 75.8% top-1), from the Hugging Face hub on first use, converted once (mean/std and crop come with
them); 5.48 M parameters (22 MB as float32, so the int8 file is roughly a quarter of that), 219 M
multiply-adds at 224 px (the paper's count). The recipe: AdamW
with warmup and cosine decay, label smoothing, dropout 0.2 before the classifier as timm trains it, and an
EMA of the weights (small nets gain from it; the best checkpoint is chosen by val_ema/accuracy).
Expected result: not measured on this repository's machines (they reach no hub); a fine-tune of these
weights should land within a few points of the same recipe on EfficientNet-B0 (--config.model_name=
efficientnet_b0 --config.model_init=timm/efficientnet_b0.ra_in1k). Check the int8 file against float32
with `python -m jaxclf.evaluate --artefact edge_int8.onnx --split val` (the report gives both accuracies).
"""

from jaxclf.config import base_config


def get_config():
    config = base_config()
    config.model_name = "mobilenetv3_large_100"
    config.model_init = "timm/mobilenetv3_large_100.ra_in1k"
    config.model.drop_rate = 0.2
    config.data.pp_train = "decode|inception_crop(224)|flip_lr"
    config.data.pp_eval = "decode|resize_small(256)|central_crop(224)"
    config.batch_size = 128
    config.num_epochs = 15.0
    config.optim.name = "adamw"
    config.optim.lr = 1e-3 * config.batch_size / 256
    config.optim.weight_decay = 0.01
    config.optim.warmup_epochs = 1.0
    config.label_smoothing = 0.1
    config.ema_decay = 0.999
    return config
