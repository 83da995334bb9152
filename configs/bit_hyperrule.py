"""BiT-HyperRule: fine-tune BiT-M ResNet-50x1 with the rule of Kolesnikov et al., "Big Transfer" (2020).

    python -m jaxclf.train --config configs/bit_hyperrule.py:cifar10          # -> runs/bit_hyperrule_cifar10
    python -m jaxclf.train --config configs/bit_hyperrule.py:folder \\
        --config.data.root=/path/to/images        # your own folder (train/<class>/*, val/<class>/*)

The weights are BiT-M R50x1 (ImageNet-21k) as timm publishes them on the Hugging Face hub
(timm/resnetv2_50x1_bit.goog_in21k), downloaded on first use and converted once;
--config.model_init=BiT-M-R50x1.npz reads the original file instead.

The rule (bit_hyperrule.py of google-research/big_transfer) sets everything from the data set's
size and image resolution: batch 512, SGD with momentum 0.9 at lr 0.003, no weight decay; under
20k training images 500 steps, under 500k 10k steps, else 20k; linear warmup over the first of
the schedule's points (100 or 500 steps), then the lr divided by 10 at its other points (40/60/80%
of the run for small sets, 30/60/90% otherwise); mixup (alpha 0.1) from 20k images on; images
under 96x96 pixels are resized to 160x160 and randomly cropped to 128, larger ones to 512 and 480;
evaluation resizes to the crop size. ARG names a TFDS data set (cifar10, cifar100, pets, flowers)
or `folder[:N]` for your own folder of N training images (default a small set: 500 steps).
BiT's own results are in its paper; this config has not been run to completion with jaxclf yet.
"""

from jaxclf.config import base_config

# name: (TFDS name, training images, image area below 96x96?)
DATASETS = {
    "cifar10": ("cifar10", 50_000, True),
    "cifar100": ("cifar100", 50_000, True),
    "pets": ("oxford_iiit_pet", 3_680, False),
    "flowers": ("oxford_flowers102", 1_020, False),
}


def hyperrule(num_images: int, small_images: bool) -> dict:
    """The rule's schedule (steps, warmup, drop fractions), mixup alpha and (resize, crop) sizes."""
    if num_images < 20_000:
        steps, warmup, drops = 500, 100, (0.4, 0.6, 0.8)
    elif num_images < 500_000:
        steps, warmup, drops = 10_000, 500, (0.3, 0.6, 0.9)
    else:
        steps, warmup, drops = 20_000, 500, (0.3, 0.6, 0.9)
    resize, crop = (160, 128) if small_images else (512, 480)
    return {"steps": steps, "warmup": warmup, "drops": drops, "mixup": 0.0 if num_images < 20_000 else 0.1,
            "resize": resize, "crop": crop}


def get_config(arg: str = "cifar10"):
    config = base_config()
    config.model_name = "resnetv2_50x1_bit"
    config.model_init = "timm/resnetv2_50x1_bit.goog_in21k"
    if arg.startswith("folder"):
        num_images = int(arg.partition(":")[2] or 0)
        rule = hyperrule(num_images, small_images=False)
    elif arg in DATASETS:
        tfds_name, num_images, small = DATASETS[arg]
        rule = hyperrule(num_images, small)
        config.data.source = "tfds"
        config.data.tfds_name = tfds_name
        config.data.train_split, config.data.val_split = "train[:90%]", "train[90%:]"
    else:
        raise ValueError(f"config argument {arg!r}: use one of {sorted(DATASETS)} or folder[:NUM_IMAGES]")
    config.data.pp_train = f"decode|resize({rule['resize']})|random_crop({rule['crop']})|flip_lr"
    config.data.pp_eval = f"decode|resize({rule['crop']})"
    config.batch_size = 512
    config.total_steps = rule["steps"]
    config.optim.name = "sgd"
    config.optim.momentum = 0.9
    config.optim.lr = 0.003
    config.optim.weight_decay = 0.0
    config.optim.schedule = "step"
    config.optim.step_fractions = rule["drops"]
    config.optim.warmup_steps = rule["warmup"]
    config.mixup_alpha = rule["mixup"]
    return config
