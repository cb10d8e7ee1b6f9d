"""jaxformer: a JAX/Flax NNX research framework for Transformers.

Importing any part of jaxformer first guards against a known CPU miscompilation (see
`jaxformer.xla_guard`) and, on the CPU, lets XLA reuse its temporaries' memory between steps
(`jaxformer.cpu_allocator`), both before JAX starts its backend.
"""

from jaxformer import cpu_allocator, xla_guard

xla_guard.disable_ynn_fusion()
cpu_allocator.apply_at_import()

__version__ = '0.1.0'
