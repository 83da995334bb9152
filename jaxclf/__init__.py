"""jaxclf: fine-tune image classifiers in pure JAX."""

__version__ = "0.1.0"
