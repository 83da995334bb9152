"""Distillation: the loss against numpy, alpha=0 is plain training bit for bit, the teacher inside the
sharded step (own mean/std, resized input, mixed images, not donated), and the effect on the digits."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxclf.data.normalize import normalize_images
from jaxclf.training import augment, optim, sharding, steps
from jaxclf import config as config_lib, models, train
from jaxclf.tasks import distill
from jaxclf.tracking.metrics import read_metrics

from hf_cache import offline_hub  # noqa: F401 - a fixture (tests/ is on sys.path)

STUDENT_NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
TEACHER_NORM = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


class Net(models.Classifier):
    """Conv + BatchNorm + Linear (global pool): any input size."""

    def __init__(self, num_classes: int, rngs: nnx.Rngs, width: int = 8):
        self.conv = nnx.Conv(3, width, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))


def _batch(seed=0, size=16, pixels=8, num_classes=4):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (size, pixels, pixels, 3), dtype=np.uint8),
            "label": rng.integers(0, num_classes, size).astype(np.int32)}


def _config(**fields):
    config = config_lib.base_config()
    config.data.mean, config.data.std = STUDENT_NORM["mean"], STUDENT_NORM["std"]
    config.optim.update(dict(name="sgd", lr=0.1))
    for key, value in fields.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def _teacher(image_size=None, columns=None, seed=1):
    model = Net(4, nnx.Rngs(seed), width=6)
    return distill.Teacher.from_model("distill", model, **TEACHER_NORM, image_size=image_size, teacher_columns=columns)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _teacher_logits_reference(teacher_model, images_uint8, size=None):
    """What the teacher sees, computed the direct way: raw pixels resized, then its own normalisation."""
    raw = images_uint8.astype(np.float32) / 255.0
    if size is not None:
        raw = np.asarray(jax.image.resize(raw, (raw.shape[0], size, size, 3), "linear", antialias=True))
    normalised = (raw - np.asarray(TEACHER_NORM["mean"])) / np.asarray(TEACHER_NORM["std"])
    return np.asarray(teacher_model(jnp.asarray(normalised, jnp.float32)), np.float64)


def test_soft_and_hard_losses_equal_numpy():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(6, 5)) * 3, rng.normal(size=(6, 5)) * 3
    temperature = 4.0
    p_teacher = np.exp(_log_softmax(teacher / temperature))
    kl = (p_teacher * (_log_softmax(teacher / temperature) - _log_softmax(student / temperature))).sum(-1)
    np.testing.assert_allclose(distill.soft_kl(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                                               temperature), temperature**2 * kl, rtol=1e-5)
    hard = -_log_softmax(student)[np.arange(6), teacher.argmax(-1)]
    np.testing.assert_allclose(distill.hard_cross_entropy(jnp.asarray(student, jnp.float32),
                                                          jnp.asarray(teacher, jnp.float32)), hard, rtol=1e-5)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_loss_with_a_teacher_equals_numpy(mode):
    """(1 - alpha) * cross-entropy + alpha * distillation, the teacher on its own mean/std and a 12 px input."""
    alpha, temperature = 0.3, 2.0
    config = _config(**{"distill.alpha": alpha, "distill.mode": mode, "distill.temperature": temperature,
                        "label_smoothing": 0.1})
    teacher = _teacher(image_size=(12, 12))
    loss = distill.with_distillation(steps.cross_entropy_loss(), teacher, config)
    assert [name for name, _ in loss.terms] == ["cross_entropy", "distill"]
    batch = _batch()
    images = normalize_images(jnp.asarray(batch["image"]), **STUDENT_NORM)
    student_logits = np.random.default_rng(1).normal(size=(16, 4)).astype(np.float32)
    targets = np.asarray(jax.nn.one_hot(batch["label"], 4)) * 0.9 + 0.1 / 4
    weights = np.ones(16, np.float32)
    inputs = steps.LossInputs(jnp.asarray(student_logits), jnp.asarray(targets), images, jnp.asarray(weights),
                              jnp.float32(16), {"distill": teacher.state})
    value = float(loss(inputs))

    teacher_logits = _teacher_logits_reference(nnx.merge(teacher.graphdef, teacher.state), batch["image"], size=12)
    cross_entropy = -(targets * _log_softmax(student_logits.astype(np.float64))).sum(-1).mean()
    if mode == "soft":
        p_teacher = np.exp(_log_softmax(teacher_logits / temperature))
        per_example = temperature**2 * (p_teacher * (_log_softmax(teacher_logits / temperature)
                                                     - _log_softmax(student_logits / temperature))).sum(-1)
    else:
        per_example = -_log_softmax(student_logits.astype(np.float64))[np.arange(16), teacher_logits.argmax(-1)]
    expected = (1 - alpha) * cross_entropy + alpha * per_example.mean()
    assert value == pytest.approx(expected, rel=1e-5)


def _train(config, teacher, devices, num_steps=3, mixup=False):
    mesh = sharding.make_mesh(devices)
    model = Net(4, nnx.Rngs(0))
    tx, _ = optim.make_optimizer(config.optim, model, num_steps, num_steps)
    graphdef, _, state = steps.create_train_state(model, tx)
    state_sharding = sharding.state_sharding(state, mesh, config.param_sharding)
    state = jax.device_put(state, state_sharding)
    step = steps.make_train_step(graphdef, tx, mesh, config, 4, state_sharding,
                                 steps.cross_entropy_loss() if teacher is None else
                                 distill.with_distillation(steps.cross_entropy_loss(), teacher, config))
    metrics = []
    for i in range(num_steps):
        state, m = step(state, sharding.shard_batch(_batch(i), mesh))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


def test_alpha_zero_is_plain_training_bit_for_bit():
    teacher = _teacher()
    off = _config(**{"distill.alpha": 0.0, "distill.teacher": "some/teacher"})
    loss = distill.with_distillation(steps.cross_entropy_loss(), teacher, off)
    assert [name for name, _ in loss.terms] == ["cross_entropy"] and loss.frozen == {}
    plain_state, plain_metrics = _train(_config(), None, jax.devices()[:2])
    off_state, off_metrics = _train(off, teacher, jax.devices()[:2])
    for a, b in zip(jax.tree.leaves(plain_state), jax.tree.leaves(off_state)):
        np.testing.assert_array_equal(a, b)
    assert [m["loss"] for m in plain_metrics] == [m["loss"] for m in off_metrics]
    assert set(off_metrics[0]) == {"loss", "accuracy", "grad_norm", "skipped"}
    # ... and with alpha > 0 the step does change (the term is really in the sum).
    on_state, on_metrics = _train(_config(**{"distill.alpha": 0.5}), teacher, jax.devices()[:2])
    assert on_metrics[0]["loss"] != plain_metrics[0]["loss"]
    assert not np.array_equal(on_state.params["head"]["kernel"], plain_state.params["head"]["kernel"])


def test_the_teacher_in_the_sharded_step_sees_the_mixed_resized_batch():
    """On 8 devices with mixup: the step's distillation term is the teacher's on the same mixed images,
    mixed in the teacher's own normalisation and resized to 12 px (mixing commutes with both); the
    teacher's variables survive every step (they are an argument, not donated)."""
    teacher = _teacher(image_size=(12, 12))
    config = _config(**{"distill.alpha": 0.5, "distill.temperature": 3.0, "mixup_alpha": 0.4})
    _, metrics = _train(config, teacher, jax.devices(), num_steps=2)
    teacher_model = nnx.merge(teacher.graphdef, teacher.state)
    model = Net(4, nnx.Rngs(0))  # the student at step 0, before any update
    model.train()
    batch = _batch(0)
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    one_hot = jax.nn.one_hot(batch["label"], 4)
    student_in, _ = augment.mixup_cutmix(key, normalize_images(jnp.asarray(batch["image"]), **STUDENT_NORM),
                                         one_hot, mixup_alpha=0.4, cutmix_alpha=0.0)
    raw_mixed, _ = augment.mixup_cutmix(key, jnp.asarray(batch["image"], jnp.float32) / 255.0, one_hot,
                                        mixup_alpha=0.4, cutmix_alpha=0.0)
    resized = jax.image.resize(raw_mixed, (16, 12, 12, 3), "linear", antialias=True)
    teacher_logits = np.asarray(teacher_model((resized - jnp.asarray(TEACHER_NORM["mean"])) / jnp.asarray(TEACHER_NORM["std"])))
    student_logits = np.asarray(model(student_in))
    p_teacher = np.exp(_log_softmax(teacher_logits / 3.0))
    kl = 9.0 * (p_teacher * (_log_softmax(teacher_logits / 3.0) - _log_softmax(student_logits / 3.0))).sum(-1)
    assert float(metrics[0]["loss_distill"]) == pytest.approx(0.5 * kl.mean(), rel=1e-4)
    assert np.isfinite(metrics[1]["loss_distill"])  # a donated teacher would be gone by the second step


