"""jaxformer: a JAX/Flax NNX research framework for Transformers."""

__version__ = '0.1.0'
