"""Config loading: overrides parse to the field's type; unknown fields and wrong types are named."""

import pytest

from jaxclf import config as config_lib

QUICKSTART = "configs/quickstart.py"


def test_configs_load_and_validate():
    for path in ("configs/quickstart.py", "configs/resnet50.py", "configs/vit_b.py"):
        config = config_lib.load_config(path)
        assert config.model_name


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
