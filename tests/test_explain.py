"""Explanations: Grad-CAM finds the evidence a trained model uses; attention rollout follows attention; the hooks
the models gained (ResNet features, ViT attention weights) agree with the models' own forward passes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jaxclf import config as config_lib, explain, models, train
from jaxclf.runs import inference
from jaxclf.models import eva, resnet, vit
from tests.model_helpers import CamNet, with_random_values

SIZE, PATCH = 32, 8
COLORS = ((230, 40, 40), (40, 40, 230))  # class 0: a red square, class 1: a blue one
TOP_RIGHT, BOTTOM_LEFT = 1, 2  # quadrants in row-major order


def _quadrant_image(rng, label: int, quadrant: int) -> np.ndarray:
    """Gray noise with the class's colored square in the middle of `quadrant` (the only class evidence)."""
    image = rng.integers(90, 166, (SIZE, SIZE, 3)).astype(np.uint8)
    top = (quadrant // 2) * SIZE // 2 + (SIZE // 2 - PATCH) // 2
    left = (quadrant % 2) * SIZE // 2 + (SIZE // 2 - PATCH) // 2
    image[top : top + PATCH, left : left + PATCH] = COLORS[label]
    return image


def _quadrant_mass(heatmap: np.ndarray) -> np.ndarray:
    half = SIZE // 2
    masses = np.array([heatmap[:half, :half].sum(), heatmap[:half, half:].sum(),
                       heatmap[half:, :half].sum(), heatmap[half:, half:].sum()])
    return masses / masses.sum()


if "quadrant_cnn" not in models.list_models():
    # CamNet with two strided convs, wider: the model the quadrant test trains.
    models.register("quadrant_cnn")(lambda num_classes, rngs, dtype: CamNet(num_classes, rngs, (16, 32), (2, 2)))


@pytest.fixture(scope="module")
def quadrant_run(tmp_path_factory) -> str:
    """CamNet ("quadrant_cnn") trained for 24 steps on squares placed in random quadrants (the workdir)."""
    root = tmp_path_factory.mktemp("quadrants")
    rng = np.random.default_rng(0)
    for split, count in (("train", 48), ("val", 8)):
        for label in (0, 1):
            (root / split / f"c{label}").mkdir(parents=True)
            for i in range(count):
                image = _quadrant_image(rng, label, int(rng.integers(4)))
                Image.fromarray(image).save(root / split / f"c{label}" / f"{i}.png")
    config = config_lib.base_config()
    config.model_name = "quadrant_cnn"
    config.data.root = str(root)
    config.data.pp_train = config.data.pp_eval = "decode"
    config.data.mean, config.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    config.data.num_workers = 0
    config.batch_size, config.total_steps = 16, 24
    config.optim.name, config.optim.lr, config.optim.weight_decay = "adamw", 0.01, 0.0
    config.eval_every_epochs = 1000.0
    workdir = str(tmp_path_factory.mktemp("quadrant_run") / "run")
    assert train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])["val/accuracy"] == 1.0
    return workdir


@pytest.mark.parametrize("quadrant", [TOP_RIGHT, BOTTOM_LEFT])
def test_grad_cam_concentrates_on_the_evidence(quadrant_run, quadrant):
    trained = inference.load_trained(quadrant_run)
    rng = np.random.default_rng(quadrant)
    for label in (0, 1):
        result = explain.explain(trained, _quadrant_image(rng, label, quadrant))
        assert result["method"] == "Grad-CAM" and result["predicted"] == f"c{label}"
        masses = _quadrant_mass(result["heatmap"])
        assert masses.argmax() == quadrant and masses[quadrant] > 0.6, masses


def test_explain_command_writes_an_overlay(quadrant_run, tmp_path, capsys):
    path = str(tmp_path / "square.png")
    Image.fromarray(_quadrant_image(np.random.default_rng(9), 1, TOP_RIGHT)).save(path)
    out = str(tmp_path / "explained" / "overlay.png")
    assert explain.main(["--workdir", quadrant_run, path, "--class", "c0", "--out", out]) == 0
    assert "Grad-CAM (final 8x8 map), predicted c1" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (900, 480) and np.asarray(image.convert("L")).std() > 10
    assert explain.main(["--workdir", quadrant_run, path, "--class", "dog", "--out", out]) == 2
    assert "--class 'dog' is not a class of this run" in capsys.readouterr().err


