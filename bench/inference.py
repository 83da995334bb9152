"""CPU inference: JAX, ONNX float32 and int8 (onnxruntime), TFLite float32 and int8 (LiteRT) on the same models.

    .venv/bin/python bench/inference.py --out bench/results/inference_cpu.json

For each model (random weights; speed does not depend on their values), exports the ONNX model
(jaxclf.deploy.onnx_graph, checked against JAX to 1e-4) and its int8 versions (dynamic, and static
calibrated on random images: accuracy is not measured here, see tests/test_quantize.py), and the
TFLite model (jaxclf.deploy.litert, checked the same way) with its full-integer int8 version
(ai-edge-quantizer's static_wi8_ai8, calibrated on random images). A TFLite model's batch is fixed
at conversion: latency runs the batch-1 model a phone would get, throughput a second conversion at
the throughput batch (resize_tensor_input cannot change the reshapes inside ViT or ConvNeXt). Then
times, alternating the runtimes within each round:
  latency     one uint8[1, S, S, 3] image per call, median ms per call;
  throughput  uint8[32, S, S, 3] per call, images/s (wall) and CPU-ms per image (all threads).
JAX is `inference.TrainedModel.logits` (jitted, the kernels "auto" picks here; the ONNX and TFLite
exports translate the plain formulation, as for a run); onnxruntime runs with its default threads and
graph optimizations, LiteRT with its default threads and XNNPACK delegate. Medians over rounds; ratios against JAX; the
load average before and after is recorded, since wall-clock times on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from jaxclf.runs import artefact, inference
from jaxclf import config as config_lib, export, models
from jaxclf.deploy import litert, quantize

RUNTIMES = ("jax", "onnx_fp32", "onnx_int8_dynamic", "onnx_int8_static", "tflite_fp32", "tflite_int8")


def build(name: str, size: int) -> inference.TrainedModel:
    """`name` with random weights as a TrainedModel (no workdir), normalising with ImageNet's mean/std."""
    options = {"img_size": size} if name.startswith("vit") else {}
    model = models.create(name, num_classes=1000, **options)
    model.eval()
    config = config_lib.base_config()
    config.model_name, config.dtype = name, "float32"  # as a resolved run records them: export rebuilds from it
    config.data.pp_eval = f"decode|resize_small({size})|central_crop({size})"
    config.data.mean, config.data.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return inference.TrainedModel("", config, tuple(f"c{i}" for i in range(1000)), model, 0, "params")


def runners(trained: inference.TrainedModel, size: int, calibration: int, batch: int = 32,
            runtimes: tuple[str, ...] = RUNTIMES, calibration_images: np.ndarray | None = None) -> tuple[dict, dict]:
    """({runtime: function of images}, {runtime: model bytes}) for each of `runtimes` ("jax" always). Static int8
    calibrates on `calibration_images` (a run's train images, where accuracy is measured), else on `calibration`
    random images (speed does not depend on them)."""
    if calibration_images is None:  # at least one batch: a TFLite model converted for `batch` calibrates on whole ones
        calibration_images = np.random.default_rng(1).integers(0, 256, (max(calibration, batch), size, size, 3),
                                                               dtype=np.uint8)
    run, files = {"jax": trained.logits}, {}
    if any(r.startswith("onnx") for r in runtimes):
        fp32 = export.export_onnx(trained, size, size)
        export.check_artefact(trained, artefact.onnx_runner(fp32), size, size, 1e-4)
        onnx_files = {"onnx_fp32": fp32, "onnx_int8_dynamic": quantize.quantize(fp32),
                      "onnx_int8_static": quantize.quantize(fp32, calibration_images[:max(calibration, 1)])}
        files.update(onnx_files)
        run.update({k: artefact.onnx_runner(v) for k, v in onnx_files.items()})
    if any(r.startswith("tflite") for r in runtimes):
        models = {b: export.export_tflite(trained, size, size, b) for b in (1, batch)}
        export.check_artefact(trained, artefact.tflite_runner(models[1]), size, size, 1e-4)
        files["tflite_fp32"] = models[1]
        run["tflite_fp32"] = _by_batch({b: artefact.tflite_runner(m) for b, m in models.items()})
        if "tflite_int8" in runtimes:
            int8 = {b: litert.quantize(model, calibration_images) for b, model in models.items()}
            files["tflite_int8"] = int8[1]
            run["tflite_int8"] = _by_batch({b: artefact.tflite_runner(m) for b, m in int8.items()})
    return {r: run[r] for r in ("jax", *runtimes) if r in run}, files


