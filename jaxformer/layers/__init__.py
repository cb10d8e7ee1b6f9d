"""Layers: norms, feed-forward, embeddings and heads, dropout and DropPath, mixture of experts.

Position encodings live in `jaxformer.layers.positions`; parameter and sharding helpers in
`jaxformer.layers.base`.
"""

from jaxformer.layers.dropout import Dropout, DropPath
from jaxformer.layers.embeddings import Embed, Head, TokenTypeEmbed, make_embed, make_head
from jaxformer.layers.ffn import FeedForward, activation
from jaxformer.layers.moe import MoE, is_moe_layer
from jaxformer.layers.norms import LayerNorm, RMSNorm, ScaleNorm, make_norm

__all__ = [
    'Dropout', 'DropPath', 'Embed', 'FeedForward', 'Head', 'LayerNorm', 'MoE', 'RMSNorm',
    'ScaleNorm', 'TokenTypeEmbed', 'activation', 'is_moe_layer', 'make_embed', 'make_head',
    'make_norm',
]
