"""Attention kinds by name: `model.attention.kind` x `model.attention.impl` -> a core module.

A *core* mixes already-projected heads; the `Attention` module (projections, positions, KV
cache) is shared by every kind. Every core has one call signature:

    core = build(cfg, num_heads=N, num_kv_heads=K, head_dim=H, dtype=..., param_dtype=...,
                 rngs=rngs, max_length=L, causal=..., cross=...)
    out = core(q, k, v, mask, bias=None, deterministic=True, dropout_rng=None)
        q: [B, T, N, H], k / v: [B, S, K, H], mask: AttentionMask, bias: [B|1, N|1, T, S] or None
        out: [B, T, N, H]
`max_length` is the model's longest sequence (kinds with length-shaped parameters, such as
Linformer's projections, size them from it); `causal` / `cross` say how the layer uses the core.
A core's __init__ takes `**kwargs` it does not need (`core_kwargs` drops nothing).

Optional parts of the protocol:
  * `example_options` (class attribute, a dict): options that make the kind meaningful on the
    small shapes of the generic tests (T = 8 tokens, e.g. a block size of 2); tiny presets may
    use them too. Default: {}.
  * Stateful decoding: a core that defines `init_state(batch, max_len, dtype) -> pytree` keeps
    its own decoding state (e.g. the running sums of linear attention) instead of the
    K/V cache. `Attention.init_cache` then returns {'core': state, 'index': 0}, and a cached
    call is `out, state = core(q, k, v, mask, state=state)` with the new tokens only (mask
    carries their segment ids, 0 = padding, and positions).
  * `uses_projections = False`: the layer creates no Q/K/V/O projections and passes the input
    x [B, T, D] itself as q = k = v of shape [B, T, 1, D]; the core's [B, T, 1, D] output is the
    layer's output (FNet-style token mixing).

`impl='auto'` is resolved when a layer is built (`resolve_impl`): the best fused impl of the
kind on this backend that provides every needed feature, else the kind's 'xla' reference.

Where each kind lives (attention/<file>; `tests/attention/test_attention_registry_files.py`
checks this table against the registry):

    kind                 impl -> file
    dot_product          xla -> core.py, chunked -> chunked.py, pallas / cudnn -> flash.py,
                         ring / context_allgather -> context.py
    local, dilated, longformer, bigbird, sparse_transformer      xla -> sparse.py
    linear               xla -> linear.py
    performer            xla -> performer.py
    linformer            xla -> linformer.py
    nystrom              xla -> nystrom.py
    lsh                  xla -> lsh.py
    synthesizer          xla -> synthesizer.py
    routing              xla -> routing.py
    fnet                 xla -> fnet.py

New kinds plug in with `@register('name')` (and optionally `impl=`) without touching model code,
and the tests in tests/attention/test_generic.py pick them up automatically through `kinds()`.
A core declares what it supports in `features`, a subset of FEATURES; asking for anything else
fails at build time with the reason (`unsupported`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dataclasses

import jax
import jax.numpy as jnp

from jaxformer.config import AttentionConfig, ConfigError

# causal: causal masking; padding: padding masks (segment id 0); segments: packed examples
# (segment ids 1, 2, ... in one row) never see each other; bias: additive bias (ALiBi, T5);
# decode: KV-cached incremental decoding; cross: keys from another sequence; window: sliding
# window; dropout: dropout on probabilities; weights: can sow attention probabilities;
# softcap: logit soft-capping; shaw: the call also accepts `value_bias_fn(probs [B, N, T, S])
# -> [B, T, N, H]`, added to the output (Shaw et al. relative value term); prefix: keys and
# values [P prefix; S sequence] with `mask.kv_prefix = P` (prefix tuning: the P keys are seen
# by every non-padding query, see attention/mask.py), so the core builds its mask from
# `mask.dense` over all P + S keys.
# A core whose class sets `takes_relative_bias = True` receives a position bias as the
# `layers.positions.RelativeBias` itself (a function of the positions, which it evaluates block
# by block) instead of a dense [B|1, N, T, S] array: a calling convention, not a need.
FEATURES = frozenset({'causal', 'padding', 'segments', 'bias', 'decode', 'cross', 'window',
                      'dropout', 'weights', 'softcap', 'shaw', 'prefix'})

_REGISTRY: dict[tuple[str, str], type] = {}
_REASONS: dict[tuple[str, str], dict[str, str]] = {}


def register(kind: str, impl: str = 'xla', *, unsupported: dict[str, str] | None = None
             ) -> Callable[[type], type]:
  """Class decorator. `unsupported` maps a feature to the reason it cannot be provided."""

  def deco(cls):
    key = (kind, impl)
    if key in _REGISTRY and _REGISTRY[key] is not cls:
      raise ValueError(f'attention kind {kind!r} impl {impl!r} registered twice')
    _REGISTRY[key] = cls
    _REASONS[key] = dict(unsupported or {})
    features = getattr(cls, 'features', None)
    if features is None or not set(features) <= FEATURES:
      raise ValueError(f'{cls.__name__}.features must be a subset of {sorted(FEATURES)}')
    return cls

  return deco


def _ensure_loaded() -> None:
  # Importing the package registers the built-in kinds.
  import jaxformer.attention  # noqa: F401


def options(cfg: AttentionConfig, defaults: dict[str, Any]) -> dict[str, Any]:
  """`cfg.options` merged over `defaults`; an unknown key fails naming the allowed ones."""
  unknown = sorted(set(cfg.options) - set(defaults))
  if unknown:
    raise ConfigError(f'model.attention.options has unknown key(s) {unknown} for kind '
                      f'{cfg.kind!r} (impl {cfg.impl!r}): allowed keys are {sorted(defaults)}')
  return {**defaults, **dict(cfg.options)}


def entries() -> list[tuple[str, str]]:
  """Every registered (kind, impl) pair, sorted."""
  _ensure_loaded()
  return sorted(_REGISTRY)


def kinds(impl: str | None = None) -> list[str]:
  _ensure_loaded()
  return sorted({k for k, i in _REGISTRY if impl is None or i == impl})


def impls(kind: str) -> list[str]:
  _ensure_loaded()
  return sorted(i for k, i in _REGISTRY if k == kind)


# impl='auto': the fused implementations worth trying first on each backend, best first; the
# kind's reference 'xla' and then any other impl of the kind follow. cuDNN only for fp16 / bf16.
AUTO_ORDER = {'gpu': ('cudnn', 'pallas'), 'tpu': ('pallas',)}


def resolve_impl(kind: str, impl: str, needed: set[str] = frozenset(), dtype=None,
                 backend: str | None = None) -> str:
  """`impl`, or for 'auto' the first impl of `kind` in `AUTO_ORDER[backend]` + ['xla'] + the
  rest that provides every feature in `needed` (the first candidate when none does, so that
  `require` names what is missing)."""
  if impl != 'auto':
    return impl
  _ensure_loaded()
  backend = backend or jax.default_backend()
  half = dtype is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  order = [i for i in AUTO_ORDER.get(backend, ()) if i != 'cudnn' or half] + ['xla'] + impls(kind)
  order = [i for i in order if (kind, i) in _REGISTRY]
  for i in order:
    if set(needed) <= set(_REGISTRY[(kind, i)].features):
      return i
  return order[0] if order else 'xla'


def resolve(cfg: AttentionConfig, needed: set[str] = frozenset(), dtype=None) -> AttentionConfig:
  """`cfg` with impl 'auto' replaced by the impl it resolves to (see `resolve_impl`)."""
  impl = resolve_impl(cfg.kind, cfg.impl, needed, dtype)
  return cfg if impl == cfg.impl else dataclasses.replace(cfg, impl=impl)


def lookup(kind: str, impl: str = 'xla') -> type:
  _ensure_loaded()
  impl = resolve_impl(kind, impl)
  if not any(k == kind for k, _ in _REGISTRY):
    raise ConfigError(f'model.attention.kind={kind!r} is invalid: allowed values are {kinds()}')
  if (kind, impl) not in _REGISTRY:
    raise ConfigError(f'model.attention.impl={impl!r} is invalid for kind {kind!r}: '
                      f"allowed values are {impls(kind) + ['auto']}")
  return _REGISTRY[(kind, impl)]


def require(cfg: AttentionConfig, needed: set[str], where: str = 'model.attention') -> None:
  """Fails with the kind's reason when it lacks a feature the model needs."""
  cfg = resolve(cfg, needed)
  cls = lookup(cfg.kind, cfg.impl)
  missing = sorted(set(needed) - set(cls.features))
  if missing:
    reasons = _REASONS[(cfg.kind, cfg.impl)]
    why = '; '.join(f'{f}: {reasons.get(f, "not implemented by this kind")}' for f in missing)
    raise ConfigError(f'{where}.kind={cfg.kind!r} (impl={cfg.impl!r}) cannot provide '
                      f'{missing} needed by this model ({why})')


def build(cfg: AttentionConfig, *, num_heads: int, num_kv_heads: int, head_dim: int, rngs,
          dtype=None, param_dtype=None, needed: set[str] = frozenset(), **kwargs):
  """Instantiates the core for `cfg.kind` / `cfg.impl` after checking `needed` features."""
  cfg = resolve(cfg, set(needed), dtype)
  require(cfg, set(needed))
  cls = lookup(cfg.kind, cfg.impl)
  return cls(cfg, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
             dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kwargs)
