"""Export a trained run for deployment: `python -m jaxclf.export --workdir DIR --format stablehlo|onnx|tflite --out PATH`.

The program formats take `uint8[B, H, W, 3]` RGB images (NHWC) that have had the run's eval
preprocessing after decoding (the ops of data.pp_eval after `decode`, e.g. resize_small(256) and
central_crop(224)), with any batch size B (tflite: B = 1), and return `float32[B, num_classes]` logits (softmax
them for probabilities). Normalisation with the run's mean/std is part of the exported program.
`PATH.json` beside the artefact records the class names, input shape and preprocessing.

- stablehlo: `jax.export` serialized bytes; load with
  `jax.export.deserialize(open(PATH, "rb").read()).call(images)` (lowered for --platforms).
- onnx: opset 18, written from the jaxpr by jaxclf.deploy.onnx_graph (the `onnx` extra); run with onnxruntime.
- tflite: a LiteRT flatbuffer for phones (jaxclf.deploy.litert: StableHLO through litert-converter, which
  `make litert-venv` installs in its own environment); run with ai-edge-litert's interpreter (the `litert` extra).
- timm: ResNet, ViT and BiT as a timm-named `.safetensors` state dict (jaxclf.deploy.timm_export); the
  sidecar and the output give the `timm.create_model(...)` call that loads it. It takes float
  NCHW images normalised with the sidecar's mean/std, as timm models do.

Each artefact is checked after writing: run on random images, it must give the JAX model's
logits within --tolerance (relative to the largest logit, at least 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxclf.deploy import litert, timm_export
from jaxclf.deploy.calibration import calibration_images
from jaxclf.evaluation import splits
from jaxclf.runs import artefact as artefact_lib, inference, predictions

FORMATS = ("stablehlo", "onnx", "tflite", "timm")
QUANTIZED_FORMATS = ("onnx", "tflite")
QUANTIZATIONS = ("", "int8")


class ExportError(RuntimeError):
    """The artefact could not be produced, or does not reproduce the model; the message says which."""


def resolve_image_size(trained: inference.TrainedModel, image_size: int | None) -> tuple[int, int]:
    """(H, W) of the exported input: `image_size` if given, else the fixed size of the eval ops."""
    if image_size:
        return image_size, image_size
    size = trained.input_size()
    if size is None:
        raise inference.WorkdirError(
            f"data.pp_eval={trained.config.data.pp_eval!r} does not produce one image size; "
            "pass --image_size (the side of the square images the model should take)"
        )
    return size


def export_stablehlo(trained: inference.TrainedModel, height: int, width: int,
                     platforms: Sequence[str] | None = None) -> bytes:
    """`jax.export` of `trained.apply` (weights included) with a symbolic batch dimension, serialized."""
    batch = jax.export.symbolic_shape("B")[0]
    spec = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8)
    exported = jax.export.export(jax.jit(trained.apply), platforms=platforms)(spec)
    return bytes(exported.serialize())


def export_onnx(trained: inference.TrainedModel, height: int, width: int) -> bytes:
    """ONNX model bytes of `trained.apply` (jaxclf.deploy.onnx_graph), with a symbolic batch dimension "B".

    The program translated is the model's plain-kernel formulation where the run's config rebuilds
    the same model: the "cpu" kernels' XLA:CPU forms (max pooling as 9 slices, small convolutions
    as im2col) would become ONNX graphs that onnxruntime fuses and quantizes less well.
    """
    try:
        from jaxclf.deploy import onnx_graph
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install -e '.[onnx]'") from None
    trained = with_plain_kernels(trained)
    try:
        proto = onnx_graph.to_onnx(trained.apply, (height, width, 3), np.uint8, input_name="images",
                                   output_name="logits", model_name=trained.config.model_name)
    except onnx_graph.UnsupportedError as e:
        raise ExportError(_onnx_failure(trained, str(e))) from e
    return proto.SerializeToString()


def export_tflite(trained: inference.TrainedModel, height: int, width: int, batch_size: int = 1) -> bytes:
    """LiteRT flatbuffer of `trained.apply` (its plain-kernel formulation, as for ONNX) for a fixed batch size."""
    try:
        return litert.to_tflite(with_plain_kernels(trained).apply, height, width, batch_size)
    except litert.ConversionError as e:
        raise ExportError(f"cannot export {trained.config.model_name} to TFLite: {e}") from None


def with_plain_kernels(trained: inference.TrainedModel) -> inference.TrainedModel:
    """`trained` computing with the plain kernel set (the same params; kernel sets change formulations only)."""
    if getattr(trained.model, "kernels", "plain") == "plain":
        return trained
    plain = nnx.merge(*nnx.split(trained.model))
    plain.kernels = "plain"
    plain_config = ml_collections.ConfigDict(trained.config.to_dict())
    plain_config.model.kernels = "plain"
    return dataclasses.replace(trained, model=plain, config=plain_config)


def _onnx_failure(trained: inference.TrainedModel, reason: str) -> str:
    return (f"cannot export {trained.config.model_name} to ONNX: {reason.splitlines()[0][:500]}\n"
            "The stablehlo format (--format stablehlo) exports every jaxclf model.")


def check_artefact(trained: inference.TrainedModel, run: Callable[[np.ndarray], np.ndarray], height: int,
                   width: int, tolerance: float, batch_sizes: Sequence[int] = (1, 3)) -> float:
    """Largest logit difference between `run` and the JAX model on random images of each batch size.

    Raises ExportError when it exceeds `tolerance * max(1, largest |logit|)`.
    """
    worst = 0.0
    for batch_size in batch_sizes:
        images = np.random.default_rng(batch_size).integers(0, 256, (batch_size, height, width, 3), dtype=np.uint8)
        expected = trained.logits(images)
        got = np.asarray(run(images))
        if got.shape != expected.shape:
            raise ExportError(f"the artefact returned shape {got.shape} for batch {batch_size}; expected {expected.shape}")
        difference = float(np.max(np.abs(got - expected)))
        if not difference <= tolerance * max(1.0, float(np.max(np.abs(expected)))):
            raise ExportError(f"the artefact's logits differ from the JAX model's by {difference:.3g} "
                              f"(batch {batch_size}; tolerance {tolerance:g})")
        worst = max(worst, difference)
    return worst


def sidecar(trained: inference.TrainedModel, fmt: str, path: str, height: int, width: int, **extra) -> dict:
    """What a deployment needs besides the artefact: class names, input contract, preprocessing."""
    after_decode = "|".join(op.strip() for op in trained.config.data.pp_eval.split("|")[1:])
    if fmt == "timm":  # a PyTorch model: float NCHW, normalised by the caller
        model_input = {"name": "x", "shape": ["B", 3, height, width], "dtype": "float32",
                       "layout": "NCHW, RGB, normalised: (image / 255 - mean) / std"}
        normalisation = "before the model, by the caller: (image / 255 - mean) / std"
    else:
        batch = 1 if fmt == "tflite" else "B"  # a LiteRT model's batch is fixed when it is converted
        model_input = {"name": "images", "shape": [batch, height, width, 3], "dtype": "uint8", "layout": "NHWC, RGB"}
        normalisation = "inside the exported program: (image / 255 - mean) / std"
    return {
        "format": fmt,
        "file": os.path.basename(path),
        "class_names": list(trained.class_names),
        "input": model_input,
        "output": {"name": "logits", "shape": [model_input["shape"][0], len(trained.class_names)], "dtype": "float32",
                   "note": "logits; softmax them for probabilities", **_integer_output(extra)},
        "preprocessing": {
            "before_the_model": after_decode or "none (images must already be the input size)",
            "pp_eval": trained.config.data.pp_eval,
            "normalisation": normalisation,
            "mean": list(trained.mean),
            "std": list(trained.std),
        },
        "model_name": trained.config.model_name,
        "workdir": os.path.abspath(trained.workdir),
        "checkpoint_step": trained.step,
        "weights": trained.weights,
        # The run's config, so the artefact alone can be evaluated on the run's splits (jaxclf.runs.artefact).
        "run_config": json.loads(trained.config.to_json_best_effort()),
        **extra,
    }


def _integer_output(extra: dict) -> dict:
    """The output entries of a full-integer model: its integer type, and how to get the logits back."""
    quantized = (extra.get("quantization") or {}).get("output")
    if not quantized:
        return {}
    return {"dtype": quantized["dtype"], "note": f"quantized logits: logits = (output - {quantized['zero_point']}) * "
                                                 f"{quantized['scale']:.9g}; softmax them for probabilities"}


def export(trained: inference.TrainedModel, fmt: str, out: str, *, image_size: int | None = None,
           platforms: Sequence[str] | None = None, tolerance: float = 1e-4, quantize: str = "",
           calibration: int = 0) -> dict:
    """Write the artefact to `out` and its sidecar to `out + ".json"` after checking it; return the sidecar.

    `quantize="int8"` (onnx, tflite) writes the int8 model instead: dynamic, or static with `calibration`
    images of the train split; the sidecar's `quantization` holds sizes, val accuracy before and after, and
    how often the int8 model's top-1 agrees with the float32 model's.
    """
    if fmt not in FORMATS:
        raise inference.WorkdirError(f"--format {fmt}: use one of {FORMATS}")
    if quantize not in QUANTIZATIONS:
        raise inference.WorkdirError(f"--quantize {quantize}: use one of {QUANTIZATIONS[1:]}")
    if quantize and fmt not in QUANTIZED_FORMATS:
        raise inference.WorkdirError(f"--quantize {quantize} needs --format onnx or tflite (not {fmt})")
    if calibration and not quantize:
        raise inference.WorkdirError("--calibration N needs --quantize int8 (it calibrates static int8 quantization)")
    height, width = resolve_image_size(trained, image_size)
    if fmt == "timm":
        try:
            extra = timm_export.write(trained, out, height, width, tolerance)
        except timm_export.TimmExportError as e:
            raise ExportError(str(e)) from None
    else:
        artefact, extra = _checked_program(trained, fmt, height, width, platforms, tolerance)
        if quantize:
            artefact, extra["quantization"] = _quantized(trained, fmt, artefact, height, width, calibration)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "wb") as f:
            f.write(artefact)
    record = sidecar(trained, fmt, out, height, width, **extra)
    with open(out + ".json", "w") as f:
        json.dump(record, f, indent=2)
    return record


def _checked_program(trained: inference.TrainedModel, fmt: str, height: int, width: int,
                     platforms: Sequence[str] | None, tolerance: float) -> tuple[bytes, dict]:
    """The stablehlo, onnx or tflite artefact's bytes, checked against the JAX model where it runs here."""
    extra = {}
    if fmt == "stablehlo":
        platforms = list(platforms or [jax.export.default_export_platform()])
        artefact = export_stablehlo(trained, height, width, platforms)
        extra["platforms"] = platforms
        runner = artefact_lib.stablehlo_runner if jax.export.default_export_platform() in platforms else None
    elif fmt == "tflite":
        artefact = export_tflite(trained, height, width)
        runner = artefact_lib.tflite_runner
    else:
        artefact = export_onnx(trained, height, width)
        runner = artefact_lib.onnx_runner
    if runner is not None:
        try:
            difference = check_artefact(trained, runner(artefact), height, width, tolerance)
        except ExportError as e:
            raise ExportError(_onnx_failure(trained, str(e)) if fmt == "onnx" else str(e)) from None
        except Exception as e:  # noqa: BLE001 -- e.g. onnxruntime rejecting the converted graph
            if fmt != "onnx":
                raise
            raise ExportError(_onnx_failure(trained, f"onnxruntime: {type(e).__name__}: {e}")) from e
        extra["checked_max_logit_difference"] = difference
    return artefact, extra


