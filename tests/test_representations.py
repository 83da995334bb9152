"""Representation evaluators (knn, fewshot, linear_probe) against scikit-learn and numpy closed forms on the same
features; features equal on 1 and 8 devices; during training, and on pretrained weights with no training."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors

from jaxclf import config as config_lib, evaluate, models, train, weights
from jaxclf.evaluation import backbones, base, features, fewshot, knn, linear_probe
from jaxclf.models import tree_paths
from jaxclf.training import sharding, steps
from hf_cache import add_repo, offline_hub  # noqa: F401 - offline_hub is a fixture
from model_helpers import with_random_values


class PooledCNN(models.Classifier):
    """Conv(stride 2) + BatchNorm + ReLU, global average pool, Linear: the Classifier split, tiny."""

    def __init__(self, num_classes: int, rngs: nnx.Rngs, dtype=None, width: int = 16):
        self.conv = nnx.Conv(3, width, (3, 3), strides=2, rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def forward_features(self, images):
        return nnx.relu(self.bn(self.conv(images)))

    def pooled_features(self, features):
        return features.astype(jnp.float32).mean(axis=(1, 2))

    def forward_head(self, features):
        return self.head(self.pooled_features(features))


if "pooled_cnn" not in models.list_models():
    models.register("pooled_cnn", PooledCNN)


def _clusters(num_classes=5, per_class=40, dim=12, seed=0):
    """Gaussian clusters around the same random centres (the noise from `seed`): (float32[N, dim], int32[N])."""
    centres = np.random.default_rng(0).normal(0, 1, (num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    noise = np.random.default_rng(seed + 1).normal(0, 0.8, (len(labels), dim))
    return (centres[labels] + noise).astype(np.float32), labels


def test_knn_scores_equal_dinos_votes_over_scikit_learns_neighbours():
    x, y = _clusters()
    queries, query_labels = _clusters(seed=1)
    train_set = features.SplitFeatures(x, y, 5)
    ours = knn.predict_scores(train_set, queries, k=20, temperature=0.07)
    # scikit-learn's cosine neighbours, weighted and summed by hand as DINO's eval_knn.py does.
    distances, neighbours = NearestNeighbors(n_neighbors=20, metric="cosine").fit(x).kneighbors(queries)
    weights = np.exp((1.0 - distances) / 0.07)
    expected = np.zeros((len(queries), 5))
    for row in range(len(queries)):
        np.add.at(expected[row], y[neighbours[row]], weights[row])
    np.testing.assert_allclose(ours, expected, rtol=1e-4)
    evaluator = knn.KNN.__new__(knn.KNN)
    evaluator.spec = {"k": 20, "temperature": 0.07}
    metrics = evaluator.score(train_set, features.SplitFeatures(queries, query_labels, 5))
    assert metrics["accuracy"] == np.mean(expected.argmax(axis=1) == query_labels) > 0.5
    assert metrics["examples"] == len(queries)


@pytest.mark.parametrize("per_class", [3, 40])  # fewer examples than features (x x^T), and more (x^T x)
def test_fewshot_equals_the_ridge_closed_form(per_class):
    x, y = _clusters(per_class=per_class)
    weights, mean, std = fewshot.fit_lsr(x, y, 5, l2_reg=2.0)
    # Direct: standardise, append the bias feature 100, targets in {-1, 1}, W = (X^T X + l2 I)^-1 X^T Y.
    z = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-5)
    z = np.concatenate([z, np.full((len(z), 1), 100.0)], axis=1)
    targets = np.where(np.eye(5)[y] > 0, 1.0, -1.0)
    expected = np.linalg.solve(z.T @ z + 2.0 * np.eye(z.shape[1]), z.T @ targets)
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)
    queries, _ = _clusters(seed=1)
    zq = np.concatenate([(queries - x.mean(axis=0)) / (x.std(axis=0) + 1e-5), np.full((len(queries), 1), 100.0)], axis=1)
    np.testing.assert_array_equal(fewshot.predict((weights, mean, std), queries), (zq @ expected).argmax(axis=1))


def test_fewshot_samples_the_shots_of_every_class_and_averages_over_seeds():
    x, y = _clusters()
    kept = fewshot.sample_shots(y, 5, shots=3, seed=0)
    assert np.array_equal(np.bincount(y[kept]), [3] * 5) and len(set(kept)) == 15
    assert not np.array_equal(kept, fewshot.sample_shots(y, 5, shots=3, seed=1))
    queries, query_labels = _clusters(seed=1)
    evaluator = fewshot.FewShot.__new__(fewshot.FewShot)
    evaluator.spec = {"shots": (1, 3), "seeds": 2, "l2_reg": 2.0}
    metrics = evaluator.score(features.SplitFeatures(x, y, 5), features.SplitFeatures(queries, query_labels, 5))
    accuracies = []
    for seed in range(2):
        kept = fewshot.sample_shots(y, 5, 3, seed)
        accuracies.append(np.mean(fewshot.predict(fewshot.fit_lsr(x[kept], y[kept], 5, 2.0), queries) == query_labels))
    assert metrics["3shot"] == pytest.approx(np.mean(accuracies)) and metrics["3shot_std"] == pytest.approx(np.std(accuracies))
    assert set(metrics) == {"1shot", "1shot_std", "3shot", "3shot_std", "examples"}


@pytest.fixture(scope="module")
def digit_features():
    """scikit-learn's digits as 64 raw features: 1200 to fit, the rest to score."""
    x, y = load_digits(return_X_y=True)
    return x[:1200].astype(np.float32), y[:1200].astype(np.int32), x[1200:].astype(np.float32), y[1200:]


