"""Test set-up: 8 simulated CPU devices, so multi-device code runs on this CPU-only machine."""

import os

# Must happen before JAX initialises its backends (i.e. before any test imports jax).
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
