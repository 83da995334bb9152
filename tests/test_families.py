"""EfficientNet, MobileNetV3 and ConvNeXt: timm's parameter counts, logits equal timm's and torchvision's
after conversion, and the metadata training asks of a model (stages, layer ids, head, stochastic depth)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxclf import config as config_lib, models, weights
from jaxclf.models import tree_paths
from jaxclf.tasks import registry as task_registry
from jaxclf.training import resolve
from jaxclf.explain import cam_stage
from hf_cache import add_repo, offline_hub  # noqa: F401 - offline_hub is a fixture
from model_helpers import SMALL_FORMS, with_random_values
from test_models import CONVNEXTS, EFFICIENTNETS, MOBILENETV3S

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from torch_reference import randomize_norms, torch_logits, torch_pre_logits  # noqa: E402

# One small size per family, for the tests that build and run models.
SMALL = ["efficientnet_b0", "mobilenetv3_small_100", "convnext_atto"]


def _jitted(model: nnx.Module, fn, *args):
    """fn(model, *args) under jit (one compile instead of one per op)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))(state, *args)


def _logits(model: nnx.Module, images: np.ndarray) -> np.ndarray:
    return np.asarray(_jitted(model, lambda m, x: m(x), images))


def _images(size: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, size, size, 3), dtype=np.float32)


def _assert_close(ours, theirs, tol=1e-4):
    relative = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
    assert relative < tol, relative


def _save(reference: "torch.nn.Module", path) -> str:
    """`reference`'s state dict as `.safetensors` or a torch file, by `path`'s suffix."""
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return str(path)


def _convert(reference: "torch.nn.Module", name: str, path) -> tuple[nnx.Module, weights.Pretrained]:
    """`reference`'s state dict written to `path`, converted, and loaded into jaxclf's `name` in eval mode
    (built without running its initialisers: their per-shape compiles take a minute on two cores)."""
    params, info = weights.convert(_save(reference, path), name)
    model = with_random_values(lambda: models.create(name, num_classes=info.num_classes, **info.model_options))
    weights.apply(model, params)
    model.eval()
    return model, info


# The larger sizes take seconds each to trace (b7: 55 blocks): they run with `make test-all`.
FAST_COUNTS = ("efficientnet_b0", "efficientnet_b2", "tf_efficientnet_b0", *MOBILENETV3S, "convnext_atto",
               "convnext_tiny")


@pytest.mark.parametrize("name", [n if n in FAST_COUNTS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in EFFICIENTNETS + MOBILENETV3S + CONVNEXTS])
def test_param_count_equals_timm(name):
    with torch.device("meta"):  # shapes only, nothing allocated
        expected = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
    model = nnx.eval_shape(lambda: models.create(name, num_classes=1000))
    assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == expected


@pytest.mark.parametrize("name,size", [
    ("efficientnet_b0", 67),
    ("tf_efficientnet_b0", 64),  # even: TF "same" pads stride-2 convs at the bottom/right only
    ("mobilenetv3_small_100", 67),
    pytest.param("mobilenetv3_large_100", 64, marks=pytest.mark.slow),
    ("convnext_atto", 64),  # conv_mlp: 1x1 convs
    pytest.param("convnext_tiny", 64, marks=pytest.mark.slow),  # Linears (also checked from torchvision's file)
])
def test_timm_logits_match(name, size, tmp_path):
    torch.manual_seed(0)
    reference = randomize_norms(timm.create_model(name, pretrained=False, num_classes=7))
    model, info = _convert(reference, name, tmp_path / "w.safetensors")
    assert info.num_classes == 7 and info.source_format.startswith("timm_")
    images = _images(size)
    _assert_close(_logits(model, images), torch_logits(reference, images))
    pooled = _jitted(model, lambda m, x: m.pooled_features(m.forward_features(x)), images)
    _assert_close(np.asarray(pooled), torch_pre_logits(reference, images))


@pytest.mark.parametrize("torchvision_name,name,source_format", [
    ("efficientnet_b0", "efficientnet_b0", "torchvision_efficientnet"),
    ("mobilenet_v3_large", "mobilenetv3_large_100", "torchvision_mobilenetv3"),
    ("convnext_tiny", "convnext_tiny", "torchvision_convnext"),
])
def test_torchvision_logits_match(torchvision_name, name, source_format, tmp_path):
    import torchvision

    torch.manual_seed(0)
    reference = randomize_norms(getattr(torchvision.models, torchvision_name)(num_classes=5))
    model, info = _convert(reference, name, tmp_path / "w.pth")
    assert info.source_format == source_format
    images = _images(64)
    _assert_close(_logits(model, images), torch_logits(reference, images))


def test_torchvision_mobilenetv3_needs_its_batchnorm_eps(tmp_path):
    import torchvision

    reference = randomize_norms(torchvision.models.mobilenet_v3_small(num_classes=5))
    model, info = _convert(reference, "mobilenetv3_small_100", tmp_path / "w.pth")
    assert info.model_options == {"bn_eps": 1e-3}  # torchvision's; timm's is 1e-5
    _assert_close(_logits(model, _images(64)), torch_logits(reference, _images(64)))