def _quantized(trained: inference.TrainedModel, fmt: str, model: bytes, height: int, width: int,
               calibration: int) -> tuple[bytes, dict]:
    """(int8 model bytes, what the quantization did: mode, settings, sizes, val accuracy and agreement)."""
    images = calibration_images(trained, calibration) if calibration else None
    mode = "static" if calibration else "dynamic"
    record = {"mode": mode, "calibration_images": calibration}
    if fmt == "tflite":
        try:
            int8 = litert.quantize(model, images)
        except litert.ConversionError as e:
            raise ExportError(str(e)) from None
        record.update(recipe=litert.RECIPES[mode], output=litert.output_quantization(int8))
    else:
        try:
            from jaxclf.deploy import quantize
        except ImportError:
            raise ExportError("int8 quantization needs onnxruntime: pip install -e '.[onnx]'") from None
        int8 = quantize.quantize(model, images)
        record.update(quantized_ops=quantize.OP_TYPES, settings=quantize.SETTINGS[mode])
    record["size_bytes"] = {"float32": len(model), "int8": len(int8)}
    record["val_accuracy"], record["val_agreement"] = _val_accuracy(trained, fmt, {"float32": model, "int8": int8},
                                                                    height, width)
    return int8, record


RUNNERS = {"onnx": artefact_lib.onnx_runner, "tflite": artefact_lib.tflite_runner}


