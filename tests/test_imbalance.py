"""Class imbalance: counts reported at start, class-weighted loss and class-balanced sampling, each
checked against a hand computation."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from jaxclf.data.normalize import normalize_images
from jaxclf import config as config_lib, models, train
from jaxclf.tasks import registry as task_registry
from jaxclf.training import resolve
from jaxclf.data import imbalance, pipeline, sources
from jaxclf.tracking.metrics import read_metrics


def test_class_weights_by_hand():
    assert imbalance.class_weights("none", [5, 10]) is None
    # n / (C * count): 30 images, 3 classes.
    np.testing.assert_allclose(imbalance.class_weights("balanced", [5, 10, 15]), [2.0, 1.0, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(imbalance.class_weights("balanced", [10, 0, 30]), [2.0, 0.0, 2 / 3], rtol=1e-6)
    np.testing.assert_array_equal(imbalance.class_weights("1, 2.5,0", [1, 1, 1]), [1.0, 2.5, 0.0])
    for bad in ("1,2", "a,b,c", "0,0,0", "-1,1,1", "inverse"):
        with pytest.raises(config_lib.ConfigError, match="config.data.class_weights"):
            imbalance.class_weights(bad, [1, 1, 1])


def test_sampling_weights_by_hand():
    source = sources.LabelledFiles(("x",) * 6, np.array([0, 0, 0, 1, 2, 2], np.int32), ("a", "b", "c"))
    assert imbalance.sampling_weights("uniform", source) is None
    np.testing.assert_allclose(imbalance.sampling_weights("balanced", source), [1 / 3] * 3 + [1.0] + [0.5] * 2)
    with pytest.raises(config_lib.ConfigError, match="config.data.sampling='weighted'"):
        imbalance.sampling_weights("weighted", source)


@pytest.fixture(scope="module")
def skewed(tmp_path_factory) -> sources.LabelledFiles:
    """24 images: 16 of class a, 6 of b, 2 of c; pixel value = 10 * index."""
    root = tmp_path_factory.mktemp("skewed")
    labels = [0] * 16 + [1] * 6 + [2] * 2
    paths = []
    for i, label in enumerate(labels):
        paths.append(str(root / f"{i:02d}.png"))
        Image.fromarray(np.full((2, 2, 3), 10 * i, np.uint8)).save(paths[-1])
    return sources.LabelledFiles(tuple(paths), np.asarray(labels, np.int32), ("a", "b", "c"))


def test_balanced_sampling_draws_classes_equally_and_resumes_exactly(skewed):
    def loader(sampling):
        return iter(pipeline.make_train_loader(skewed, "decode", global_batch_size=8, seed=0, num_workers=0,
                                               sampling=sampling))

    def label_frequencies(iterator, batches):
        labels = np.concatenate([next(iterator)["label"] for _ in range(batches)])
        return np.bincount(labels, minlength=3) / len(labels)

    np.testing.assert_allclose(label_frequencies(loader("uniform"), 90), [16 / 24, 6 / 24, 2 / 24], atol=0.01)
    balanced = loader("balanced")
    np.testing.assert_allclose(label_frequencies(balanced, 90), [1 / 3] * 3, atol=0.05)
    state = balanced.get_state()
    expected = [next(balanced) for _ in range(3)]
    restored = loader("balanced")
    restored.set_state(state)
    for got, want in zip([next(restored) for _ in range(3)], expected):
        np.testing.assert_array_equal(got["image"], want["image"])
    with pytest.raises(ValueError, match="sampler"):  # a stream saved with another sampling does not resume
        loader("uniform").set_state(state)


def _first_step(digits_root, workdir, **data_fields):
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}", ["total_steps=2", "log_every_steps=1"])
    config.data.update(data_fields)
    train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1], stop_at_step=1)
    loss = [r["train/loss"] for r in read_metrics(str(workdir)) if "train/loss" in r][0]
    return config, loss


def _hand_computed_loss(config, train_set, weights):
    """The first step's loss recomputed outside the trainer: same batch, same initial model."""
    batch = next(iter(pipeline.make_train_loader(
        train_set, config.data.pp_train, global_batch_size=config.batch_size, seed=config.seed, num_workers=0,
        sampling=config.data.sampling)))
    model = models.create_model(resolve.resolve(config, "cpu", task_registry.check_config).config, len(train_set.class_names))
    model.train()
    logits = model(normalize_images(jnp.asarray(batch["image"]), config.data.mean, config.data.std))
    losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
    w = np.ones(len(train_set.class_names)) if weights is None else weights
    return float(np.sum(losses * w[batch["label"]]) / np.sum(w[batch["label"]]))


def test_weighted_loss_and_balanced_sampling_reach_the_training_step(digits_root, tmp_path, capfd):
    train_set = sources.load_image_folder_splits(digits_root)["train"]
    counts = np.array(list(train_set.class_counts().values()))

    config, loss = _first_step(digits_root, tmp_path / "weighted", class_weights="balanced")
    weights = counts.sum() / (10 * counts)
    expected = _hand_computed_loss(config, train_set, weights)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert loss != pytest.approx(_hand_computed_loss(config, train_set, None), rel=1e-5)

    config, loss = _first_step(digits_root, tmp_path / "sampled", sampling="balanced")
    assert loss == pytest.approx(_hand_computed_loss(config, train_set, None), rel=1e-5)

    # Counts are reported at start, on the console and in classes.json.
    err = capfd.readouterr().err
    assert "10 classes" in err and "train: 1437 images" in err and "smallest class" in err
    with open(os.path.join(tmp_path / "weighted", "classes.json")) as f:
        recorded = json.load(f)
    assert recorded["class_names"] == [str(d) for d in range(10)]
    assert recorded["train_counts"] == train_set.class_counts()
    assert sum(recorded["val_counts"].values()) == 360


def test_resume_with_other_classes_is_refused(digits_root, tmp_path):
    workdir = tmp_path / "run"
    os.makedirs(workdir)
    (workdir / "classes.json").write_text(json.dumps({"class_names": [str(d) for d in range(9)] + ["ten"]}))
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}", ["total_steps=1"])
    with pytest.raises(sources.DataError, match=r"classes\.json.*9: 'ten' vs '9'"):
        train.train_and_evaluate(config, str(workdir))