def test_efficientnet_weights_carry_their_input_size(tmp_path):
    reference = timm.create_model("efficientnet_b3", pretrained=False, num_classes=3)
    params, info = weights.convert(_save(reference, tmp_path / "b3.safetensors"), "efficientnet_b3")
    assert info.preprocessing["input_size"] == 300 and info.preprocessing["interpolation"] == "bicubic"




@pytest.mark.parametrize("name", SMALL)
def test_stages_split_the_forward_pass_for_grad_cam(name):
    model = with_random_values(lambda: models.create(name, num_classes=4), spread=0.5)
    model.eval()
    images = jnp.asarray(_images(64))
    for stage in (1, 2, 3, 4):  # strides 4, 8, 16, 32
        shape = nnx.eval_shape(lambda m, x, s=stage: m.forward_features(x, s), model, images).shape
        assert shape[1:3] == (64 // 2 ** (stage + 1),) * 2
    whole, split = _jitted(model, lambda m, x: (m(x), m.forward_head(m.forward_features(x, 3), 3)), images)
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)
    assert cam_stage(model, (1, 96, 96, 3)) == 3  # the deepest map of at least 4x4: 6x6 at 96 px


@pytest.mark.parametrize("name", SMALL)
def test_layer_ids_run_from_stem_to_head_one_per_block(name):
    model = nnx.eval_shape(lambda: models.create(name, num_classes=4))
    paths = list(tree_paths.flatten(nnx.state(model, nnx.Param)))
    ids = {path: model.layer_id(path) for path in paths}
    head = [p for p in paths if models.matches(p, model.head_paths())]
    assert head and all(ids[p] == max(ids.values()) for p in head)
    assert min(ids.values()) == 0 and sorted(set(ids.values())) == list(range(max(ids.values()) + 1))


# MobileNetV3 has EfficientNet's blocks; both share models/drop_path.py, so EfficientNet's runs in make test-all.
@pytest.mark.parametrize("name", [pytest.param("efficientnet_b0", marks=pytest.mark.slow), "convnext_atto"])
def test_stochastic_depth_drops_whole_branches_per_example_in_training_only(name):
    model = with_random_values(lambda: models.create(name, num_classes=4, drop_path_rate=0.5))
    images = jnp.asarray(np.repeat(_images(32, 1), 8, axis=0))  # 8 copies of one image
    model.eval()
    evaluated = _logits(model, images)
    np.testing.assert_allclose(evaluated, np.repeat(evaluated[:1], 8, axis=0), rtol=1e-6)
    model.train()
    trained = _logits(model, images)
    assert len({row.tobytes() for row in trained}) > 1  # each copy drew its own branches


# ConvNeXt's under make test-all: the other two families check the same downstream path by default.
@pytest.mark.parametrize("name", [n if n != "convnext_atto" else pytest.param(n, marks=pytest.mark.slow) for n in SMALL])
def test_a_train_step_with_fsdp_ema_bf16_layer_decay_and_frozen_stem_and_bn(name):
    """One bfloat16 step at 40 px (not the pretrained size) on 8 devices, params FSDP-split: the frozen stem
    and the BatchNorm statistics stay, the rest moves, the EMA trails the params."""
    from jaxclf.training import optim, sharding, steps
    from jaxclf.config import base_config

    model = with_random_values(lambda: models.create(name, num_classes=4, dtype=jnp.bfloat16, drop_path_rate=0.1,
                                                      **SMALL_FORMS[name]))
    config = base_config()
    config.update(dict(dtype="bfloat16", ema_decay=0.5, freeze_bn_stats=True, param_sharding="fsdp"))
    config.data.mean, config.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    config.optim.update(dict(name="adamw", lr=1e-2, layer_decay=0.5, freeze="^(conv_stem|bn1|stem)/"))
    mesh = sharding.make_mesh(jax.devices())
    tx, _ = optim.make_optimizer(config.optim, model, 10, 10)
    graphdef, _, state = steps.create_train_state(model, tx, ema=True, freeze_bn_stats=True)
    state_sharding = sharding.state_sharding(state, mesh, "fsdp")
    before = jax.device_get(state)
    state = jax.device_put(state, state_sharding)
    step = steps.make_train_step(graphdef, tx, mesh, config, 4, state_sharding, steps.cross_entropy_loss())
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (16, 40, 40, 3), dtype=np.uint8), "label": rng.integers(0, 4, 16).astype(np.int32)}
    state, metrics = step(state, sharding.shard_batch(batch, mesh))
    after = jax.device_get(state)
    assert np.isfinite(float(metrics["loss"]))
    params, old = tree_paths.flatten(after.params), tree_paths.flatten(before.params)
    frozen = [p for p in params if p.split("/")[0] in ("conv_stem", "bn1", "stem")]
    assert frozen and all(np.array_equal(params[p], old[p]) for p in frozen)
    head = [p for p in params if models.matches(p, model.head_paths())]
    assert all(not np.array_equal(params[p], old[p]) for p in head)
    stats, old_stats = tree_paths.flatten(after.model_state), tree_paths.flatten(before.model_state)
    assert all(np.array_equal(stats[p], old_stats[p]) for p in stats if p.endswith(("/mean", "/var")))
    ema = tree_paths.flatten(after.ema_params)
    moved = [p for p in head if not np.allclose(params[p], old[p])]
    assert moved and all(not np.allclose(ema[p], params[p]) for p in moved)
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(state.params))  # FSDP split something


