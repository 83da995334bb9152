"""Config loading: overrides parse to the field's type; unknown fields and wrong types are named."""

import pytest

from jaxclf import config as config_lib

QUICKSTART = "configs/quickstart.py"


CONFIGS = ["configs/quickstart.py", "configs/resnet50.py", "configs/vit_b.py", "configs/small_folder.py",
           "configs/edge.py", "configs/convnext.py"] + [
    f"configs/vit_transfer.py:{m},{d}" for m in ("b32", "b16") for d in ("cifar10", "cifar100", "pets", "flowers")
] + [f"configs/bit_hyperrule.py:{d}" for d in ("cifar10", "cifar100", "pets", "flowers", "folder", "folder:60000")] + [
    f"configs/dinov2_{recipe}.py:{size}" for recipe in ("ft", "linear_probe") for size in ("s", "b", "l", "b_reg4")]


@pytest.mark.parametrize("path", CONFIGS)
def test_configs_load_and_validate(path):
    from jaxclf import models
    from jaxclf.data import ops

    config = config_lib.load_config(path)
    assert config.model_name in models.list_models()
    ops.parse_ops(config.data.pp_train), ops.parse_ops(config.data.pp_eval)  # every op name and argument is valid


def test_recipe_configs_follow_their_sources():
    """The published recipes' numbers, read back: big_vision's transfer config and BiT-HyperRule."""
    b32 = config_lib.load_config("configs/vit_transfer.py:b32,cifar100")
    assert (b32.batch_size, b32.total_steps, b32.optim.warmup_steps, b32.optim.lr) == (512, 10_000, 500, 0.01)
    assert (b32.optim.clip_grad_norm, b32.optim.weight_decay, b32.model.img_size) == (1.0, 0.0, 384)
    pets = config_lib.load_config("configs/bit_hyperrule.py:pets")
    assert (pets.total_steps, pets.optim.warmup_steps, tuple(pets.optim.step_fractions)) == (500, 100, (0.4, 0.6, 0.8))
    assert pets.mixup_alpha == 0.0 and "resize(512)|random_crop(480)" in pets.data.pp_train
    cifar = config_lib.load_config("configs/bit_hyperrule.py:cifar10")
    assert (cifar.total_steps, cifar.mixup_alpha) == (10_000, 0.1) and "resize(160)|random_crop(128)" in cifar.data.pp_train


@pytest.mark.parametrize("path", ["configs/dinov2_ft.py:s", "configs/dinov2_linear_probe.py:s_reg4"])
def test_dinov2_configs_resolve_with_the_weights_preprocessing(path, tmp_path):
    """Each DINOv2 recipe resolved against timm's files for its model (random values, 518 px, no head, as
    on the hub): 224 px kept from the config, ImageNet mean/std and the register layout from the weights."""
    timm = pytest.importorskip("timm")
    from jaxclf.tasks import registry as task_registry
    from jaxclf.training import resolve

    config = config_lib.load_config(path)
    timm.models._hub.save_for_hf(timm.create_model(config.model_name, num_classes=0), str(tmp_path / "hub"),
                                 safe_serialization=True)
    config.model_init = str(tmp_path / "hub")
    resolved = resolve.resolve(config, "cpu", task_registry.check_config).config
    assert resolved.model.img_size == 224 and resolved.model_init_pos_interpolation == "bicubic"
    assert tuple(resolved.data.mean) == (0.485, 0.456, 0.406)
    assert resolved.model.get("no_embed_class", False) == ("reg4" in path)
    assert resolved.optim.freeze == ("^(?!head/)" if "probe" in path else "")
    assert resolved.optim.layer_decay == (0.75 if "ft" in path else 0.0)


def test_override_parses_to_field_type():
    config = config_lib.load_config(
        QUICKSTART,
        ["optim.lr=3e-4", "batch_size=32", "num_epochs=2", "optim.nesterov=true", "data.mean=(0.1, 0.2, 0.3)",
         "optim.name=adamw", "model.drop_path_rate=0.1"],
    )
    assert config.optim.lr == 3e-4 and config.batch_size == 32
    assert config.num_epochs == 2.0 and isinstance(config.num_epochs, float)
    assert config.optim.nesterov is True
    assert tuple(config.data.mean) == (0.1, 0.2, 0.3)
    assert config.optim.name == "adamw"
    assert config.model.drop_path_rate == 0.1


def test_unknown_override_suggests_nearest_field():
    with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.lrr .*Did you mean config\.optim\.lr\?"):
        config_lib.load_config(QUICKSTART, ["optim.lrr=0.1"])


def test_wrong_type_names_field():
    with pytest.raises(config_lib.ConfigError, match=r"config\.batch_size must be int"):
        config_lib.load_config(QUICKSTART, ["batch_size=0.5"])
    with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.nesterov is a bool"):
        config_lib.load_config(QUICKSTART, ["optim.nesterov=maybe"])


def test_config_file_with_unknown_field_is_rejected(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "from jaxclf.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.data.roott = '/x'\n"
        "    return c\n"
    )
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.roott .*Did you mean config\.data\.root\?"):
        config_lib.load_config(str(path))


def test_missing_config_file():
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        config_lib.load_config("configs/nope.py")
