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
