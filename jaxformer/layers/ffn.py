"""Position-wise feed-forward network (CATALOG D4).

Vaswani et al. (2017), eq. 2:      FFN(x) = act(x W1 + b1) W2 + b2
Shazeer (2020), GLU variants:      FFN(x) = (act(x W_gate) * (x W_up)) W2
  SwiGLU = silu gated, GeGLU = gelu gated, ReGLU = relu gated.
Activations: 'relu', 'gelu' (exact, erf), 'gelu_tanh' (tanh approximation, == HF gelu_new /
gelu_pytorch_tanh), 'silu' (== swish), 'tanh'.

Einsum letters: B batch, T length, D model dim, F ffn hidden dim.

Chunked FFN (Kitaev et al. 2020, sec. 3): with `cfg.ffn.chunk_size` = C the positions are
processed C at a time by `lax.map`, so only a [B, C, F] hidden activation exists at once; the
result equals the unchunked FFN (it is position-wise). With dropout, chunk i draws its mask from
fold_in(key, i), one key per call.

Parameter names and their Hugging Face counterparts (PyTorch Linear weights are transposed):
  plain:  wi [D, F] ('embed', 'mlp')    W1   GPT-2 c_fc, BERT intermediate.dense, T5 wi
          bi [F]    ('mlp',)            b1
          wo [F, D] ('mlp', 'embed')    W2   GPT-2 c_proj, BERT output.dense, T5 wo
          bo [D]    ('embed',)          b2
  gated:  wi_gate [D, F]  act branch    LLaMA gate_proj, T5 v1.1 wi_0
          wi_up   [D, F]  linear branch LLaMA up_proj,   T5 v1.1 wi_1
          wo      [F, D]                LLaMA down_proj, T5 v1.1 wo
          bi_gate [F], bi_up [F], bo [D] when cfg.ffn.bias
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ACTIVATIONS, ModelConfig, check_choice
from jaxformer.layers.base import make_init, param, residual_init, zeros
from jaxformer.layers.linear import project
from jaxformer.parallel import rules as R
from jaxformer.parallel.sharding import constrain

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': jax.nn.relu,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'silu': jax.nn.silu,
    'tanh': jnp.tanh,
}
assert set(_ACTIVATIONS) == set(ACTIVATIONS)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation function called `name` (one of config.ACTIVATIONS)."""
  check_choice('model.ffn.activation', name, _ACTIVATIONS)
  return _ACTIVATIONS[name]


def ffn_weight_specs(cfg: ModelConfig) -> dict[str, tuple[str, tuple[str, ...]]]:
  """Weight name -> (role, logical axis names) for a (gated or plain) FFN, without expert axis.

  role is 'in' (D -> F), 'out' (F -> D), 'in_bias' or 'out_bias'. Shared with the MoE experts.
  """
  names = ('wi_gate', 'wi_up') if cfg.ffn.gated else ('wi',)
  specs = {n: ('in', ('embed', 'mlp')) for n in names}
  specs['wo'] = ('out', ('mlp', 'embed'))
  if cfg.ffn.bias:
    specs.update({'b' + n[1:]: ('in_bias', ('mlp',)) for n in names})
    specs['bo'] = ('out_bias', ('embed',))
  return specs


class FeedForward(nnx.Module):
  """Dense FFN: x [B, T, D] -> [B, T, D]; gated or plain, bias and dropout per `cfg.ffn`.

  W_gate / W_up / W1 use `cfg.init`; W2 uses `residual_init` (std / sqrt(2 L) when
  `cfg.scaled_residual_init`, L = `num_layers`, default `cfg.num_layers`). Dropout with rate
  `cfg.ffn.dropout` acts on the hidden activation and draws from the 'dropout' stream of `rngs`.
  `layer_index` is recorded for callers (e.g. analysis hooks); the dense FFN does not depend on it.
  """
  PROJECTIONS = ('wi', 'wi_gate', 'wi_up', 'wo')  # jaxformer/layers/linear.py `project`

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, layer_index: int | None = None,
               num_layers: int | None = None):
    self.gated = cfg.ffn.gated
    check_choice('model.ffn.activation', cfg.ffn.activation, _ACTIVATIONS)
    self.activation = cfg.ffn.activation
    self.dtype = cfg.compute_dtype
    self.layer_index = layer_index
    d, f = cfg.d_model, cfg.ffn_hidden_dim
    inits = {
        'in': make_init(cfg.init, cfg.init_std),
        'out': residual_init(cfg.init, cfg.init_std, num_layers or cfg.num_layers,
                             cfg.scaled_residual_init),
        'in_bias': zeros, 'out_bias': zeros,
    }
    shapes = {'in': (d, f), 'out': (f, d), 'in_bias': (f,), 'out_bias': (d,)}
    for name, (role, names) in ffn_weight_specs(cfg).items():
      setattr(self, name, param(rngs, inits[role], shapes[role], names, cfg.params_dtype))
    self.dropout = nnx.Dropout(cfg.ffn.dropout, rngs=rngs if cfg.ffn.dropout > 0 else None)
    self.chunk_size = cfg.ffn.chunk_size
    # Sows the hidden activation (the input of wo) as 'hidden' (nnx.Intermediate) when True:
    # activation-entropy monitoring (jaxformer/analysis/entropy.py, set_sow_hidden).
    self.sow_hidden = False

  def _w(self, name):
    w = getattr(self, name, None)
    return None if w is None else w[...].astype(self.dtype)

  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """x [..., T, D] -> [..., T, D], in chunks of `chunk_size` positions when it is set."""
    t, c = x.shape[-2], self.chunk_size
    if c is None or t <= c:
      return self._apply(x, deterministic)
    key = self.dropout.rngs() if not deterministic and self.dropout.rate > 0 else None
    n = -(-t // c)
    pad = [(0, 0)] * x.ndim
    pad[-2] = (0, n * c - t)
    xs = jnp.moveaxis(jnp.pad(x, pad).reshape(x.shape[:-2] + (n, c, x.shape[-1])), -3, 0)
    ys = jax.lax.map(lambda a: self._apply(
        a[0], deterministic, None if key is None else jax.random.fold_in(key, a[1])),
        (xs, jnp.arange(n)))
    return jnp.moveaxis(ys, 0, -3).reshape(x.shape[:-2] + (n * c, -1))[..., :t, :]

  def _apply(self, x, deterministic, key=None):
    x = x.astype(self.dtype)
    act = activation(self.activation)
    if self.gated:
      h = act(self._dense(x, 'wi_gate', 'bi_gate'))
      h = h * self._dense(x, 'wi_up', 'bi_up')
    else:
      h = act(self._dense(x, 'wi', 'bi'))
    h = constrain(h, R.FFN_HIDDEN)
    if self.sow_hidden:
      self.sow(nnx.Intermediate, 'hidden', h)
    h = self.dropout(h, deterministic=deterministic, rngs=key)
    return self._dense(h, 'wo', 'bo')

  def _dense(self, x, w: str, b: str):
    y, bias = project(self, w, x, self._w(w)), self._w(b)
    return y if bias is None else y + bias


def set_sow_hidden(model: nnx.Module, enabled: bool = True) -> int:
  """Turns sowing of the hidden activation on or off in every dense FFN of `model`; returns how
  many were switched."""
  count = 0
  for _, m in nnx.iter_modules(model):
    if isinstance(m, FeedForward):
      m.sow_hidden = enabled
      count += 1
  return count
