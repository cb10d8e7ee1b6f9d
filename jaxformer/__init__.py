"""jaxformer: a JAX/Flax NNX research framework for Transformers.

Importing any part of jaxformer first guards against a known CPU miscompilation (see
`jaxformer.xla_guard`), before JAX starts its backend.
"""

from jaxformer import xla_guard

xla_guard.disable_ynn_fusion()

__version__ = '0.1.0'