@pytest.mark.parametrize("c", [0.01, 1.0])
def test_linear_probe_equals_scikit_learns_logistic_regression(digit_features, c):
    x, y, test_x, test_y = digit_features
    fitted = linear_probe.fit_standardised(x, y, c, 10, max_iter=1000)
    ours = np.mean(linear_probe.scores(fitted, test_x).argmax(axis=1) == test_y)
    _, mean, std = fitted
    reference = LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit((x - mean) / std, y)
    assert abs(ours - reference.score((test_x - mean) / std, test_y)) <= 0.005


def test_linear_probe_picks_c_on_held_out_train_and_refits(digit_features):
    x, y, test_x, test_y = digit_features
    fit, held = linear_probe.holdout_split(y, 10, 0.25, seed=0)
    assert not set(fit) & set(held) and len(fit) + len(held) == len(y)
    assert np.array_equal(np.bincount(y[held]), np.round(0.25 * np.bincount(y)).astype(int))
    evaluator = linear_probe.LinearProbe.__new__(linear_probe.LinearProbe)
    evaluator.spec = {"c_grid": (1e-4, 1.0), "holdout_fraction": 0.25, "seed": 0, "max_iter": 1000}
    metrics = evaluator.score(features.SplitFeatures(x, y, 10), features.SplitFeatures(test_x, test_y, 10))
    assert metrics["c"] == 1.0  # 1e-4 regularises the digits into guessing the majority class
    fitted = linear_probe.fit_standardised(x, y, 1.0, 10, max_iter=1000)
    assert metrics["accuracy"] == np.mean(linear_probe.scores(fitted, test_x).argmax(axis=1) == test_y) > 0.9


def _context(config, splits, mesh, model):
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    layout = sharding.state_sharding(steps.TrainState(step=None, params=params, model_state=model_state,
                                                      opt_state=None), mesh, "replicate")
    return base.EvalContext(config, mesh, graphdef, layout, splits), params, model_state


FOUR_CLASSES = ("0", "1", "2", "3")


def _config(root):
    """Four classes of the 16 px digits, the tiny pooled CNN."""
    config = config_lib.base_config()
    config.model_name = "pooled_cnn"
    config.data.root, config.data.classes, config.data.pp_eval, config.data.num_workers = root, FOUR_CLASSES, "decode", 0
    config.data.mean, config.data.std = (0.5,) * 3, (0.5,) * 3
    config.batch_size = 16
    return config


def test_features_equal_on_one_and_eight_devices_and_are_computed_once(digits_root):
    from jaxclf import data as data_lib

    config = ml_collections.FrozenConfigDict(_config(digits_root))
    splits = data_lib.load_splits(config.data)
    model = with_random_values(lambda: models.create("pooled_cnn", num_classes=4))
    model.eval()
    found = {}
    for count in (1, 8):
        mesh = sharding.make_mesh(jax.devices()[:count])
        context, params, model_state = _context(config, splits, mesh, model)
        params, model_state = jax.device_put((params, model_state), sharding.replicated(mesh))
        store = features.FeatureStore(config, mesh, context.graphdef, context.state_sharding, splits)
        found[count] = store.get("val", params, model_state)
        assert store.get("val", params, model_state) is found[count]  # the second evaluator's ask: no new pass
        store.close()
    np.testing.assert_allclose(found[8].features, found[1].features, atol=1e-5)
    np.testing.assert_array_equal(found[8].labels, splits["val"].labels)
    # The split's order: row i is image i, as the model itself computes it.
    images = np.stack([_read(path) for path in splits["val"].paths[:3]])
    direct = model.pooled_features(model.forward_features((images / 255.0 - 0.5) / 0.5))
    np.testing.assert_allclose(found[1].features[:3], np.asarray(direct), atol=1e-5)


def _read(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), np.float32)


def test_bad_options_name_the_config_key(digits_root):
    from jaxclf import data as data_lib

    config = ml_collections.FrozenConfigDict(_config(digits_root))
    splits = data_lib.load_splits(config.data)
    context = base.EvalContext(config, None, None, None, splits)
    with pytest.raises(config_lib.ConfigError, match=r"config\.evals\.nn: \['kk'\] are not options of a 'knn'"):
        knn.KNN("nn", {"type": "knn", "kk": 3}, context)
    smallest = min(np.bincount(splits["train"].labels))
    with pytest.raises(config_lib.ConfigError, match=rf"config\.evals\.few\.shots=\(1, 1000\): .* only {smallest} "):
        fewshot.FewShot("few", {"type": "fewshot", "shots": (1, 1000)}, context)
    with pytest.raises(config_lib.ConfigError, match=r"config\.evals\.probe\.split='test'"):
        linear_probe.LinearProbe("probe", {"type": "linear_probe", "split": "test"}, context)
    with pytest.raises(config_lib.ConfigError, match=r"config\.evals\.nn\.k=0"):
        knn.KNN("nn", {"type": "knn", "k": 0}, context)