def test_a_workdir_teacher_trains_a_student_of_another_width(trained_workdir, digits_root, tmp_path):
    """A finished run as the teacher (its classes matched by name, its EMA weights), from the command
    line's config path; each term's loss is logged."""
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}", [
        "model.width=8", f"distill.teacher={trained_workdir}", "distill.alpha=0.7", "distill.mode=hard",
        "total_steps=4", "log_every_steps=2"])
    train.train_and_evaluate(config, str(tmp_path / "student"), devices=jax.devices()[:1])
    logged = [r for r in read_metrics(str(tmp_path / "student")) if "train/loss" in r][-1]
    assert logged["train/loss"] == pytest.approx(logged["train/loss_cross_entropy"] + logged["train/loss_distill"],
                                                 rel=1e-5)
    with open(tmp_path / "student" / "config.json") as f:
        assert json.load(f)["distill"]["teacher"] == trained_workdir


def test_a_teacher_of_other_classes_is_named(trained_workdir):
    config = _config(**{"distill.teacher": trained_workdir, "dtype": "float32"})
    with pytest.raises(config_lib.ConfigError, match="has other classes than the data"):
        distill.load_teacher(config, ["cat", "dog"])
    with pytest.raises(config_lib.ConfigError, match="distill.alpha=1.5"):
        distill.Distillation.check_config(_config(**{"distill.teacher": trained_workdir, "distill.alpha": 1.5}), None)
    teacher = distill.load_teacher(config, [str(d) for d in reversed(range(10))])
    assert teacher.teacher_columns.tolist() == list(reversed(range(10)))  # matched by name


