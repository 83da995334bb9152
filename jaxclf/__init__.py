"""jaxclf: fine-tune image classifiers in pure JAX."""

__version__ = "0.1.0"

from jaxclf.weights import load_pretrained  # noqa: E402  (the Python API: model, info = load_pretrained(path))
