"""alignjax: align Llama-family models with JAX on TPU pods."""
__version__ = "0.1.0"
