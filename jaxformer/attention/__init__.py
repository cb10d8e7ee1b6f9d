"""Attention: the shared `Attention` layer, the mask description and the registry of cores.

Importing this package registers the built-in kinds ('dot_product' / 'xla' in core.py).
"""

from jaxformer.attention import registry
from jaxformer.attention.attention import Attention
from jaxformer.attention.core import DotProductAttention, dot_product_attention, set_sow_weights
from jaxformer.attention.mask import AttentionMask
from jaxformer.attention import fnet, linformer, nystrom  # noqa: F401
from jaxformer.attention import sparse  # noqa: F401
from jaxformer.attention import lsh  # noqa: F401
from jaxformer.attention import routing, synthesizer  # noqa: F401
from jaxformer.attention import chunked, linear, performer  # noqa: F401
from jaxformer.attention import flash  # noqa: F401
from jaxformer.attention import context  # noqa: F401

__all__ = ['Attention', 'AttentionMask', 'DotProductAttention', 'dot_product_attention',
           'registry', 'set_sow_weights']