def test_a_model_without_hooks_is_named(trained_workdir, digits_root, tmp_path, capsys):
    image = os.path.join(digits_root, "val", "1", sorted(os.listdir(os.path.join(digits_root, "val", "1")))[0])
    assert explain.main(["--workdir", trained_workdir, image, "--out", str(tmp_path / "x.png")]) == 2
    assert "model 'tiny_cnn' offers no hook to explain" in capsys.readouterr().err


def test_grad_cam_of_a_resnet_is_its_class_activation_map():
    """With a global-average-pool + linear head, Grad-CAM equals CAM: relu(features @ fc.kernel[:, c]) / (h * w)."""
    model = with_random_values(lambda: resnet.ResNet(block=resnet.BasicBlock, depths=(1, 1, 1, 1), num_classes=4,
                                                     rngs=nnx.Rngs(0)))
    model.eval()
    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), jnp.float32)
    features, logits, head_of_features = nnx.jit(
        lambda m, x: (m.forward_features(x), m(x), m.forward_head(m.forward_features(x))))(model, images)
    assert features.shape == (1, 2, 2, 512)
    np.testing.assert_allclose(head_of_features, logits, rtol=1e-6)
    cam = jax.nn.relu(features[0] @ model.fc.kernel[...][:, 2]) / 4
    np.testing.assert_allclose(explain.grad_cam(model, images, 2, stage=4), cam, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("size, stage", [(32, 2), (64, 3), (128, 4)])
def test_grad_cam_uses_the_deepest_stage_with_a_4x4_map(size, stage):
    """At 32 px a ResNet's last stage is 1x1 (a flat map): Grad-CAM moves to the deepest stage of >= 4x4,
    and the map of an earlier stage through the rest of the network is that stage's Grad-CAM."""
    model = with_random_values(lambda: resnet.ResNet(block=resnet.BasicBlock, depths=(1, 1, 1, 1), num_classes=4,
                                                     rngs=nnx.Rngs(0)))
    model.eval()
    images = jnp.asarray(np.random.default_rng(1).normal(size=(1, size, size, 3)), jnp.float32)
    assert explain.cam_stage(model, images.shape) == stage
    cam = explain.grad_cam(model, images, 1, stage)
    assert cam.shape == (size // 2 ** (stage + 1),) * 2 and cam.std() > 0
    np.testing.assert_allclose(nnx.jit(lambda m, x: m.forward_head(m.forward_features(x, 2), 2))(model, images),
                               nnx.jit(lambda m, x: m(x))(model, images), rtol=1e-5, atol=1e-6)


def _small_vit(**options) -> vit.VisionTransformer:
    kwargs = dict(num_classes=2, img_size=SIZE, patch_size=PATCH, width=32, depth=2, num_heads=2, drop_rate=0.0,
                  drop_path_rate=0.0, class_token=True, global_pool="token", norm_eps=1e-6, pre_logits_size=0)
    kwargs.update(options)
    return with_random_values(lambda: vit.VisionTransformer(**kwargs, rngs=nnx.Rngs(0), dtype=jnp.float32))


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_vit_sown_attention_weights_reproduce_each_attention_layer(reg_tokens):
    """The weights explain captures (nnx.capture of what Attention sows) times v are the layer's output."""
    model = _small_vit(reg_tokens=reg_tokens)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, SIZE, SIZE, 3)), jnp.float32)
    maps = explain.attention_maps(model, images)
    tokens = 1 + reg_tokens + (SIZE // PATCH) ** 2
    assert maps.shape == (2, 1, 2, tokens, tokens)
    np.testing.assert_allclose(maps.sum(axis=-1), 1.0, rtol=1e-5)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, tokens, 32)), jnp.float32)
    attn = model.blocks[0].attn
    qkv = attn.qkv(x).reshape(1, tokens, 3, 2, 16)
    by_weights = jnp.einsum("bhqk,bkhd->bqhd", explain.attention_maps(_attention_only(attn), x)[0], qkv[:, :, 2])
    np.testing.assert_allclose(attn.proj(by_weights.reshape(1, tokens, 32)), attn(x), rtol=1e-4, atol=1e-5)
    assert not attn.sow_weights  # capturing worked on a copy


def _attention_only(attention: nnx.Module, *args) -> nnx.Module:
    """A module that is just `attention` (called with tokens, then `args`), to capture its weights on given tokens."""

    class Wrapper(nnx.Module):
        def __init__(self):
            self.attn = attention

        def __call__(self, x):
            return self.attn(x, *args)

    return Wrapper()