@pytest.mark.parametrize("config_file, repo, architecture, mean", [
    ("configs/edge.py", "timm/mobilenetv3_large_100.ra_in1k", "mobilenetv3_large_100", (0.485, 0.456, 0.406)),
    ("configs/convnext.py", "timm/convnext_tiny.in12k_ft_in1k", "convnext_tiny", (0.485, 0.456, 0.406)),
])
def test_family_configs_resolve_with_their_hub_weights(config_file, repo, architecture, mean, offline_hub, tmp_path):
    """The config's hub name, from an offline cache holding timm's files for it: the weights fit the model the
    config names, and their preprocessing fills the config."""
    timm.models._hub.save_for_hf(timm.create_model(architecture, num_classes=1000), str(tmp_path / "files"),
                                 safe_serialization=True)
    add_repo(offline_hub, repo, str(tmp_path / "files"))
    config = config_lib.load_config(config_file)
    resolved = resolve.resolve(config, "cpu", task_registry.check_config)
    params, info = resolved.pretrained
    assert info.model_name == config.model_name == architecture and info.num_classes == 1000
    assert tuple(resolved.config.data.mean) == mean and resolved.config.dtype == "float32"
    model = nnx.eval_shape(lambda: models.create_model(resolved.config, 1000))
    shapes = {k: v.shape for k, v in tree_paths.flatten(nnx.state(model, nnx.Not(nnx.RngState))).items()}
    assert {k: v.shape for k, v in params.items()} == shapes  # every weight has its place, and no more


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("teacher_name, student_name", [
    ("convnext_atto", "mobilenetv3_small_100"),
    pytest.param("mobilenetv3_small_100", "convnext_atto", marks=pytest.mark.slow),  # the other way: make test-all
])
def test_distillation_step_between_families_equals_numpy(teacher_name, student_name):
    """A train step's loss, (1 - alpha) * cross-entropy + alpha * T^2 KL(teacher || student), against the two
    models run directly: the teacher in eval mode on its own mean/std, the student in train mode."""
    from jaxclf.tasks import distill
    from jaxclf.training import optim, sharding, steps
    from jaxclf.config import base_config

    alpha, temperature = 0.5, 2.0
    student_norm, teacher_norm = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    teacher_model = with_random_values(lambda: models.create(teacher_name, num_classes=4, **SMALL_FORMS[teacher_name]),
                                       seed=1, spread=0.5)
    teacher = distill.Teacher.from_model("distill", teacher_model, mean=teacher_norm[0], std=teacher_norm[1])
    student = with_random_values(lambda: models.create(student_name, num_classes=4, **SMALL_FORMS[student_name]),
                                 spread=0.5)
    config = base_config()
    config.data.mean, config.data.std = student_norm
    config.optim.update(dict(name="sgd", lr=0.1))
    config.distill.update(dict(teacher="in-memory", alpha=alpha, temperature=temperature, mode="soft"))
    mesh = sharding.make_mesh(jax.devices()[:1])
    tx, _ = optim.make_optimizer(config.optim, student, 1, 1)
    graphdef, _, state = steps.create_train_state(student, tx)
    state_sharding = sharding.state_sharding(state, mesh, config.param_sharding)
    step = steps.make_train_step(graphdef, tx, mesh, config, 4, state_sharding, distill.with_distillation(steps.cross_entropy_loss(), teacher, config))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), "label": rng.integers(0, 4, 8).astype(np.int32)}
    student_logits = np.asarray(_jitted(nnx.merge(graphdef, state.params, state.model_state), lambda m, x: m(x),
                                        (batch["image"] / 255.0 - student_norm[0]) / np.asarray(student_norm[1])),
                                np.float64)
    teacher_logits = np.asarray(_jitted(teacher_model, lambda m, x: m(x),
                                        (batch["image"] / 255.0 - teacher_norm[0]) / np.asarray(teacher_norm[1])),
                                np.float64)
    _, metrics = step(jax.device_put(state, state_sharding), sharding.shard_batch(batch, mesh))
    cross_entropy = -_log_softmax(student_logits)[np.arange(8), batch["label"]].mean()
    p_teacher = np.exp(_log_softmax(teacher_logits / temperature))
    kl = (p_teacher * (_log_softmax(teacher_logits / temperature) - _log_softmax(student_logits / temperature))).sum(-1)
    expected = (1 - alpha) * cross_entropy + alpha * temperature**2 * kl.mean()
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)