def _val_accuracy(trained: inference.TrainedModel, fmt: str, models: dict[str, bytes], height: int,
                  width: int) -> tuple[dict | str, float | None]:
    """(top-1 on the run's val split of each model in `models`, the share of val images where the int8 and float32
    top-1 agree); a note and None instead where there is no val split."""

    try:
        _, source = splits.load_split(trained, "val")
    except inference.USER_ERRORS as e:
        return f"not measured: {e}", None
    record = {"format": fmt, "class_names": list(trained.class_names), "input": {"shape": ["B", height, width, 3]}}
    batch_size = trained.config.eval_batch_size or trained.config.batch_size
    accuracy, predicted = {}, {}
    for name, model in models.items():
        runner = artefact_lib.Artefact("", record, trained.config, RUNNERS[fmt](model))
        log_probs, labels, indices = predictions.predict_source(runner, source, batch_size=batch_size)
        accuracy[name] = float(np.mean(log_probs.argmax(axis=1) == labels))
        predicted[name] = log_probs.argmax(axis=1)[np.argsort(indices)]
    return accuracy, float(np.mean(predicted["int8"] == predicted["float32"]))


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit status 0, 1 if the artefact cannot be made or does not reproduce the model,
    2 for a mistake in the arguments, workdir or data (message on stderr)."""
    return inference.run_tool(_run, argv)


def _run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxclf.export", description=__doc__.splitlines()[0])
    inference.add_run_arguments(parser)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="the artefact's path; PATH.json receives the sidecar")
    parser.add_argument("--image_size", type=int, default=0,
                        help="input side in pixels; 0: the size data.pp_eval produces")
    parser.add_argument("--platforms", default="",
                        help="stablehlo: comma-separated platforms to lower for (cpu,cuda,tpu); default: this one")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest logit difference accepted in the check, relative to the largest logit")
    parser.add_argument("--quantize", default="", choices=QUANTIZATIONS[1:],
                        help="onnx, tflite: write the int8 model (onnxruntime / ai-edge-quantizer); prints size, val "
                             "accuracy before/after and their top-1 agreement")
    parser.add_argument("--calibration", type=int, default=0, metavar="N",
                        help="with --quantize: 0 for dynamic quantization, N > 0 for static with N train images")
    args = parser.parse_args(argv)
    if args.calibration < 0:
        parser.error("--calibration N: N must be 0 (dynamic) or positive (static)")
    trained = inference.load_from_args(args)
    platforms = [p for p in args.platforms.split(",") if p] or None
    try:
        record = export(trained, args.format, args.out, image_size=args.image_size or None, platforms=platforms,
                        tolerance=args.tolerance, quantize=args.quantize, calibration=args.calibration)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(_summary(args.out, record))
    return 0


def _summary(out: str, record: dict) -> str:
    """What the export wrote and checked, for the console."""
    shape = ", ".join(map(str, record["input"]["shape"]))
    lines = [f"wrote {out} ({record['format']}, input {record['input']['dtype']}[{shape}]) and {out}.json"]
    checked = record.get("checked_max_logit_difference")
    if checked is not None:
        lines.append(f"checked: logits within {checked:.2g} of the JAX model")
    else:
        lines.append(record.get("checked", "not checked (lowered for other platforms than this one)"))
    if "timm" in record:
        lines.append(f"load it in PyTorch with:\n  import timm\n  model = {record['timm']['create_model']}")
    quantization = record.get("quantization")
    if quantization:
        sizes, accuracy = quantization["size_bytes"], quantization["val_accuracy"]
        lines.append(f"int8 ({quantization['mode']}): {sizes['float32'] / 2**20:.2f} MiB -> {sizes['int8'] / 2**20:.2f} MiB")
        lines.append(f"val accuracy: float32 {accuracy['float32']:.2%}, int8 {accuracy['int8']:.2%}, "
                     f"top-1 agreement {quantization['val_agreement']:.2%}"
                     if isinstance(accuracy, dict) else f"val accuracy {accuracy}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
