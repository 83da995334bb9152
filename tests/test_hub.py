"""Pretrained weights by hub name: telling names from paths, an offline Hugging Face cache, the converted cache."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hf_cache import add_repo, offline_hub  # noqa: F401 - offline_hub is a fixture
from jaxclf import load_pretrained, weights
from jaxclf.weights import hub
from torch_reference import randomize_norms, torch_logits

timm = pytest.importorskip("timm")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("source, repo", [
    ("timm/resnet50.a1_in1k", "timm/resnet50.a1_in1k"),
    ("google/vit-base-patch16-224", "google/vit-base-patch16-224"),
    ("hf:timm/resnet50.a1_in1k", "timm/resnet50.a1_in1k"),
    ("hf:weights/vit", "weights/vit"),  # hf: always means the hub
    ("weights/vit_base_patch16_224", None),  # jaxclf's own folders are never organisations
    ("runs/pets", None),
    ("./vit", None), ("../models/vit", None), ("/abs/vit", None), ("~/vit", None),
    ("a/b/c", None), ("org/model.pth", None), ("model.safetensors", None), ("resnet50", None),
])
def test_hub_names_and_paths_are_told_apart(source, repo):
    assert hub.hub_repo(source) == repo


def test_an_existing_folder_is_a_path_even_if_it_reads_like_a_hub_name(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.hub_repo("org/name") is None


def test_a_missing_path_gives_the_convert_command_and_never_asks_the_hub(monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    for source in ("weights/vit_base_patch16_224", "./vit", "/no/such/file.pth"):
        with pytest.raises(weights.WeightsError) as error:
            weights.load(source)
        assert f"python -m jaxclf.convert WEIGHTS_FILE --model MODEL_NAME --out {source}" in str(error.value)


def test_a_name_missing_from_the_offline_cache_says_what_to_do(offline_hub):
    with pytest.raises(weights.WeightsError) as error:
        weights.load("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")
    message = str(error.value)
    assert "not in the Hugging Face cache" in message and offline_hub in message and "HF_HUB_OFFLINE is set" in message
    assert "hf download timm/vit_base_patch16_224.augreg2_in21k_ft_in1k" in message
    assert "https://huggingface.co/timm/vit_base_patch16_224.augreg2_in21k_ft_in1k/resolve/main/model.safetensors" in message


def _timm_repo(folder, architecture: str, **kwargs):
    torch.manual_seed(0)
    reference = randomize_norms(timm.create_model(architecture, pretrained=False, num_classes=7, **kwargs))
    timm.models._hub.save_for_hf(reference, str(folder), safe_serialization=True)
    return reference


def _transformers_repo(folder):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                                    intermediate_size=768, image_size=224, patch_size=16, num_labels=7)
    torch.manual_seed(0)
    reference = randomize_norms(transformers.ViTForImageClassification(config))
    reference.save_pretrained(str(folder))
    transformers.ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(str(folder))
    return reference


# (hub name, how the test makes its files, jaxclf model it holds, mean it carries)
HUB_MODELS = {
    "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k": (lambda d: _timm_repo(d, "vit_tiny_patch16_224"),
                                                       "vit_tiny_patch16_224", [0.5, 0.5, 0.5]),
    "timm/resnet18.a1_in1k": (lambda d: _timm_repo(d, "resnet18"), "resnet18", [0.485, 0.456, 0.406]),
    "google/vit-tiny-test": (_transformers_repo, "vit_tiny_patch16_224", [0.5, 0.5, 0.5]),
    "timm/mobilenetv3_small_100.lamb_in1k": (lambda d: _timm_repo(d, "mobilenetv3_small_100"), "mobilenetv3_small_100",
                                             [0.485, 0.456, 0.406]),
    # DINOv2's files are 518 px; at 224 here for the test's time (the position embedding says the size).
    "timm/vit_small_patch14_dinov2.lvd142m": (lambda d: _timm_repo(d, "vit_small_patch14_dinov2", img_size=224),
                                              "vit_small_patch14_dinov2", [0.485, 0.456, 0.406]),
    "timm/eva02_tiny_patch14_224.mim_in22k": (lambda d: _timm_repo(d, "eva02_tiny_patch14_224"),
                                              "eva02_tiny_patch14_224", [0.48145466, 0.4578275, 0.40821073]),
}
# Longer variants (the same path as timm's ViT and ResNet above), for make test-all.
SLOW_HUB_MODELS = ("timm/mobilenetv3_small_100.lamb_in1k", "timm/resnet18.a1_in1k", "timm/vit_small_patch14_dinov2.lvd142m",
                   "timm/eva02_tiny_patch14_224.mim_in22k")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_HUB_MODELS else n
                                  for n in HUB_MODELS])
def test_hub_weights_from_an_offline_cache_match_the_reference(name, offline_hub, tmp_path, monkeypatch):
    make_files, model_name, mean = HUB_MODELS[name]
    reference = make_files(tmp_path / "files")
    add_repo(offline_hub, name, str(tmp_path / "files"))

    model, info = load_pretrained(name)
    assert (info.source, info.model_name, info.num_classes) == (name, model_name, 7)
    assert list(info.preprocessing["mean"]) == mean
    images = np.random.default_rng(0).standard_normal((2, 224, 224, 3), dtype=np.float32)
    theirs = torch_logits(reference, images)
    ours = np.asarray(model(images))
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) < 1e-4

    # A second start reads the converted cache and does not convert again.
    entries = os.listdir(tmp_path / "jaxclf_cache" / "converted")
    assert len(entries) == 1
    monkeypatch.setattr(weights, "convert", lambda *a, **k: pytest.fail("converted again"))
    params_again, info_again = weights.load(name)
    assert info_again == info
    params, _ = weights._read_converted(str(tmp_path / "jaxclf_cache" / "converted" / entries[0]))
    assert params_again.keys() == params.keys()


def test_new_files_under_the_same_name_are_converted_anew(offline_hub, tmp_path):
    name = "timm/resnet18.a1_in1k"
    _timm_repo(tmp_path / "v1", "resnet18")
    add_repo(offline_hub, name, str(tmp_path / "v1"))
    first, _ = weights.load(name)
    import shutil

    shutil.rmtree(os.path.join(offline_hub, "models--timm--resnet18.a1_in1k"))
    torch.manual_seed(1)
    timm.models._hub.save_for_hf(timm.create_model("resnet18", num_classes=7), str(tmp_path / "v2"),
                                 safe_serialization=True)
    add_repo(offline_hub, name, str(tmp_path / "v2"))
    second, _ = weights.load(name)
    assert len(os.listdir(tmp_path / "jaxclf_cache" / "converted")) == 2
    assert not np.array_equal(first["conv1/kernel"], second["conv1/kernel"])


@pytest.mark.slow  # the default run checks the hub path (above) and fine-tuning from converted weights (test_weights)
def test_vit_b_config_trains_from_an_offline_cache_without_a_convert_step(digits_root, offline_hub, tmp_path):
    """`python -m jaxclf.train --config configs/vit_b.py --config.data.root=DIR` as README gives it, with
    the config's hub weights (random ViT-B/16 here) in the cache: no convert command, no network."""
    name = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
    torch.manual_seed(0)
    timm.models._hub.save_for_hf(timm.create_model("vit_base_patch16_224", num_classes=1000),
                                 str(tmp_path / "files"), safe_serialization=True)
    add_repo(offline_hub, name, str(tmp_path / "files"))
    # Small images and two steps: what is tested is the start, not ViT-B's speed on a CPU.
    small = ["--config.model.img_size=32", "--config.data.pp_train=decode|resize(32)|flip_lr",
             "--config.data.pp_eval=decode|resize(32)", "--config.batch_size=8", "--config.total_steps=2",
             "--config.data.num_workers=0"]

    result = subprocess.run([sys.executable, "-m", "jaxclf.train", "--config", os.path.join(REPO, "configs/vit_b.py"),
                             f"--config.data.root={digits_root}", *small],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=""))  # one device: 8 simulated ones
                                                                                 # update 8 copies of ViT-B
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"converting {name}" in result.stderr and "resampled" in result.stderr.lower()
    with open(tmp_path / "runs" / "vit_b" / "result.json") as f:
        assert json.load(f)["status"] == "done"
    with open(tmp_path / "runs" / "vit_b" / "config.json") as f:
        assert json.load(f)["data"]["mean"] == [0.5, 0.5, 0.5]  # from timm's pretrained_cfg, not ImageNet's

    # Converted once, into the cache a later start reads (that it is read: the test above).
    assert len(os.listdir(tmp_path / "jaxclf_cache" / "converted")) == 1


