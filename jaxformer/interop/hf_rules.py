"""Weight-mapping rules shared by the Hugging Face converters (`jaxformer.interop.hf`).

A `Rule` ties one or more jaxformer parameters (dotted attribute paths from the model root) to
one or more Hugging Face state-dict keys through a pair of pure numpy functions, so the same table
drives import (`to_ours`) and export (`to_hf`). Per-layer rules carry the index `group` of the
scanned layer group: jaxformer stacks layer l of a stack as slice `group = l // period` of
`<stack>.layers.blocks[l % period].<param>` (period = `moe.every` when MoE is on, else 1).

Layouts (PyTorch Linear stores [out, in]; jaxformer stores [in, out] with heads split):
    q/k/v   HF [N*H, D]  ->  ours [D, N, H]       (`heads_in`)
    o       HF [D, N*H]  ->  ours [N, H, D]       (`heads_out`)
    Linear  HF [out, in] ->  ours [in, out]       (`linear`)
    bias    HF [N*H]     ->  ours [N, H]          (`heads_bias`)
Query head n of a GQA layer reads kv head n // (N / K), the layout of HF's `repeat_kv`, so the
projections need no permutation.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxformer.config import ConfigError, ModelConfig, fail

Arrays = tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  """ours <-> hf for one group of tensors.

  to_ours=None marks an alias that HF stores twice (a tied head, T5's per-stack embedding
  tables): on import the key is accepted without being read, on export it is written.
  `default` builds the HF tensors when the keys are absent (BART's final_logits_bias).
  """
  ours: tuple[str, ...]
  hf: tuple[str, ...]
  to_ours: Callable[..., Arrays] | None
  to_hf: Callable[..., Arrays]
  group: int | None = None
  default: Callable[[], Arrays] | None = None


def _ident(*a):
  return a


def same(ours: str, hf: str, group: int | None = None, **kw) -> Rule:
  return Rule((ours,), (hf,), _ident, _ident, group, **kw)


def linear(ours: str, hf: str, group: int | None = None) -> Rule:
  return Rule((ours,), (hf,), lambda w: (w.T,), lambda w: (w.T,), group)


def heads_in(ours: str, hf: str, n: int, h: int, group: int | None = None) -> Rule:
  return Rule((ours,), (hf,), lambda w: (w.T.reshape(w.shape[1], n, h),),
              lambda w: (w.reshape(w.shape[0], n * h).T,), group)


def heads_out(ours: str, hf: str, n: int, h: int, group: int | None = None) -> Rule:
  return Rule((ours,), (hf,), lambda w: (w.T.reshape(n, h, w.shape[0]),),
              lambda w: (w.reshape(n * h, w.shape[-1]).T,), group)


def heads_bias(ours: str, hf: str, n: int, h: int, group: int | None = None) -> Rule:
  return Rule((ours,), (hf,), lambda b: (b.reshape(n, h),), lambda b: (b.reshape(n * h),), group)


def alias(ours: str, hf: str) -> Rule:
  """A duplicate HF key holding the same tensor as `ours` (written on export only)."""
  return Rule((ours,), (hf,), None, _ident)


def norm(ours: str, hf: str, bias: bool, group: int | None = None) -> list[Rule]:
  """LayerNorm / RMSNorm: HF weight -> scale, bias -> bias."""
  rules = [same(f'{ours}.scale', f'{hf}.weight', group)]
  if bias:
    rules.append(same(f'{ours}.bias', f'{hf}.bias', group))
  return rules


def attention(ours: str, hf: str, cfg: ModelConfig, names: Mapping[str, str],
              group: int | None = None, kv_heads: int | None = None) -> list[Rule]:
  """Separate q/k/v/o Linear projections (BERT, BART, T5, LLaMA, ViT).

  `names` maps 'q', 'k', 'v', 'o' to the HF module names, e.g. {'q': 'q_proj', ...}.
  """
  n, h = cfg.num_heads, cfg.head_dim
  k = kv_heads or cfg.num_kv_heads
  a = cfg.attention
  rules = [heads_in(f'{ours}.wq', f'{hf}.{names["q"]}.weight', n, h, group),
           heads_in(f'{ours}.wk', f'{hf}.{names["k"]}.weight', k, h, group),
           heads_in(f'{ours}.wv', f'{hf}.{names["v"]}.weight', k, h, group),
           heads_out(f'{ours}.wo', f'{hf}.{names["o"]}.weight', n, h, group)]
  if a.qkv_bias:
    rules += [heads_bias(f'{ours}.bq', f'{hf}.{names["q"]}.bias', n, h, group),
              heads_bias(f'{ours}.bk', f'{hf}.{names["k"]}.bias', k, h, group),
              heads_bias(f'{ours}.bv', f'{hf}.{names["v"]}.bias', k, h, group)]
  if a.out_bias:
    rules.append(same(f'{ours}.bo', f'{hf}.{names["o"]}.bias', group))
  return rules


def dense_ffn(ours: str, hf: str, cfg: ModelConfig, names: Mapping[str, str],
              group: int | None = None) -> list[Rule]:
  """Plain (wi, wo) or gated (wi_gate, wi_up, wo) FFN of Linear layers; `names` maps our
  weight names ('wi' or 'wi_gate'/'wi_up', 'wo') to HF module names."""
  rules = []
  for ours_name, hf_name in names.items():
    rules.append(linear(f'{ours}.{ours_name}', f'{hf}.{hf_name}.weight', group))
    if cfg.ffn.bias:
      rules.append(same(f'{ours}.b{ours_name[1:]}', f'{hf}.{hf_name}.bias', group))
  return rules


def tied_head(cfg: ModelConfig, embedding: str, hf_head: str, head: str = 'head') -> list[Rule]:
  """The output projection: an alias of the embedding when tied, else `head.head.kernel`."""
  if cfg.tie_embeddings:
    return [alias(embedding, hf_head)]
  return [linear(f'{head}.head.kernel', hf_head)]


# --------------------------------------------------------------------------- config helpers
ACTIVATIONS = {'gelu': 'gelu', 'gelu_python': 'gelu', 'gelu_new': 'gelu_tanh',
               'gelu_pytorch_tanh': 'gelu_tanh', 'relu': 'relu', 'silu': 'silu',
               'swish': 'silu', 'tanh': 'tanh'}
HF_ACTIVATIONS = {'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh', 'relu': 'relu',
                  'silu': 'silu', 'tanh': 'tanh'}


def activation(hf_config, field: str) -> str:
  value = getattr(hf_config, field)
  if value not in ACTIVATIONS:
    fail(f'hf.{field}', value, f'supported activations are {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[value]


def require(hf_config, field: str, allowed, why: str = '') -> None:
  """Fails naming the HF config field when its value is not in `allowed` (a missing field
  counts as its first allowed value)."""
  value = getattr(hf_config, field, allowed[0])
  if value not in allowed:
    fail(f'hf.{field}', value, f'only {list(allowed)} is supported' + (f' ({why})' if why else ''))


def is_tied(flag: bool, sd: Mapping[str, np.ndarray], embedding: str, head: str) -> bool:
  """Tied as loaded by `from_pretrained`: HF unties when both tensors are stored and differ."""
  if not flag:
    return False
  if head not in sd or embedding not in sd:
    return True
  return bool(np.array_equal(sd[head], sd[embedding]))


def shared_tables(sd: Mapping[str, np.ndarray], keys, field: str, value) -> None:
  """jaxformer's encoder-decoder has one embedding table; fail when HF stores different ones
  (transformers 5 unties encoder, decoder and `shared` when tie_word_embeddings=False)."""
  present = [k for k in keys if k in sd]
  for k in present[1:]:
    if not np.array_equal(sd[k], sd[present[0]]):
      fail(f'hf.{field}', value, f'{k} differs from {present[0]}, but jaxformer shares one '
           'embedding table between the encoder and the decoder')


def need(cfg: ModelConfig, field: str, value: Any, expected, target: str) -> None:
  """Export check: our config field must have a value the HF target can express."""
  ok = value in expected if isinstance(expected, (tuple, list, set, frozenset)) else (
      value == expected)
  if not ok:
    raise ConfigError(f'model.{field}={value!r} cannot be exported to Hugging Face {target}: '
                      f'it needs {expected!r}')


def rename_keys(sd: Mapping[str, np.ndarray], marker: str,
                renames: tuple[tuple[str, str], ...]) -> dict[str, np.ndarray]:
  """Applies the regex `renames` in order to every key containing `marker` (older
  transformers checkpoint layouts -> the current one); other keys are kept as they are."""
  out = {}
  for k, v in sd.items():
    if marker in k:
      for pat, rep in renames:
        k = re.sub(pat, rep, k)
    out[k] = v
  return out
