"""After training, out of JAX: ONNX graphs, int8 quantization, timm state dicts."""
