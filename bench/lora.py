"""LoRA against full fine-tuning and a linear probe: what trains, what the optimizer keeps, step time, accuracy.

    PYTHONPATH=$PWD .venv/bin/python bench/lora.py --models vit_base_patch16_224,resnet50 --batch 4 \\
        --out bench/results/lora_cpu.json
    PYTHONPATH=$PWD .venv/bin/python bench/lora.py --accuracy --out bench/results/lora_digits_cpu.json

Step part: for each model, the three ways (full, lora, probe) are built and compiled with AdamW,
then timed in alternating rounds (machine noise hits them alike); reported per way: trainable
parameters and their fraction, optimizer-state bytes, median step time and its ratio to full
fine-tuning. LoRA targets: a ViT's qkv, proj, fc1, fc2; a ResNet's block convs (rank 8, alpha 16).

Accuracy part (`--accuracy`): the digits (the quickstart data) split by class: ResNet-18 is trained
on digits 0-4 (the "pretrained" backbone, saved as converted weights), then fine-tuned on digits
5-9 (a new head) by each of the three ways for the same epochs; reported: val accuracy, trainable
parameters, wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from jaxclf import config as config_lib, models, train
from jaxclf.models import peft, tree_paths
from jaxclf.runs import inference
from jaxclf.training import optim, sharding, steps as steps_lib
from jaxclf import weights

WAYS = ("full", "lora", "probe")
TARGETS = {"vit": ("qkv", "proj", "fc1", "fc2"), "resnet": (r"layer\d/\d+/conv",)}


def way_config(way: str, model: models.Classifier, family: str) -> config_lib.ml_collections.ConfigDict:
    """The config fields one way of fine-tuning sets: peft for LoRA, optim.freeze for the probe."""
    config = config_lib.base_config()
    config.optim.update(dict(name="adamw", lr=1e-3, weight_decay=0.0, schedule="constant"))
    if way == "lora":
        config.peft.update(dict(method="lora", rank=8, alpha=16.0, targets=TARGETS[family]))
    if way == "probe":
        config.optim.freeze = "^(?!(" + "|".join(model.head_paths()) + ")/)"
    return config


def trainable_params(model: models.Classifier, optim_config) -> tuple[int, int]:
    """(all parameters, those training changes) of `model` under `optim_config` (and its adapters)."""
    sizes = [leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))]
    frozen = jax.tree.leaves(optim.frozen_mask(optim_config, model))
    return sum(sizes), sum(size for size, f in zip(sizes, frozen) if not f)


def build_step(model_name: str, way: str, batch: int, size: int):
    """(compiled step, state, batch, record) for one way of fine-tuning `model_name`."""
    family = models.family(model_name)
    kwargs = {"img_size": size} if family == "vit" else {}
    model = models.create(model_name, num_classes=1000, **kwargs)
    config = way_config(way, model, family)
    config.data.mean, config.data.std = (0.5,) * 3, (0.5,) * 3
    peft.from_config(model, config)
    mesh = sharding.make_mesh(jax.devices()[:1])
    tx, _ = optim.make_optimizer(config.optim, model, 1000, 1000)
    graphdef, _, state = steps_lib.create_train_state(model, tx)
    state_sharding = sharding.state_sharding(state, mesh, "replicate")
    state = jax.device_put(state, state_sharding)
    step = steps_lib.make_train_step(graphdef, tx, mesh, config, 1000, state_sharding, steps_lib.cross_entropy_loss(),
                                     compiler_options=model.xla_cpu_train_options() if model.kernels == "cpu" else {},
                                     frozen_params=optim.frozen_mask(config.optim, model))
    rng = np.random.default_rng(0)
    data = sharding.shard_batch({"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                                 "label": rng.integers(0, 1000, batch).astype(np.int32)}, mesh)
    total, trained = trainable_params(model, config.optim)
    record = {
        "params": total,
        "trainable_params": trained,
        "trainable_fraction": trained / total,
        "optimizer_state_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(state.opt_state)),
        "params_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(state.params)),
    }
    start = time.perf_counter()
    compiled = step.lower(state, data).compile()
    record["compile_s"] = time.perf_counter() - start
    return compiled, state, data, record


def measure_steps(model_names: list[str], batch: int, size: int, rounds: int, steps_per_round: int,
                  save: Callable[[dict], None]) -> dict:
    """Per model and way: the `build_step` record with the median step time; `save`d after each model."""
    results = {}
    for name in model_names:
        built = {way: build_step(name, way, batch, size) for way in WAYS}
        states = {way: built[way][1] for way in WAYS}
        times = {way: [] for way in WAYS}
        for way in WAYS:  # one untimed step each
            states[way], metrics = built[way][0](states[way], built[way][2])
            jax.block_until_ready(metrics)
        for _ in range(rounds):
            for way in WAYS:
                compiled, _, data, _ = built[way]
                start = time.perf_counter()
                for _ in range(steps_per_round):
                    states[way], metrics = compiled(states[way], data)
                jax.block_until_ready(metrics)
                times[way].append((time.perf_counter() - start) / steps_per_round)
        results[name] = {}
        for way in WAYS:
            record = built[way][3]
            record["step_s"] = statistics.median(times[way])
            record["step_s_rounds"] = times[way]
            results[name][way] = record
        for way in WAYS:
            results[name][way]["step_time_vs_full"] = results[name][way]["step_s"] / results[name]["full"]["step_s"]
        del built, states
        _print_steps(name, results[name])
        save(results)
    return results


def _print_steps(name: str, result: dict) -> None:
    print(f"\n{name}")
    print(f"{'way':6} {'trainable':>12} {'fraction':>9} {'opt state MB':>13} {'step s':>8} {'vs full':>8}")
    for way, r in result.items():
        print(f"{way:6} {r['trainable_params']:>12,} {r['trainable_fraction']:>9.4f} "
              f"{r['optimizer_state_bytes'] / 2**20:>13.1f} {r['step_s']:>8.3f} {r['step_time_vs_full']:>8.2f}")


def _digits_config(root: str, classes: tuple[str, ...], epochs: float) -> config_lib.ml_collections.ConfigDict:
    config = config_lib.load_config("configs/quickstart.py")
    config.data.root = root
    config.data.classes = classes
    config.num_epochs = epochs
    config.data.num_workers = 1
    config.data.check = "off"
    return config


def measure_accuracy(pretrain_epochs: float, finetune_epochs: float) -> dict:
    """Digits 0-4 make the backbone; digits 5-9 are fine-tuned by each way from it."""
    from jaxclf.data import digits

    work = tempfile.mkdtemp(prefix="lora_bench_")
    root = digits.write_digits_folder(os.path.join(work, "digits"), image_size=32)
    devices = jax.devices()[:1]
    pretrain = _digits_config(root, tuple("01234"), pretrain_epochs)
    backbone_run = os.path.join(work, "backbone")
    start = time.perf_counter()
    backbone = train.train_and_evaluate(pretrain, backbone_run, devices=devices)
    results = {"backbone": {"classes": "0-4", "val_accuracy": float(backbone["val/accuracy"]),
                            "wall_s": time.perf_counter() - start}}
    loaded = inference.load_trained(backbone_run, "last", use_ema=False)
    converted = os.path.join(work, "backbone_weights")
    state = nnx.state(loaded.model, nnx.Not(nnx.RngState))
    weights.save(converted, {k: np.asarray(v) for k, v in tree_paths.flatten(state).items()}, weights.Pretrained(
        model_name=pretrain.model_name, model_options={}, num_classes=5, source=backbone_run, source_format="jaxclf",
        preprocessing={"input_size": 32, "mean": list(pretrain.data.mean), "std": list(pretrain.data.std),
                       "interpolation": "bilinear", "crop_pct": 1.0}))
    for way in WAYS:
        config = _digits_config(root, tuple("56789"), finetune_epochs)
        config.model_init = converted
        model = models.create(config.model_name, num_classes=5)
        fields = way_config(way, model, "resnet")
        config.peft = fields.peft
        config.optim.freeze = fields.optim.freeze
        config.optim.lr = 0.01 if way == "full" else 0.05
        start = time.perf_counter()
        val = train.train_and_evaluate(config, os.path.join(work, way), devices=devices)
        peft.from_config(model, config)
        total, trained = trainable_params(model, config.optim)
        results[way] = {"classes": "5-9", "val_accuracy": float(val["val/accuracy"]), "wall_s": time.perf_counter() - start,
                        "lr": config.optim.lr, "trainable_params": trained, "trainable_fraction": trained / total}
        print(f"{way}: val/accuracy {val['val/accuracy']:.4f}", file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_base_patch16_224,resnet50")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--accuracy", action="store_true", help="the digits accuracy table instead of step costs")
    parser.add_argument("--pretrain_epochs", type=float, default=8.0)
    parser.add_argument("--finetune_epochs", type=float, default=4.0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    about = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(), "argv": sys.argv[1:]}

    def save(part: dict) -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**about, **part}, f, indent=2)

    if args.accuracy:
        result = {"accuracy": measure_accuracy(args.pretrain_epochs, args.finetune_epochs)}
    else:
        steps = measure_steps(args.models.split(","), args.batch, args.size, args.rounds, args.steps,
                              lambda done: save({"batch": args.batch, "size": args.size, "steps": done}))
        result = {"batch": args.batch, "size": args.size, "steps": steps}
    save(result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
