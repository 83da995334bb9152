"""Test set-up: 8 simulated CPU devices, so multi-device code runs on this CPU-only machine."""

import os

# Must happen before JAX initialises its backends (i.e. before any test imports jax).
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> str:
    """scikit-learn's digits written once as a 16 px image folder (train/ and val/)."""
    from jaxclf.data import digits

    return digits.write_digits_folder(str(tmp_path_factory.mktemp("data") / "digits"), image_size=16)


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir holding the ArrayRecord set of tests/tfds_on_disk.py ("jaxclf_test_images")."""
    import tfds_on_disk  # top-level (pytest puts tests/ on sys.path): as tests.tfds_on_disk, TFDS wants importlib_resources

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds_on_disk.prepare(data_dir)
    return data_dir


@pytest.fixture(scope="session")
def trained_workdir(digits_root, tmp_path_factory) -> str:
    """A finished tiny run on the digits (tests/tiny_config.py, 60 steps, with EMA): what the inference
    tools (evaluate, predict, export, explain) read. Its model `tiny_cnn` is registered in this process."""
    import jax

    from jaxclf import config as config_lib, train

    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}")
    config.total_steps = 60
    config.optim.name = "adamw"
    config.optim.lr = 0.01
    config.ema_decay = 0.5
    config.freeze_bn_stats = True  # 60 steps are too few for BatchNorm's running statistics to settle
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    return workdir
