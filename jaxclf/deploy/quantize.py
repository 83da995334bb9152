"""INT8 ONNX models with onnxruntime's quantization tools (`jaxclf.export --format onnx --quantize int8`).

- dynamic (`--calibration 0`): int8 weights, activations quantized per batch at run time
  (`quantize_dynamic`); no data needed.
- static (`--calibration N`): int8 weights (per channel) and activations with ranges measured on
  N images of the run's train split, read through its eval preprocessing (`quantize_static`,
  QDQ format, MinMax calibration).

Only convolutions and matrix products are quantized, where int8 pays; the rest (normalisation,
softmax, pooling, residual adds) stays float32, which also keeps the -inf padding of max pooling
out of the calibrated ranges. Needs onnxruntime (the `onnx` extra).

The integer types are chosen so that every x86-64 CPU computes the same integers: onnxruntime's
AVX2 kernel for uint8 activations x int8 weights sums pairs of products into int16 with
saturation (255 * 127 * 2 > 32767), where VNNI and AVX-512 VNNI do not saturate, so full-range
int8 weights give CPU-dependent predictions (measured: 82% agreement with float32 on AVX2 against
99.7% with VNNI, for the same file). Static quantization therefore keeps int8 weights in 7 bits
(`reduce_range`: 255 * 64 * 2 <= 32767, nothing saturates, the fast u8s8 kernels stay); dynamic
quantization uses uint8 weights (U8U8 kernels widen to 16 bits before multiplying), since 7-bit
weights there measured 2.5x the logit error of 8-bit ones. `SETTINGS` is recorded in the sidecar.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from onnxruntime import quantization


OP_TYPES = ["Conv", "MatMul"]
# What onnxruntime's quantizers are given, per mode (see the module docstring for why), as the sidecar records it.
# Dynamic quantization has no activation type to choose: DynamicQuantizeLinear always gives uint8.
SETTINGS = {
    "dynamic": {"weight_type": "QUInt8", "reduce_range": False, "per_channel": False},
    "static": {"activation_type": "QUInt8", "weight_type": "QInt8", "reduce_range": True, "per_channel": True,
               "quant_format": "QDQ", "calibrate_method": "MinMax"},
}


def _quantizer_arguments(mode: str) -> dict:
    """SETTINGS[mode] as the keyword arguments of onnxruntime's quantize_dynamic / quantize_static."""
    enums = {"activation_type": quantization.QuantType, "weight_type": quantization.QuantType,
             "quant_format": quantization.QuantFormat, "calibrate_method": quantization.CalibrationMethod}
    return {key: enums[key][value] if key in enums else value for key, value in SETTINGS[mode].items()}


def quantize(model: bytes, calibration: np.ndarray | None = None, input_name: str = "images") -> bytes:
    """The int8 version of ONNX `model`: dynamic without `calibration`, else static with its images
    (uint8[N, H, W, 3], fed one at a time)."""
    with tempfile.TemporaryDirectory() as folder:
        source, prepared, out = (os.path.join(folder, name) for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        with open(source, "wb") as f:
            f.write(model)
        # Shape inference and onnxruntime's graph fusions first, as its quantization guide asks (ONNX's
        # shape inference: onnxruntime's symbolic one fails on the ViT graphs' Unsqueeze).
        quantization.quant_pre_process(source, prepared, skip_symbolic_shape=True)
        if calibration is None:
            quantization.quantize_dynamic(prepared, out, op_types_to_quantize=OP_TYPES, **_quantizer_arguments("dynamic"))
        else:
            reader = _ImageReader(input_name, calibration)
            quantization.quantize_static(prepared, out, reader, op_types_to_quantize=OP_TYPES,
                                         **_quantizer_arguments("static"))
        with open(out, "rb") as f:
            return f.read()


class _ImageReader(quantization.CalibrationDataReader):
    """Calibration batches of one image each, as onnxruntime's calibrator asks for them."""

    def __init__(self, input_name: str, images: np.ndarray):
        self._batches = iter([{input_name: images[i : i + 1]} for i in range(len(images))])

    def get_next(self) -> dict | None:
        return next(self._batches, None)
