"""Training tasks and evaluators plug in from outside jaxclf/: a task defined in this file adds a loss term
and a derived metric to a real run; evaluators named in config.evals run at their own intervals and prefixes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxclf import config as config_lib, train
from jaxclf.evaluation import registry as eval_registry
from jaxclf.runs import checkpoint, inference
from jaxclf.tasks import base, registry
from jaxclf.tracking.metrics import read_metrics
from jaxclf.training import steps

PENALTY = 0.5


def confidence_penalty(inputs: steps.LossInputs) -> jax.Array:
    """PENALTY * the (example-weighted) mean negative entropy of the predicted distribution
    (Pereyra et al., 2017): it pushes towards less confident predictions."""
    log_probs = jax.nn.log_softmax(inputs.logits, axis=-1)
    negative_entropy = jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return PENALTY * jnp.sum(negative_entropy * inputs.weights) / inputs.weight_sum


@registry.register
class ConfidencePenalty(base.Task):
    """A task a user writes: one more loss term, and one metric derived from each evaluation."""

    name = "confidence_penalty"

    def loss(self, loss, class_names):
        return loss.plus("confidence_penalty", confidence_penalty)

    def eval_metrics(self, metrics):
        return {**metrics, "val/error": 1 - metrics["val/accuracy"]}


def _config(digits_root, **overrides):
    return config_lib.load_config(f"tests/tiny_config.py:{digits_root}", [f"{k}={v}" for k, v in overrides.items()])


def _final_params(workdir):
    return jax.tree.leaves(nnx.state(inference.load_trained(workdir, "last").model, nnx.Param))


def test_the_penalty_term_equals_numpy():
    logits = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    weights = np.asarray([1, 1, 2, 0, 1, 1], np.float32)
    inputs = steps.LossInputs(jnp.asarray(logits), None, None, jnp.asarray(weights), jnp.float32(weights.sum()))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = PENALTY * np.sum((p * np.log(p)).sum(-1) * weights) / weights.sum()
    assert float(confidence_penalty(inputs)) == pytest.approx(expected, rel=1e-5)


def test_a_task_defined_here_trains_with_its_loss_term_and_metric(digits_root, tmp_path):
    """Named in config.tasks, the task's term is in the jitted step's loss (logged per term, summed) and
    changes what is learnt; its derived metric comes with every evaluation."""
    devices = jax.devices()[:1]
    plain = train.train_and_evaluate(_config(digits_root, total_steps=8, log_every_steps=1),
                                     str(tmp_path / "plain"), devices=devices)
    config = _config(digits_root, total_steps=8, log_every_steps=1, tasks="('confidence_penalty',)")
    val = train.train_and_evaluate(config, str(tmp_path / "penalised"), devices=devices)

    assert val["val/error"] == pytest.approx(1 - val["val/accuracy"])
    assert "val/error" not in plain
    records = read_metrics(str(tmp_path / "penalised"))
    logged = [r for r in records if "train/loss" in r]
    assert len(logged) == 8
    for record in logged:
        assert record["train/loss_confidence_penalty"] < 0  # a negative entropy
        assert record["train/loss"] == pytest.approx(
            record["train/loss_cross_entropy"] + record["train/loss_confidence_penalty"], rel=1e-5)
    assert any("val/error" in r for r in records)
    first_plain = [r for r in read_metrics(str(tmp_path / "plain")) if "train/loss" in r][0]
    # Step 1 starts from the same params and batch: the same cross-entropy, then the updates differ.
    assert logged[0]["train/loss_cross_entropy"] == pytest.approx(first_plain["train/loss"], rel=1e-6)
    assert any(not np.array_equal(a, b) for a, b in zip(_final_params(str(tmp_path / "plain")),
                                                        _final_params(str(tmp_path / "penalised"))))


def test_a_task_no_code_registered_is_named(digits_root, tmp_path, capsys):
    status = train.main(["--config", f"tests/tiny_config.py:{digits_root}", "--workdir", str(tmp_path / "run"),
                         "--config.tasks=('sharpen',)"])
    assert status == 2
    assert "config.tasks names ['sharpen']" in capsys.readouterr().err
    with pytest.raises(TypeError, match="subclass of jaxclf.tasks.base.Task"):
        registry.register(object)


def test_evaluators_run_at_their_own_intervals_under_their_prefixes(digits_root, tmp_path):
    """config.evals: "val" every 4 steps, "fit" (the training split) every 3; both at the last step. The
    best checkpoint and early stopping follow val/accuracy alone."""
    config = _config(digits_root, total_steps=8, early_stopping_patience=5, keep_checkpoints=1)
    config.evals = {"val": {"type": "classification", "every_steps": 4},
                    "fit": {"type": "classification", "split": "train", "prefix": "fit/", "every_steps": 3}}
    config_lib.validate(config)
    val = train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    records = read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in records if "val/accuracy" in r] == [4, 8]
    assert [r["step"] for r in records if "fit/accuracy" in r] == [3, 6, 8]
    final = [r for r in records if r["step"] == 8 and "val/accuracy" in r][0]
    assert final["fit/examples"] == 1437 and final["val/examples"] == 360
    assert val["fit/accuracy"] == final["fit/accuracy"]
    best = max((r for r in records if "val/accuracy" in r), key=lambda r: (r["val/accuracy"], -r["step"]))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), keep=1)
    try:
        assert ckpt.best_step() == best["step"]
    finally:
        ckpt.close()


@pytest.mark.parametrize("evals, message", [
    ({"val": {"type": "knm"}}, "one of \\['classification', 'fewshot', 'knn', 'linear_probe'\\]"),
    ({"val": {"type": "classification", "splt": "val"}}, "\\['splt'\\] are not options"),
    ({"val": {"type": "classification", "split": "test"}}, "split='test'"),
])
def test_a_mistyped_evaluator_is_named(digits_root, tmp_path, evals, message):
    config = _config(digits_root, total_steps=2)
    config.evals = evals
    with pytest.raises(config_lib.ConfigError, match=f"config.evals.val.*{message}"):
        train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])


def test_best_metric_must_be_an_evaluators(digits_root, tmp_path):
    config = _config(digits_root, total_steps=2)
    config.evals = {"fit": {"type": "classification", "split": "train"}}
    with pytest.raises(config_lib.ConfigError, match="config.best_metric='val/accuracy' is not a metric.*'fit/'"):
        train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])


def test_evaluators_are_set_from_the_command_line():
    config = config_lib.load_config("tests/tiny_config.py", ["evals.test.type=classification",
                                                             "evals.test.split=test", "evals.val.every_steps=5"])
    assert config.evals.to_dict() == {"test": {"type": "classification", "split": "test"}, "val": {"every_steps": 5}}
    assert eval_registry.specs(config.evals) == {
        "test": {"type": "classification", "split": "test"},
        "val": {"type": "classification", "split": "val", "prefix": "val/", "every_steps": 5}}