def test_eva_sown_attention_weights_reproduce_its_rotary_attention_layer():
    """EVA-02 sows the weights of its rotated queries and keys: times v (the unrotated values) they give its output."""
    model = with_random_values(lambda: eva.Eva(num_classes=2, img_size=SIZE, patch_size=PATCH, width=32, depth=2,
                                               num_heads=2, rngs=nnx.Rngs(0), dtype=jnp.float32))
    tokens = 1 + (SIZE // PATCH) ** 2
    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, SIZE, SIZE, 3)), jnp.float32)
    assert explain.attention_maps(model, images).shape == (2, 1, 2, tokens, tokens)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, tokens, 32)), jnp.float32)
    attn = model.blocks[0].attn
    sin, cos = map(jnp.asarray, eva.rotary_sin_cos(SIZE // PATCH, 16))
    weights = explain.attention_maps(_attention_only(attn, sin, cos, 1), x)[0]
    v = (attn.qkv(x)[..., 64:] + attn.v_bias[...]).reshape(1, tokens, 2, 16)
    by_weights = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(1, tokens, 32)
    np.testing.assert_allclose(attn.proj(by_weights), attn(x, sin, cos, 1), rtol=1e-4, atol=1e-5)


def test_attention_rollout_of_a_model_without_class_token_covers_the_patch_grid():
    """SigLIP's towers pool by attention and have no class token: the map is the patches' mean row."""
    model = _small_vit(class_token=False, global_pool="map")
    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, SIZE, SIZE, 3)), jnp.float32)
    heatmap = explain.attention_rollout(model, images)
    assert heatmap.shape == (SIZE // PATCH, SIZE // PATCH) and (heatmap > 0).all()
    np.testing.assert_allclose(heatmap.sum(), 1.0, rtol=1e-5)  # rollout rows are distributions over tokens


def _red_seeking_vit() -> vit.VisionTransformer:
    """A one-block ViT whose class token, by construction, attends to the reddest patches.

    patch_embed puts each patch's redness (R - (G + B) / 2) in feature 0 and a constant 1 in feature
    1; the class token is feature 2. The query of the class token and the keys of the patches meet
    in one dimension: key = 20 * LayerNorm(token)[0], large for red patches and negative otherwise.
    """
    model = _small_vit(width=4, depth=1, num_heads=1)
    model.blocks[0].norm1.scale[...] = jnp.ones(4)
    model.blocks[0].norm1.bias[...] = jnp.zeros(4)
    model.blocks[0].attn.qkv.bias[...] = jnp.zeros(12)
    kernel = np.zeros((PATCH, PATCH, 3, 4), np.float32)
    kernel[:, :, 0, 0] = 1.0 / PATCH**2
    kernel[:, :, 1:, 0] = -0.5 / PATCH**2
    model.patch_embed.kernel[...] = jnp.asarray(kernel)
    model.patch_embed.bias[...] = jnp.asarray([0.0, 1.0, 0.0, 0.0])
    model.cls_token[...] = jnp.asarray([0.0, 0.0, 1.0, 0.0]).reshape(1, 1, 4)
    model.pos_embed[...] = jnp.zeros_like(model.pos_embed[...])
    qkv = np.zeros((4, 12), np.float32)
    qkv[2, 0] = 1.0  # query dimension 0 <- the class-token feature
    qkv[0, 4] = 20.0  # key dimension 0 <- redness
    model.blocks[0].attn.qkv.kernel[...] = jnp.asarray(qkv)
    return model


@pytest.mark.parametrize("quadrant", [TOP_RIGHT, BOTTOM_LEFT])
def test_attention_rollout_follows_the_attention(quadrant):
    """Through `explain`, the map of a ViT that attends to red squares lies on the red square."""
    config = config_lib.base_config()
    config.data.mean, config.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    trained = inference.TrainedModel("", config, ("c0", "c1"), _red_seeking_vit(), 0, "params")
    image = _quadrant_image(np.random.default_rng(quadrant), 0, quadrant)
    result = explain.explain(trained, image)
    assert result["method"] == "attention rollout"
    masses = _quadrant_mass(result["heatmap"])
    assert masses.argmax() == quadrant and masses[quadrant] > 0.8, masses
