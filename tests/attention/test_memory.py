"""Sub-quadratic memory (CATALOG A7, B): no n x n buffer for kinds that declare `subquadratic`.

Every registered (kind, impl) whose core class sets `subquadratic = True` is built inside the
`Attention` layer and compiled (never executed) at n = 4096, B = 1, 2 heads of 16, for the
forward pass and for forward + backward (gradients of the parameters and the input), causal
where the kind supports it and bidirectional, with a padding mask where it supports padding.
Two properties of the compiled executable:
  * no array shape anywhere in the optimised HLO text (`compiled.as_text()`, fusion bodies
    included, so a fused masked-dense computation is caught too) has n * n elements or more;
  * XLA's buffer assignment needs fewer bytes of temporaries
    (`memory_analysis().temp_size_in_bytes`) than the dense scores of the same layer alone,
    B * heads * n * n fp32 values (dense attention holds several such tensors).
    The bound counts heads because an O(n) kind also holds a few per-head arrays of
    n x (keys, features or landmarks per query); at n = 4096 a dozen of those exceed
    one head's n x n.
The dense 'dot_product' / 'xla' core is the positive control: it must break both properties,
which shows that the checks can fail.

Kinds are built with their registry defaults (sizes meant for long sequences), not with their
`example_options` (block sizes for T = 8); LARGE_N_OPTIONS overrides them per 'kind/impl'
where a default does not suit n = 4096.
"""

import math
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxformer.attention import Attention, AttentionMask, registry
from jaxformer.config import ModelConfig

N = 4096
HEADS, HEAD_DIM = 2, 16
D = HEADS * HEAD_DIM
SCORES_BYTES = HEADS * N * N * 4  # the dense fp32 scores [1, HEADS, N, N]
# Options for n = 4096 where a default does not suit it ({'kind/impl': {option: value}}).
LARGE_N_OPTIONS: dict[str, dict] = {
    # The default chunks (1024 queries x 4096 keys) are meant for n >> 4096; at n = 4096 one
    # chunk is a quarter of the dense scores.
    'dot_product/chunked': {'query_chunk': 512, 'key_chunk': 512},
    # The Sparse Transformer's pattern has n^2 / l entries for a fixed stride l; the paper takes
    # l ~ sqrt(n), which makes it O(n sqrt(n)).
    'sparse_transformer/xla': {'stride': 64},
}

SUBQUADRATIC = [f'{kind}/{impl}' for kind, impl in registry.entries()
                if getattr(registry.lookup(kind, impl), 'subquadratic', False)]
# An HLO array shape such as f32[1,2,4096,4096]{3,2,1,0} or pred[4096,4096].
_SHAPE = re.compile(r'\b(pred|[subfc]\d+|bf16|f8\w*)\[([\d,]+)\]')


def compile_layer(kind: str, impl: str, *, causal: bool, backward: bool):
  """The compiled forward (or forward + backward) of an Attention layer at length N."""
  cls = registry.lookup(kind, impl)
  cfg = ModelConfig.from_dict({
      'd_model': D, 'max_length': N, 'position': {'kind': 'none'},
      'attention': {'kind': kind, 'impl': impl, 'num_heads': HEADS,
                    'options': LARGE_N_OPTIONS.get(f'{kind}/{impl}', {})}})
  layer = Attention(cfg, causal=causal, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  padding = 'padding' in cls.features

  def forward(params, x, segment_ids):
    m = nnx.merge(graphdef, params, rest, copy=True)
    mask = AttentionMask(q_segment_ids=segment_ids, kv_segment_ids=segment_ids) if padding \
        else AttentionMask()
    return m(x, mask)[0]

  fn = forward
  if backward:
    fn = jax.grad(lambda p, x, s: jnp.sum(forward(p, x, s) ** 2), argnums=(0, 1))
  x = jax.ShapeDtypeStruct((1, N, D), jnp.float32)
  segment_ids = jax.ShapeDtypeStruct((1, N), jnp.int32)
  return jax.jit(fn).lower(params, x, segment_ids).compile()


def quadratic_shapes(compiled) -> set[str]:
  """Distinct array shapes in the compiled HLO with at least N * N elements."""
  return {f'{dtype}[{dims}]' for dtype, dims in _SHAPE.findall(compiled.as_text())
          if math.prod(int(d) for d in dims.split(',')) >= N * N}


def variants(kind_impl: str):
  cls = registry.lookup(*kind_impl.split('/'))
  return [False, True] if 'causal' in cls.features else [False]


CASES = [(k, causal, backward) for k in SUBQUADRATIC for causal in variants(k)
         for backward in (False, True)]


@pytest.mark.parametrize('kind, causal, backward', CASES,
                         ids=[f'{k}-{"causal" if c else "bidir"}-{"fwdbwd" if b else "fwd"}'
                              for k, c, b in CASES])
def test_subquadratic_kinds_never_hold_an_n_by_n_buffer(kind, causal, backward):
  compiled = compile_layer(*kind.split('/'), causal=causal, backward=backward)
  assert not quadratic_shapes(compiled), (
      f'{kind} declares subquadratic = True but its compiled HLO has arrays of >= {N}^2 '
      f'elements: {sorted(quadratic_shapes(compiled))}')
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < SCORES_BYTES, (f'{kind}: {temp} bytes of temporaries, at least the '
                                f'{SCORES_BYTES} bytes of dense attention scores')


@pytest.mark.parametrize('backward', [False, True], ids=['fwd', 'fwdbwd'])
def test_dense_control_does_hold_an_n_by_n_buffer(backward):
  assert not getattr(registry.lookup('dot_product', 'xla'), 'subquadratic', False)
  compiled = compile_layer('dot_product', 'xla', causal=True, backward=backward)
  # The scores of every head, in whatever head layout the core uses ([1, N, T, S] or
  # [1, K, G, T, S]).
  assert any(math.prod(int(d) for d in shape[4:-1].split(',')) >= HEADS * N * N
             for shape in quadratic_shapes(compiled) if shape.startswith('f32')), \
      sorted(quadratic_shapes(compiled))
  assert compiled.memory_analysis().temp_size_in_bytes >= SCORES_BYTES