def _by_batch(runs: dict):
    """A function of images that runs the model converted for their batch size (TFLite batches are fixed), or the
    batch-1 model image by image for other sizes (accuracy passes)."""
    def run(images: np.ndarray) -> np.ndarray:
        if len(images) in runs:
            return runs[len(images)](images)
        return np.concatenate([runs[1](images[i : i + 1]) for i in range(len(images))])

    return run


def time_calls(run, images: np.ndarray, calls: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call, over `calls` calls after one warm-up."""
    run(images)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        run(images)
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def bench_model(name: str, size: int, batch: int, rounds: int, latency_calls: int, throughput_calls: int,
                calibration: int, runtimes: tuple[str, ...] = RUNTIMES) -> dict:
    start = time.perf_counter()
    trained = build(name, size)
    run, files = runners(trained, size, calibration, batch, runtimes)
    runtimes = tuple(run)
    prepared = time.perf_counter() - start
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    many = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    latency = {r: [] for r in runtimes}
    throughput = {r: [] for r in runtimes}
    cpu_per_image = {r: [] for r in runtimes}
    for round_index in range(rounds):
        order = runtimes if round_index % 2 == 0 else runtimes[::-1]  # alternate who goes first
        for runtime in order:
            latency[runtime].append(time_calls(run[runtime], one, latency_calls)[0] * 1e3)
            wall, cpu = time_calls(run[runtime], many, throughput_calls)
            throughput[runtime].append(batch / wall)
            cpu_per_image[runtime].append(cpu / batch * 1e3)
    result = {}
    for runtime in runtimes:
        result[runtime] = {
            "latency_ms": statistics.median(latency[runtime]),
            "images_per_sec": statistics.median(throughput[runtime]),
            "cpu_ms_per_image": statistics.median(cpu_per_image[runtime]),
            "rounds": {"latency_ms": latency[runtime], "images_per_sec": throughput[runtime]},
        }
        if runtime in files:
            result[runtime]["file_mib"] = len(files[runtime]) / 2**20
    for runtime in runtimes:
        result[runtime]["latency_vs_jax"] = result["jax"]["latency_ms"] / result[runtime]["latency_ms"]
        result[runtime]["throughput_vs_jax"] = result[runtime]["images_per_sec"] / result["jax"]["images_per_sec"]
    return {"runtimes": result, "prepare_seconds": prepared}


def table(results: dict, size: int, batch: int) -> str:
    lines = [f"| model | runtime | file MiB | latency ms (batch 1) | img/s (batch {batch}) | CPU-ms/img | "
             "speed-up vs JAX (latency, throughput) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in results.items():
        for runtime, r in entry["runtimes"].items():
            size_text = f"{r['file_mib']:.1f}" if "file_mib" in r else "-"
            lines.append(f"| {name} {size}px | {runtime} | {size_text} | {r['latency_ms']:.1f} | "
                         f"{r['images_per_sec']:.1f} | {r['cpu_ms_per_image']:.1f} | "
                         f"{r['latency_vs_jax']:.2f}x, {r['throughput_vs_jax']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,vit_small_patch16_224,efficientnet_b0,"
                                            "mobilenetv3_large_100,convnext_tiny")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32, help="images per call for throughput")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency_calls", type=int, default=5)
    parser.add_argument("--throughput_calls", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=8, help="random images for static int8 calibration "
                        "(TFLite's batch-N model: N of them)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES[1:]), help=f"beside jax, any of {RUNTIMES[1:]}")
    parser.add_argument("--out", default="bench/results/inference_cpu.json")
    args = parser.parse_args()
    unknown = set(args.runtimes.split(",")) - set(RUNTIMES[1:])
    if unknown:
        parser.error(f"--runtimes: unknown {sorted(unknown)}; use any of {RUNTIMES[1:]}")
    load_before = os.getloadavg()
    results = {}
    for name in args.models.split(","):
        results[name] = bench_model(name, args.size, args.batch, args.rounds, args.latency_calls,
                                    args.throughput_calls, args.calibration, tuple(args.runtimes.split(",")))
        print(f"{name}: done ({results[name]['prepare_seconds']:.0f} s to build, export and quantize)", flush=True)
    report = {
        "settings": vars(args), "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "results": results,
        "table": table(results, args.size, args.batch),
    }
    print(report["table"])
    print(f"load average before {load_before[0]:.1f}, after {report['load_average_after'][0]:.1f} "
          f"({os.cpu_count()} CPUs)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
