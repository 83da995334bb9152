"""TensorRT on a GPU: engines built from jaxclf's ONNX export (fp16, int8), against JAX on the same GPU.

    python bench/tensorrt_bench.py --models resnet18,mobilenetv3_large_100 --out bench/results/tensorrt_gpu.json

For each model (random weights; ImageNet's 1000 classes), exports the ONNX model (jaxclf.deploy.onnx_graph,
uint8 NHWC input, normalisation inside) and its explicitly quantized int8 twin (QDQ: onnxruntime's static
quantization with symmetric int8 activations and per-channel int8 weights, calibrated on --calibration
random images; TensorRT 10+ builds int8 engines from Q/DQ nodes, its implicit calibrators are deprecated).
Then, on the GPU, builds an engine per precision (one optimization profile, batch 1 to --batch), and
compares with `TrainedModel.logits` under JAX on the same GPU at float32 ("highest" matmul precision):
  logits      largest difference relative to max(1, largest |logit|), and top-1 agreement, on --batch images;
              the stated tolerances are fp16 1e-2 and int8 0.25 (int8 is a different model: agreement matters);
  latency     one image per call (host uint8 in, host float32 logits out, as JAX's logits), median ms;
  throughput  --batch images per call, images/s.
Everything up to the GPU runs anywhere (arguments, model, ONNX export and quantization); without a GPU, or
without the tensorrt package, the script says why, writes {"skipped": reason} and exits 0.
(Not named bench/tensorrt.py: run as a script, its folder comes first on sys.path, and `import tensorrt`
would import the script itself.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

import inference as inference_bench  # bench/inference.py (the script's folder is on sys.path): the same models
from jaxclf import export

PRECISIONS = ("fp16", "int8")
TOLERANCES = {"fp16": 1e-2, "int8": 0.25}


def onnx_models(name: str, size: int, calibration: int) -> tuple[object, dict[str, bytes]]:
    """(the JAX model, {"fp32": ONNX bytes, "int8": its QDQ int8 twin}) of `name` with random weights."""
    trained = inference_bench.build(name, size)
    fp32 = export.export_onnx(trained, size, size)
    images = np.random.default_rng(1).integers(0, 256, (calibration, size, size, 3), dtype=np.uint8)
    return trained, {"fp32": fp32, "int8": qdq_int8(fp32, images)}


def qdq_int8(model: bytes, images: np.ndarray) -> bytes:
    """`model` with Q/DQ nodes as TensorRT takes them: int8 activations with zero point 0, per-channel int8 weights."""
    from onnxruntime import quantization

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{"images": images[i : i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory() as folder:
        source, out = os.path.join(folder, "fp32.onnx"), os.path.join(folder, "int8.onnx")
        with open(source, "wb") as f:
            f.write(model)
        quantization.quantize_static(source, out, Reader(), quant_format=quantization.QuantFormat.QDQ,
                                     activation_type=quantization.QuantType.QInt8,
                                     weight_type=quantization.QuantType.QInt8, per_channel=True,
                                     op_types_to_quantize=["Conv", "MatMul"],
                                     extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        with open(out, "rb") as f:
            return f.read()


def why_not_here() -> str | None:
    """Why TensorRT cannot run here (no package, no CUDA GPU for JAX or PyTorch), or None where it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return ("the tensorrt package is not installed (PyPI's tensorrt-cu12/cu13-libs are stubs that fetch the "
                "libraries from NVIDIA's index at install time)")
    import jax

    if jax.default_backend() != "gpu":
        return f"JAX sees no GPU (backend {jax.default_backend()})"
    try:
        import torch
    except ImportError:
        return "PyTorch (for CUDA buffers and streams) is not installed"
    return None if torch.cuda.is_available() else "PyTorch sees no CUDA device"