def _closed_port_url() -> str:
    """An address on this machine where nothing listens: connections are refused, as with no network."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_an_unreachable_hub_is_detected_on_the_first_failure(tmp_path, monkeypatch, caplog):
    """Nothing cached and no hub: one refused request, then the error, not huggingface_hub's retries with
    back-off sleeps (before: 52 s and ten warnings). The bound is far below those sleeps, far above a refusal."""
    from huggingface_hub import constants

    endpoint = _closed_port_url()
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    started = time.monotonic()
    with pytest.raises(weights.WeightsError, match=rf"not in the Hugging Face cache .* the hub \({endpoint}\) cannot be reached"):
        hub.download("timm/resnet18.tv_in1k")
    assert time.monotonic() - started < 15
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]


def test_an_unreachable_hub_fails_the_run_with_one_line(digits_root, tmp_path):
    """`python -m jaxclf.train --config configs/vit_b.py` with no network: exit status 2 and one error line."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(PYTHONPATH=REPO, HF_ENDPOINT=_closed_port_url(), HF_HUB_CACHE=str(tmp_path / "empty_cache"),
               JAXCLF_CACHE=str(tmp_path / "jaxclf_cache"))
    result = subprocess.run([sys.executable, "-m", "jaxclf.train", "--config", os.path.join(REPO, "configs/vit_b.py"),
                             f"--config.data.root={digits_root}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("workdir:")]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k is not in the Hugging Face cache" in errors[0]
    assert f"the hub ({env['HF_ENDPOINT']}) cannot be reached" in errors[0]
