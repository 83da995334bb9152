"""LiteRT (TFLite) models of a JAX program: `jax.export` StableHLO -> litert-converter -> flatbuffer.

The route: `jax.export` lowers the model (weights as constants) to StableHLO, and Google's
litert-converter (the StableHLO -> TFLite lowering behind litert-torch, no TensorFlow) turns it into
a flatbuffer. litert-converter pins xdsl, which pins typing-extensions below what the project's
stack needs, so it lives in its own environment (`make litert-venv`: .venv-litert, or the Python
named by JAXCLF_LITERT_PYTHON) and runs as a subprocess on a file (jaxclf/deploy/litert_convert.py).

The exported batch is fixed (1 by default: a phone's batch), since a fixed shape gives the clean
graph (batch norm folded into the convolutions, no dynamic broadcasts); runners feed larger
batches one model batch at a time. int8 is ai-edge-quantizer's (the `litert` extra), on the flatbuffer:
  dynamic (`calibration` None): int8 weights per channel, float32 activations quantized on the fly;
  static (calibration images): full integer, int8 weights and activations with MinMax ranges.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxclf.deploy import jaxprs

PYTHON_VARIABLE = "JAXCLF_LITERT_PYTHON"
VENV = ".venv-litert"
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "litert_convert.py")
# The recipes of ai-edge-quantizer used per mode, as the sidecar records them.
RECIPES = {"dynamic": "dynamic_wi8_afp32", "static": "static_wi8_ai8"}


class ConversionError(RuntimeError):
    """The converter is missing or failed; the message says which and how to fix it."""


def converter_python() -> str:
    """The interpreter that has litert-converter: $JAXCLF_LITERT_PYTHON, else .venv-litert in the repository."""
    named = os.environ.get(PYTHON_VARIABLE, "")
    if named:
        if not os.access(named, os.X_OK):
            raise ConversionError(f"{PYTHON_VARIABLE}={named} is not an executable Python")
        return named
    repository = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for root in dict.fromkeys([repository, os.getcwd()]):
        candidate = os.path.join(root, VENV, "bin", "python")
        if os.access(candidate, os.X_OK):
            return candidate
    raise ConversionError(f"TFLite conversion needs litert-converter in its own environment: run `make litert-venv` "
                          f"(creates {VENV}) or set {PYTHON_VARIABLE} to a Python with litert-converter==0.5.*")


def to_tflite(apply: Callable[[jax.Array], jax.Array], height: int, width: int, batch_size: int = 1,
              input_name: str = "images", output_name: str = "logits") -> bytes:
    """The LiteRT flatbuffer of `apply`: uint8[batch_size, height, width, 3] -> float32 logits."""
    spec = jax.ShapeDtypeStruct((batch_size, height, width, 3), jnp.uint8)
    traced = jax.make_jaxpr(apply)(spec)

    def convertible(images: jax.Array) -> jax.Array:
        return jaxprs.evaluate(traced.jaxpr, traced.consts, [images], _linear_as_conv)[0]

    program = jax.export.export(jax.jit(convertible), platforms=["cpu"])(spec).mlir_module_serialized
    with tempfile.TemporaryDirectory() as folder:
        source, out = os.path.join(folder, "program.stablehlo"), os.path.join(folder, "model.tflite")
        with open(source, "wb") as f:
            f.write(program)
        done = subprocess.run([converter_python(), SCRIPT, source, out, input_name, output_name],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0 or not os.path.isfile(out):
            raise ConversionError(f"litert-converter failed (exit {done.returncode}): {_converter_errors(done.stderr)}")
        with open(out, "rb") as f:
            return f.read()


def _linear_as_conv(eqn, ins: list) -> list | None:
    """x [B, H, W, C] @ kernel [C, O] (a Linear on feature maps, as in ConvNeXt) as the 1x1 convolution it is:
    the converter turns it (also flattened to 2-D) into a rank-4 tfl.batch_matmul that its own verifier rejects."""
    if eqn.primitive is not jax.lax.dot_general_p:
        return None
    x, kernel = ins
    if x.ndim != 4 or kernel.ndim != 2 or eqn.params["dimension_numbers"] != (((3,), (0,)), ((), ())):
        return None
    return [jax.lax.conv_general_dilated(x, kernel[None, None], (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=eqn.params["precision"],
                                         preferred_element_type=eqn.params["preferred_element_type"])]


def _converter_errors(text: str, count: int = 8) -> str:
    """The error lines of a converter's stderr (MLIR notes and log noise left out), else its last lines."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.startswith("I0000")]
    return "\n".join((errors or lines)[-count:])


def quantize(model: bytes, calibration: np.ndarray | None = None, input_name: str = "images") -> bytes:
    """The int8 flatbuffer of `model`: dynamic-range without `calibration`, else full-integer static with its
    images (uint8[N, H, W, 3], fed one model batch at a time)."""
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError:
        raise ConversionError("TFLite int8 quantization needs ai-edge-quantizer: pip install -e '.[litert]'") from None
    # The calibrator keeps every tensor on purpose (LiteRT warns that this is for debugging).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
        engine = quantizer.Quantizer(model)
        engine.load_quantization_recipe(getattr(recipe, RECIPES["dynamic" if calibration is None else "static"])())
        result = None
        if calibration is not None:
            batch = _input_batch(model)
            if len(calibration) < batch:
                raise ConversionError(f"TFLite int8 calibration needs at least one batch of the model's {batch} "
                                      f"images; got {len(calibration)}")
            samples = [{input_name: calibration[i : i + batch]} for i in range(0, len(calibration) - batch + 1, batch)]
            result = engine.calibrate({"serving_default": samples})
        return bytes(engine.quantize(result, enable_progress_bar=False, enable_progress_report=False).quantized_model)


def _input_batch(model: bytes) -> int:
    from ai_edge_litert.interpreter import Interpreter

    return int(Interpreter(model_content=model).get_input_details()[0]["shape"][0])


def output_quantization(model: bytes) -> dict | None:
    """{"dtype", "scale", "zero_point"} of an integer output (logits = (q - zero_point) * scale), else None."""
    from ai_edge_litert.interpreter import Interpreter

    output = Interpreter(model_content=model).get_output_details()[0]
    if not np.issubdtype(output["dtype"], np.integer):
        return None
    scale, zero_point = output["quantization"]
    return {"dtype": np.dtype(output["dtype"]).name, "scale": float(scale), "zero_point": int(zero_point)}

