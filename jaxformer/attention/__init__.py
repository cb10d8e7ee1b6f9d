"""Attention: the shared `Attention` layer, the mask description and the registry of cores.

Importing this package registers the built-in kinds ('dot_product' / 'xla' in core.py).
"""

from jaxformer.attention import registry
from jaxformer.attention.attention import Attention
from jaxformer.attention.core import DotProductAttention, dot_product_attention, set_sow_weights
from jaxformer.attention.mask import AttentionMask

__all__ = ['Attention', 'AttentionMask', 'DotProductAttention', 'dot_product_attention',
           'registry', 'set_sow_weights']
