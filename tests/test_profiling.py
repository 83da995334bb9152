"""config.profile_steps: a jax.profiler trace of the chosen train steps in the workdir."""

import glob
import os

import jax
import pytest

from jaxclf import config as config_lib, train
from jaxclf.training import profiling


def test_the_trace_of_the_chosen_steps_is_in_the_workdir_and_names_the_train_step(digits_root, tmp_path):
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}", ["total_steps=4", "profile_steps=(2, 3)"])
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    traces = glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1, os.listdir(tmp_path)
    with open(traces[0], "rb") as f:
        trace = f.read()
    # The step annotations (and the jitted train_step they wrap) are named in the trace.
    assert b"train_step" in trace and b"step_num" in trace


def test_without_profile_steps_no_trace_is_written(digits_root, tmp_path):
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}", ["total_steps=2"])
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert not os.path.exists(tmp_path / "plugins")


@pytest.mark.parametrize("steps", [(3,), (0, 2), (5, 4), (1.5, 2)])
def test_a_bad_range_is_named(steps):
    with pytest.raises(config_lib.ConfigError, match=r"config\.profile_steps"):
        profiling.check(steps)