# (timm model, its hub name, image size): a ResNet-18 (make test-all; hub names through weights.load:
# test_hub.py, a workdir teacher: above) and a DINOv2 ViT-S/14, a backbone fine-tuned for 4 classes, at 28 px.
HUB_TEACHERS = [pytest.param("resnet18", "timm/resnet18.a1_in1k", 32, {}, marks=pytest.mark.slow),
                pytest.param("vit_small_patch14_dinov2", "timm/vit_small_patch14_dinov2.lvd142m", 28, {"img_size": 28},
                             marks=pytest.mark.slow)]


@pytest.mark.parametrize("model_name,hub_name,pixels,options", HUB_TEACHERS)
def test_a_teacher_named_on_the_hub_is_converted_once_and_equals_timm(model_name, hub_name, pixels, options,
                                                                      offline_hub, tmp_path):
    """`distill.teacher` as a hub name goes through `weights.load` (the offline cache of tests/hf_cache.py):
    the teacher's logits equal timm's model's on the same raw pixels, with the weights' own mean/std."""
    torch, timm = pytest.importorskip("torch"), pytest.importorskip("timm")
    from hf_cache import add_repo

    torch.manual_seed(0)
    reference = timm.create_model(model_name, pretrained=False, num_classes=4, **options).eval()
    timm.models._hub.save_for_hf(reference, str(tmp_path / "files"), safe_serialization=True)
    add_repo(offline_hub, hub_name, str(tmp_path / "files"))

    config = _config(**{"distill.teacher": hub_name, "distill.image_size": pixels, "dtype": "float32"})
    teacher = distill.load_teacher(config, list("abcd"))
    assert teacher.mean == TEACHER_NORM["mean"] and teacher.std == TEACHER_NORM["std"]  # the weights' own
    assert teacher.image_size == (pixels, pixels)  # distill.image_size over the weights' own: no resize here
    images = _batch(size=2, pixels=pixels)["image"]
    student_input = (images / 255.0 - np.asarray(STUDENT_NORM["mean"])) / np.asarray(STUDENT_NORM["std"])
    ours = np.asarray(teacher.logits(teacher.state, jnp.asarray(student_input, jnp.float32),
                                     STUDENT_NORM["mean"], STUDENT_NORM["std"]))
    raw = (images / 255.0 - np.asarray(TEACHER_NORM["mean"])) / np.asarray(TEACHER_NORM["std"])
    with torch.no_grad():
        theirs = reference(torch.from_numpy(raw.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) < 1e-4
    assert len(os.listdir(tmp_path / "jaxclf_cache" / "converted")) == 1  # converted once, kept in the cache


STUDENT_SEEDS = (0, 1, 2)


@pytest.mark.slow
def test_a_student_taught_by_resnet18_learns_and_is_not_worse_than_alone(digits_root, tmp_path):
    """On 40 training digits (4 per class), the small CNN of tests/small_cnn_config.py taught by a ResNet-18
    (trained here on the full train split, 16 px: about 0.95 val top-1) against the same student trained
    alone, same steps, for each seed of STUDENT_SEEDS (the student's initialisation and data order).

    The claim as measured (2-core AMD EPYC, 3 seeds): alone 0.903 / 0.861 / 0.864 (mean 0.876), taught
    0.894 / 0.894 / 0.897 (mean 0.895). The mean gain, +0.019, is smaller than the seed-to-seed spread of
    the student alone (0.042), so distillation does not reliably beat one run alone (another CPU measured
    one seed at alone 0.894, taught 0.878); what holds with a margin is that every taught student learns
    (>= 0.85) and that taught students are not worse on average beyond that noise (0.02).
    About 10-15 minutes on 2 cores, a fifth of it the teacher.
    """
    teacher_config = config_lib.load_config("configs/quickstart.py")
    teacher_config.data.update(root=digits_root, prepare="", num_workers=1, pp_eval="decode",
                               pp_train="decode|inception_crop(16, scale=(0.6, 1.0), ratio=(0.8, 1.25))")
    teacher_config.num_epochs = 6.0
    teacher_val = train.train_and_evaluate(teacher_config, str(tmp_path / "teacher"), devices=jax.devices()[:1])
    assert teacher_val["val/accuracy"] >= 0.9
    few = _few_digits(digits_root, tmp_path / "few", per_class=4)

    def student(seed, **overrides):
        config = config_lib.load_config(f"tests/small_cnn_config.py:{few}", [
            "total_steps=300", "optim.lr=0.01", f"seed={seed}", *[f"{k}={v}" for k, v in overrides.items()]])
        name = f"{'taught' if overrides else 'alone'}_{seed}"
        return train.train_and_evaluate(config, str(tmp_path / name), devices=jax.devices()[:1])["val/accuracy"]

    alone = np.array([student(seed) for seed in STUDENT_SEEDS])
    taught = np.array([student(seed, **{"distill.teacher": str(tmp_path / "teacher"), "distill.alpha": 0.9})
                       for seed in STUDENT_SEEDS])
    print(f"student alone {alone.round(4).tolist()} (mean {alone.mean():.4f}, spread {np.ptp(alone):.4f}), taught by "
          f"ResNet-18 {taught.round(4).tolist()} (mean {taught.mean():.4f}, spread {np.ptp(taught):.4f})")
    assert taught.min() >= 0.85
    assert taught.mean() >= alone.mean() - 0.02


def _few_digits(root, dest, per_class):
    """`per_class` training images of each digit (the first ones) and the whole val split, linked."""
    for digit in range(10):
        for split in ("train", "val"):
            names = sorted(os.listdir(os.path.join(root, split, str(digit))))
            os.makedirs(dest / split / str(digit))
            for name in names[:per_class] if split == "train" else names:
                os.symlink(os.path.join(root, split, str(digit), name), dest / split / str(digit) / name)
    return str(dest)