class Engine:
    """A TensorRT engine of an ONNX model, run on host uint8 images (copied in) returning host float32 logits."""

    def __init__(self, model: bytes, precision: str, size: int, batch: int):
        import tensorrt as trt
        import torch

        self.torch = torch
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(model):
            raise RuntimeError("TensorRT's ONNX parser: " + "; ".join(str(parser.get_error(i))
                                                                     for i in range(parser.num_errors)))
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        profile = builder.create_optimization_profile()
        profile.set_shape("images", (1, size, size, 3), (batch, size, size, 3), (batch, size, size, 3))
        config.add_optimization_profile(profile)
        start = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT could not build the {precision} engine")
        self.build_seconds = time.perf_counter() - start
        self.engine_bytes = serialized.nbytes
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        torch = self.torch
        device_images = torch.from_numpy(images).cuda()
        self.context.set_input_shape("images", tuple(images.shape))
        logits = torch.empty(tuple(self.context.get_tensor_shape("logits")), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address("images", device_images.data_ptr())
        self.context.set_tensor_address("logits", logits.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return logits.cpu().numpy()


def compare(expected: np.ndarray, got: np.ndarray, tolerance: float) -> dict:
    """Largest logit difference relative to max(1, largest |logit|), top-1 agreement, and whether within `tolerance`."""
    relative = float(np.max(np.abs(got - expected)) / max(1.0, float(np.max(np.abs(expected)))))
    return {"max_relative_difference": relative, "tolerance": tolerance, "within_tolerance": relative <= tolerance,
            "top1_agreement": float(np.mean(got.argmax(1) == expected.argmax(1)))}


def median_seconds(run, images: np.ndarray, calls: int, rounds: int) -> float:
    """Median over `rounds` of the mean wall seconds per call, after one warm-up call."""
    run(images)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            run(images)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def bench_model(trained, models: dict[str, bytes], size: int, batch: int, calls: int, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    many = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    expected = trained.logits(many)
    result = {"jax": {"latency_ms": median_seconds(trained.logits, one, calls, rounds) * 1e3,
                      "images_per_sec": batch / median_seconds(trained.logits, many, calls, rounds)}}
    for precision in PRECISIONS:
        engine = Engine(models["int8" if precision == "int8" else "fp32"], precision, size, batch)
        result[f"tensorrt_{precision}"] = {
            "engine_mib": engine.engine_bytes / 2**20, "build_seconds": engine.build_seconds,
            "logits": compare(expected, engine(many), TOLERANCES[precision]),
            "latency_ms": median_seconds(engine, one, calls, rounds) * 1e3,
            "images_per_sec": batch / median_seconds(engine, many, calls, rounds)}
    return result


def table(results: dict, size: int, batch: int) -> str:
    lines = [f"| model | runtime | latency ms (batch 1) | img/s (batch {batch}) | logits vs JAX (rel., top-1) |",
             "| --- | --- | --- | --- | --- |"]
    for name, runtimes in results.items():
        for runtime, r in runtimes.items():
            logits = r.get("logits")
            check = f"{logits['max_relative_difference']:.2g}, {logits['top1_agreement']:.0%}" if logits else "-"
            lines.append(f"| {name} {size}px | {runtime} | {r['latency_ms']:.2f} | {r['images_per_sec']:.0f} | {check} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenetv3_large_100")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32, help="images per call for throughput")
    parser.add_argument("--calibration", type=int, default=32, help="random images calibrating the int8 model")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/tensorrt_gpu.json")
    args = parser.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    models = {name: onnx_models(name, args.size, args.calibration) for name in args.models.split(",")}
    report = {"settings": vars(args), "onnx_mib": {name: {k: len(v) / 2**20 for k, v in m.items()}
                                                   for name, (_, m) in models.items()}}
    reason = why_not_here()
    if reason:
        print(f"tensorrt: skipped: {reason}")
        with open(args.out, "w") as f:
            json.dump({**report, "skipped": reason}, f, indent=2)
        return 0
    import jax
    import tensorrt

    jax.config.update("jax_default_matmul_precision", "highest")  # the reference is float32, not TF32
    results = {name: bench_model(trained, onnx, args.size, args.batch, args.calls, args.rounds)
               for name, (trained, onnx) in models.items()}
    report.update(device=jax.devices()[0].device_kind, tensorrt=tensorrt.__version__, results=results,
                  table=table(results, args.size, args.batch), load_average=os.getloadavg())
    print(report["table"])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
