"""Edge deployment, measured: size, speed and accuracy of dense, sparse and channel-pruned models, per runtime.

    .venv/bin/python bench/edge.py --out bench/results/edge_cpu.json

Rows, each a model and a pruning:
- the digits quickstart run (configs/quickstart.py, ResNet-18 at 32 px, trained here into --workdir): dense;
  fine-tuned from it with config.prune at 50% and 80% (gradual magnitude pruning); and `python -m jaxclf.prune
  --fraction 0.3` of it, fine-tuned: val top-1 per runtime;
- MobileNetV3-Large, EfficientNet-B0 and ResNet-18 at 224 px with random weights (accuracy is not the point):
  dense, 50% and 80% sparse (one-shot magnitude pruning, stem and head dense, as config.prune does) and with
  30% of their blocks' inner channels pruned (jaxclf.models.channels).
Columns: the file's size raw and zlib-compressed (level 9; JAX: its params as .npz), the median latency of
one image per call and the throughput at --batch images per call, for every runtime bench/inference.py's
`runners` makes (its table: new runtimes there appear here). Unstructured zeros make files compress but
are still multiplied by dense kernels; only channel pruning makes the computation smaller.
Static int8 calibrates on --calibration train images of the digits runs (through the eval preprocessing, as
`export --quantize int8 --calibration N` does) and on as many random images for the random-weight models.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxclf import config as config_lib, prune, train
from jaxclf.deploy import calibration as calibration_lib
from jaxclf.evaluation import splits
from jaxclf.models import tree_paths
from jaxclf.runs import artefact, inference, predictions
from jaxclf.training import pruning

PRUNINGS = ("dense", "sparse50", "sparse80", "channels30")
# bench/inference.py: the runtimes (its `runners` table) and their timing.
inference_bench = config_lib.import_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "inference.py"))


def one_shot_sparse(trained: inference.TrainedModel, sparsity: float) -> inference.TrainedModel:
    """`trained` with `sparsity` of its prunable weights (config.prune's default choice) zeroed by magnitude, as
    config.prune's transformation does at its last step (one update of zeros)."""
    model = trained.model
    params = nnx.state(model, nnx.Param)
    keep_dense = tuple(config_lib.base_config().prune.keep_dense)
    tx = pruning.magnitude_pruning(pruning.prunable_params(model, keep_dense), sparsity=sparsity, start=1, end=1,
                                   every=1, scope="global")
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    nnx.update(model, optax.apply_updates(params, updates))
    return trained


def random_model(name: str, size: int, pruning_name: str) -> inference.TrainedModel:
    trained = inference_bench.build(name, size)
    if pruning_name.startswith("sparse"):
        return one_shot_sparse(trained, int(pruning_name.removeprefix("sparse")) / 100)
    if pruning_name.startswith("channels"):
        return prune.channel_pruned(trained, int(pruning_name.removeprefix("channels")) / 100)
    return trained


def digits_runs(workdir: str, epochs: float, finetune_steps: int) -> dict[str, str]:
    """{pruning: finished run} for the digits: the quickstart run, and fine-tunings of it (reused when present)."""
    def run(name: str, **overrides) -> str:
        path = os.path.join(workdir, name)
        if not os.path.isfile(os.path.join(path, "result.json")):
            config = config_lib.load_config("configs/quickstart.py")
            for key, value in overrides.items():
                config_lib.apply_override(config, f"{key}={value}")
            train.train_and_evaluate(config, path)
        return path

    dense = run("dense", num_epochs=epochs)
    # Fine-tuning: a tenth of the lr, pruned over the first 60% of the steps, recovering over the rest.
    finetune = {"total_steps": finetune_steps, "optim.lr": 0.01, "optim.warmup_epochs": 0.0}
    runs = {"dense": dense}
    for sparsity in (50, 80):
        runs[f"sparse{sparsity}"] = run(f"sparse{sparsity}", model_init=dense, **finetune,
                                        **{"prune.sparsity": sparsity / 100, "prune.every": 5,
                                           "prune.end": int(0.6 * finetune_steps)})
    cut = os.path.join(workdir, "channels30_cut")
    if not os.path.isdir(cut):
        prune.prune_run(inference.load_trained(dense), 0.3, cut)
    runs["channels30"] = run("channels30", model_init=cut, **finetune)
    return runs


def val_top1(trained: inference.TrainedModel, run, size: int) -> float:
    """Top-1 of `run` (a function of uint8 images) on `trained`'s val split."""
    _, source = splits.load_split(trained, "val")
    record = {"format": "bench", "class_names": list(trained.class_names), "input": {"shape": ["B", size, size, 3]}}
    config = trained.config.copy_and_resolve_references()
    config.data.num_workers = 0  # 360 small images: decoding in this process is quicker than starting workers
    log_probs, labels, _ = predictions.predict_source(artefact.Artefact("", record, config, run), source,
                                                      batch_size=64)
    return float(np.mean(log_probs.argmax(axis=1) == labels))


def measure(trained: inference.TrainedModel, size: int, batch: int, rounds: int, calibration: int,
            with_accuracy: bool) -> dict:
    # Where accuracy is measured, static int8 calibrates on the run's own train images (as export does).
    images = calibration_lib.calibration_images(trained, calibration) if with_accuracy else None
    run, files = inference_bench.runners(trained, size, calibration, batch, calibration_images=images)
    buffer = _npz(trained.model)
    files = {"jax": buffer, **files}
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    many = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    latency, throughput = {r: [] for r in run}, {r: [] for r in run}
    for round_index in range(rounds):
        for runtime in (list(run) if round_index % 2 == 0 else list(run)[::-1]):
            latency[runtime].append(inference_bench.time_calls(run[runtime], one, 3)[0] * 1e3)
            throughput[runtime].append(batch / inference_bench.time_calls(run[runtime], many, 1)[0])
    result = {}
    for runtime in run:
        data = files[runtime]
        result[runtime] = {"file_mib": len(data) / 2**20, "zipped_mib": len(zlib.compress(data, 9)) / 2**20,
                           "latency_ms": statistics.median(latency[runtime]),
                           "images_per_sec": statistics.median(throughput[runtime])}
        if with_accuracy:
            result[runtime]["val_top1"] = val_top1(trained, run[runtime], size)
    params = nnx.state(trained.model, nnx.Param)
    return {"params": int(sum(x.size for x in jax.tree.leaves(params))),
            "zero_fraction": float(sum(int(np.sum(np.asarray(x) == 0)) for x in jax.tree.leaves(params))
                                   / sum(x.size for x in jax.tree.leaves(params))),
            "runtimes": result}


def _npz(model: nnx.Module) -> bytes:
    """The model's arrays as an uncompressed .npz (what a JAX deployment ships besides its code)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in tree_paths.flatten(nnx.state(model)).items()})
    return buffer.getvalue()


def table(results: dict, batch: int) -> str:
    """The results as a markdown table, one row per model, pruning and runtime."""
    header = ("model", "pruning", "params", "zeros", "runtime", "MiB", "zipped MiB", "ms (batch 1)",
              f"img/s (batch {batch})", "val top-1")
    rows = [(*key.split("/"), f"{entry['params'] / 1e6:.2f} M", f"{entry['zero_fraction']:.0%}", runtime,
             f"{r['file_mib']:.1f}", f"{r['zipped_mib']:.1f}", f"{r['latency_ms']:.1f}", f"{r['images_per_sec']:.1f}",
             f"{r['val_top1']:.3f}" if "val_top1" in r else "-")
            for key, entry in results.items() for runtime, r in entry["runtimes"].items()]
    return "\n".join("| " + " | ".join(row) + " |" for row in [header, ("---",) * len(header), *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenetv3_large_100,efficientnet_b0,resnet18",
                        help="random-weight models (comma-separated; empty: none)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--prunings", default=",".join(PRUNINGS))
    parser.add_argument("--digits", action=argparse.BooleanOptionalAction, default=True,
                        help="train and measure the digits runs too")
    parser.add_argument("--workdir", default="runs/edge", help="where the digits runs are trained (and reused)")
    parser.add_argument("--epochs", type=float, default=15.0, help="the dense digits run")
    parser.add_argument("--finetune_steps", type=int, default=110, help="each pruned digits run (110: 5 epochs)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=32,
                        help="static int8 calibration images: the digits runs' train images, else random ones")
    parser.add_argument("--out", default="bench/results/edge_cpu.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    prunings = args.prunings.split(",")
    results = {}
    if args.digits:
        for pruning_name, workdir in digits_runs(args.workdir, args.epochs, args.finetune_steps).items():
            if pruning_name in prunings:
                results[f"digits_resnet18_32px/{pruning_name}"] = measure(
                    inference.load_trained(workdir), 32, args.batch, args.rounds, args.calibration, True)
                print(f"digits {pruning_name}: done", flush=True)
    for name in filter(None, args.models.split(",")):
        for pruning_name in prunings:
            start = time.perf_counter()
            results[f"{name}_{args.size}px/{pruning_name}"] = measure(
                random_model(name, args.size, pruning_name), args.size, args.batch, args.rounds, args.calibration, False)
            print(f"{name} {pruning_name}: done in {time.perf_counter() - start:.0f} s", flush=True)
    load_after = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
                   "load_average_before": load_before, "load_average_after": load_after, "results": results,
                   "table": table(results, args.batch)}, f, indent=2)
    print(f"{table(results, args.batch)}\ntaken under load: load average before {load_before[0]:.1f}, after "
          f"{load_after[0]:.1f} ({os.cpu_count()} CPUs); wrote {args.out}")

if __name__ == "__main__":
    sys.exit(main())