def test_representation_evaluators_run_during_training_at_their_interval(digits_root, tmp_path):
    config = _config(digits_root)
    config.total_steps, config.log_every_steps, config.optim.lr, config.data.check = 4, 2, 0.05, "off"
    config.evals = {"knn": {"type": "knn", "every_steps": 2},
                    "few": {"type": "fewshot", "shots": (1, 5), "seeds": 2, "every_steps": 4}}
    config.best_metric = "knn/accuracy"
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:2])
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "knn/accuracy" in r] == [2, 4]
    assert [r["step"] for r in records if "few/1shot" in r] == [4]
    last = next(r for r in records if "few/5shot" in r)
    assert 0.25 < last["few/5shot"] <= 1 and last["few/1shot_std"] >= 0 and last["knn/examples"] > 0
    # The finished run as weights: the same kNN numbers from jaxclf.evaluate, with no training.
    out = tmp_path / "table.json"
    assert evaluate.main(["--model_init", f"{tmp_path}:last", "--data.root", digits_root, "--evals", "knn",
                          "--out", str(out), "--config.batch_size=16", f"--config.data.classes={FOUR_CLASSES!r}"]) == 0
    again = json.loads(out.read_text())["backbones"][f"{tmp_path}:last"]
    assert again["knn/accuracy"] == last["knn/accuracy"] and again["knn/top5"] == last["knn/top5"]


def _backbones(names, folder, write):
    """`write(name, seed, path)` for each of `names` under `folder`; the paths."""
    paths = [str(folder / name.replace("/", "_")) for name in names]
    for seed, (name, path) in enumerate(zip(names, paths)):
        write(name, seed, path)
    return paths


def _compare(model_inits, root, out, *extra):
    return evaluate.main(["--model_init", ",".join(model_inits), "--data.root", root, "--evals", "knn,fewshot",
                          "--out", str(out), "--batch_size", "16", "--config.evals.fewshot.shots=(1,5)",
                          "--config.data.num_workers=0", f"--config.data.classes={FOUR_CLASSES!r}", *extra])


def test_evaluate_compares_pretrained_backbones_with_no_training(digits_root, tmp_path, capsys):
    """Two weights folders (no checkpoint, no run): one table, rows the backbones, and the JSON; the numbers
    are the evaluators' own on the features of each backbone."""

    def write(name, seed, path):
        model = with_random_values(lambda: models.create("pooled_cnn", num_classes=10), seed=seed)
        state = nnx.state(model, nnx.Not(nnx.RngState))
        info = weights.Pretrained("pooled_cnn", {}, 10, name, "jaxclf", {"input_size": 16, "mean": (0.5,) * 3,
                                  "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 1.0})
        weights.save(path, {k: np.asarray(v) for k, v in tree_paths.flatten(state).items()}, info)

    paths = _backbones(["first", "second"], tmp_path, write)
    out = tmp_path / "table.json"
    assert _compare(paths, digits_root, out) == 0
    table = json.loads(out.read_text())
    assert list(table["backbones"]) == paths
    assert table["columns"] == ["knn/accuracy", "knn/top5", "knn/examples", "fewshot/1shot", "fewshot/1shot_std",
                                "fewshot/5shot", "fewshot/5shot_std", "fewshot/examples"]
    first, second = (table["backbones"][p] for p in paths)
    assert first != second and 0.25 < first["knn/accuracy"] <= 1 and first["knn/top5"] == 1.0
    assert f"| {paths[1]} | {second['knn/accuracy']:.4f} |" in capsys.readouterr().out
    # The preprocessing the weights record: resize_small(16 / 1.0) and central_crop(16) of the 16 px digits.
    assert backbones.eval_preprocessing(weights.load(paths[0])[1]) == "decode|resize_small(16, method='bilinear')|central_crop(16)"


@pytest.mark.slow
def test_evaluate_compares_hub_backbones_from_an_offline_cache(digits_root, offline_hub, tmp_path):
    """The longer variant: timm ViTs named on the hub (a Hugging Face cache read with HF_HUB_OFFLINE=1)."""
    torch, timm = pytest.importorskip("torch"), pytest.importorskip("timm")

    def write(name, seed, path):
        torch.manual_seed(seed)
        reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
        timm.models._hub.save_for_hf(reference, path, safe_serialization=True)
        add_repo(offline_hub, name, path)

    names = ["timm/vit_tiny_patch16_224.one", "timm/vit_tiny_patch16_224.two"]
    _backbones(names, tmp_path, write)
    out = tmp_path / "table.json"
    assert _compare(names, digits_root, out, "--config.data.pp_eval=decode|resize(32)") == 0
    table = json.loads(out.read_text())
    assert list(table["backbones"]) == names and all(0 < m["fewshot/5shot"] <= 1 for m in table["backbones"].values())
