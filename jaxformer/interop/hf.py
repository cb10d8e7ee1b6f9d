"""Hugging Face (transformers 5) weight import and export.

    cfg, model = from_hf(GPT2LMHeadModel(...))                 # a PyTorch model
    cfg, model = from_hf(hf_config, state_dict)                 # config + tensors
    cfg, model = from_hf(hf_config, 'model.safetensors')        # config + safetensors file(s)
    cfg, model = from_hf('path/to/checkpoint_dir')              # config.json + *.safetensors
    sd = to_hf_state_dict(model, cfg)                           # decoders: HF *ForCausalLM keys
    save_hf_safetensors(model, cfg, 'out_dir')                  # model.safetensors + config.json

Families (HF `model_type` -> jaxformer family preset): gpt2 -> gpt2, llama -> llama,
mistral -> mistral, mixtral -> mixtral, bert -> bert, roberta -> roberta, electra -> bert with
`embed_dim` (the generator and the discriminator each an encoder; `electra_from_hf` imports a
pair as one `electra` model), t5 -> t5 / t5_v1_1, bart -> bart, vit -> vit, funnel -> funnel,
swin -> swin, mamba -> mamba. The HF config becomes
`family(name, **overrides)` (sizes, heads, kv heads, head dim, eps, RoPE theta and linear
scaling, vocabulary, positions, tying, sliding window, experts, dropout rates); an HF setting
jaxformer cannot express raises `ConfigError` naming the HF field (`hf.<field>`). Weights go
through the per-family `Rule` tables of `hf_decoders`, `hf_encoders`, `hf_seq2seq`, `hf_funnel`,
`hf_swin` and `hf_mamba`; every jaxformer parameter must be filled and every HF tensor consumed
(apart from known buffers and tied duplicates), otherwise a ValueError lists the keys. Tensors
are read as numpy (never unpickled: no torch.load) and cast to `model.param_dtype` (float32
unless overridden).

Inputs: jaxformer images are NHWC (HF pixel_values are NCHW); padding is segment id 0.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import ConfigError, ModelConfig
from jaxformer.interop import (hf_decoders, hf_encoders, hf_funnel, hf_mamba, hf_rules,
                               hf_seq2seq, hf_swin)
from jaxformer.models import build_model, family


@dataclasses.dataclass(frozen=True)
class _Family:
  """How one HF model_type maps: config -> (preset, overrides), rules, key prefix."""
  config: Callable[[Any, Mapping[str, np.ndarray]], tuple[str, dict]]
  rules: Callable[[ModelConfig], list[hf_rules.Rule]]
  prefix: str = ''
  ignore: tuple[str, ...] = ()
  normalize: Callable[[dict], dict] | None = None


_FAMILIES: dict[str, _Family] = {
    'gpt2': _Family(hf_decoders.gpt2_config, hf_decoders.gpt2_rules, 'transformer.',
                    hf_decoders.GPT2_IGNORE),
    'llama': _Family(hf_decoders.llama_config, hf_decoders.llama_rules, 'model.',
                     hf_decoders.LLAMA_IGNORE),
    'mistral': _Family(hf_decoders.llama_config, hf_decoders.llama_rules, 'model.',
                       hf_decoders.LLAMA_IGNORE),
    'mixtral': _Family(hf_decoders.llama_config, hf_decoders.llama_rules, 'model.',
                       hf_decoders.LLAMA_IGNORE, hf_decoders.mixtral_normalize),
    'bert': _Family(hf_encoders.bert_config, lambda cfg: hf_encoders.bert_rules(cfg, 'bert'),
                    'bert.', (r'position_ids$',)),
    'roberta': _Family(hf_encoders.bert_config,
                       lambda cfg: hf_encoders.bert_rules(cfg, 'roberta'), 'roberta.',
                       (r'position_ids$',)),
    'electra': _Family(hf_encoders.bert_config,
                       lambda cfg: hf_encoders.bert_rules(cfg, 'electra'), 'electra.',
                       (r'position_ids$',)),
    'vit': _Family(hf_encoders.vit_config, hf_encoders.vit_rules, 'vit.', (),
                   hf_encoders.vit_normalize),
    'swin': _Family(hf_swin.swin_config, hf_swin.swin_rules, 'swin.', hf_swin.SWIN_IGNORE,
                    hf_swin.swin_normalize),
    't5': _Family(hf_seq2seq.t5_config, hf_seq2seq.t5_rules, '', hf_seq2seq.T5_IGNORE),
    'bart': _Family(hf_seq2seq.bart_config, hf_seq2seq.bart_rules, 'model.'),
    'funnel': _Family(hf_funnel.funnel_config, hf_funnel.funnel_rules, hf_funnel.PREFIX),
    'mamba': _Family(hf_mamba.mamba_config, hf_mamba.mamba_rules, 'backbone.'),
}
_HEAD_KEYS = re.compile(r'^(lm_head\.|cls\.|classifier\.|final_logits_bias$|generator_|'
                        r'discriminator_)')


def supported_model_types() -> list[str]:
  return sorted(_FAMILIES)


# =========================================================================== import
def from_hf(source, state_dict=None, *, layout=None, **overrides
            ) -> tuple[ModelConfig, nnx.Module]:
  """Converts a Hugging Face model into (ModelConfig, jaxformer model) with the same outputs.

  Args:
    source: a transformers PreTrainedModel; or a transformers config (then `state_dict` is
      required); or a local checkpoint directory holding config.json and *.safetensors.
    state_dict: with a config: a mapping of names to torch tensors / numpy arrays, or the path
      of a .safetensors file, a list of them, or a directory of them.
    layout: a `jaxformer.parallel.sharding.Layout`: every converted tensor goes from the host
      straight into its shards on the mesh (by its logical names); no device ever holds a
      whole parameter that the layout splits.
    **overrides: ModelConfig fields merged over the converted config (nested sections as
      dicts), e.g. `param_dtype='bfloat16'`, `scan_layers=False`, `remat='full'`. Fields that
      change parameter shapes make the load fail.
  """
  ck = read_checkpoint(source, state_dict, **overrides)
  return ck.cfg, _load(ck.cfg, ck.rules(), ck.sd, ck.family.ignore, layout)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A Hugging Face checkpoint read for conversion (`read_checkpoint`): its `model_type`, the
  jaxformer config it describes, its tensors (numpy, keys with the task model's prefix) and its
  family's conversion rules."""
  model_type: str
  cfg: ModelConfig
  sd: dict[str, np.ndarray]
  family: _Family

  def rules(self, cfg: ModelConfig | None = None) -> list[hf_rules.Rule]:
    """The family's rules for `cfg` (default: the checkpoint's own config)."""
    return self.family.rules(cfg or self.cfg)


def read_checkpoint(source, state_dict=None, **overrides) -> Checkpoint:
  """Reads a checkpoint as `from_hf` does (same `source` / `state_dict` forms and overrides),
  without building the model: for loaders that place the tensors themselves
  (`jaxformer.finetune.init_from`)."""
  hf_config, sd = _read_source(source, state_dict)
  model_type = getattr(hf_config, 'model_type', None)
  if model_type not in _FAMILIES:
    raise ConfigError(f'hf.model_type={model_type!r} is invalid: supported model types are '
                      f'{supported_model_types()}')
  fam = _FAMILIES[model_type]
  sd = _add_prefix(sd, fam.prefix)
  if fam.normalize is not None:
    sd = fam.normalize(sd)
  name, over = fam.config(hf_config, sd)
  return Checkpoint(model_type, family(name, **_merge(over, overrides)), sd, fam)


def electra_from_hf(generator, discriminator, *, layout=None, **overrides
                    ) -> tuple[ModelConfig, nnx.Module]:
  """ELECTRA's two halves -> (ModelConfig, jaxformer `electra` model), e.g. to go on pre-training.

  `generator` (an ElectraForMaskedLM) and `discriminator` (an ElectraForPreTraining) are each a
  transformers model or a local checkpoint directory. Their embeddings (tables and LayerNorm)
  must be equal, as ELECTRA trains them shared; the generator's sizes become
  `model.electra.generator_*`. `layout` and `overrides` as in `from_hf`.
  """
  halves = {'generator': _read_source(generator, None),
            'discriminator': _read_source(discriminator, None)}
  for half, (c, _) in halves.items():
    if getattr(c, 'model_type', None) != 'electra':
      raise ConfigError(f"hf.model_type={getattr(c, 'model_type', None)!r} of the {half} is "
                        "invalid: must be 'electra'")
  (gc, gsd), (dc, dsd) = [(c, _add_prefix(sd, 'electra.')) for c, sd in halves.values()]
  over = hf_encoders.electra_pair_config(gc, gsd, dc, dsd)
  cfg = family('electra', **_merge(over, overrides))
  sd = {f'{half}/{k}': v for half, s in (('generator', gsd), ('discriminator', dsd))
        for k, v in s.items()}
  return cfg, _load(cfg, hf_encoders.electra_pair_rules(cfg), sd, (r'position_ids$',), layout)


def _read_source(source, state_dict):
  """-> (transformers config, {name: numpy array})."""
  if hasattr(source, 'state_dict') and hasattr(source, 'config'):
    if state_dict is not None:
      raise ValueError('pass either a transformers model or (config, state_dict), not both')
    return source.config, {k: _to_numpy(v) for k, v in source.state_dict().items()}
  if isinstance(source, (str, os.PathLike)):
    import transformers

    config = transformers.AutoConfig.from_pretrained(os.fspath(source), local_files_only=True)
    state_dict = source if state_dict is None else state_dict
  elif state_dict is None:
    raise ValueError('a transformers config needs state_dict= (tensors or a safetensors path)')
  else:
    config = source
  if isinstance(state_dict, Mapping):
    return config, {k: _to_numpy(v) for k, v in state_dict.items()}
  return config, read_safetensors(state_dict)


def read_safetensors(path) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors file, a list of files, or every *.safetensors in a directory."""
  from safetensors.numpy import load_file

  if isinstance(path, (list, tuple)):
    files = [os.fspath(p) for p in path]
  elif os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(os.fspath(path), '*.safetensors')))
    if not files:
      raise FileNotFoundError(f'no *.safetensors file in {path}')
  else:
    files = [os.fspath(path)]
  sd = {}
  for f in files:
    sd.update(load_file(f))
  return sd


def _to_numpy(t) -> np.ndarray:
  if isinstance(t, np.ndarray):
    return t
  if hasattr(t, 'detach'):  # torch.Tensor (bfloat16 has no numpy dtype in torch)
    t = t.detach().cpu()
    if t.is_floating_point():
      t = t.float()
    return t.numpy()
  return np.asarray(t)


def _add_prefix(sd: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """Base-model state dicts (GPT2Model, BertModel, ...) lack the task model's prefix."""
  if not prefix or any(k.startswith(prefix) for k in sd):
    return sd
  return {(k if _HEAD_KEYS.match(k) else prefix + k): v for k, v in sd.items()}


def _merge(base: dict, over: Mapping) -> dict:
  out = dict(base)
  for k, v in over.items():
    if dataclasses.is_dataclass(v):
      v = dataclasses.asdict(v)
    if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
      out[k] = _merge(dict(out[k]), v)
    else:
      out[k] = v
  return out


def _resolve(model, path: str):
  obj = model
  for part in path.split('.'):
    obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
  if not isinstance(obj, nnx.Param):
    raise TypeError(f'{path} is not an nnx.Param but {type(obj).__name__}')
  return obj


def _model_shell(cfg: ModelConfig, seed: int = 0, layout=None) -> nnx.Module:
  """The model with abstract parameters (about to be overwritten) and real RNG streams.

  Nothing is randomly initialised: the dropout streams get fresh keys drawn on the host, so
  no initialiser is compiled or run (per-shape init compiles dominate small conversions and
  the init itself large ones)."""
  model = nnx.eval_shape(lambda: build_model(cfg))
  rest = nnx.state(model, nnx.Not(nnx.Param))
  if any(not isinstance(v, (nnx.RngKey, nnx.RngCount))
         for _, v in nnx.to_flat_state(rest)):
    nnx.update(model, jax.jit(lambda: nnx.state(build_model(cfg), nnx.Not(nnx.Param)))())
    return model
  host = np.random.default_rng(seed)

  def fresh(x):
    if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jnp.zeros(x.shape, x.dtype)
    data = jax.eval_shape(jax.random.key_data, x)
    key = jax.random.wrap_key_data(host.integers(0, np.iinfo(data.dtype).max, data.shape,
                                                 dtype=data.dtype, endpoint=True))
    if key.dtype != x.dtype:
      raise AssertionError(f'RNG key dtype {x.dtype} is not the default implementation')
    return key

  rest = jax.tree.map(fresh, rest)
  if layout is not None:
    rest = jax.device_put(rest, layout.replicated)
  nnx.update(model, rest)
  return model


def convert(rules, sd: Mapping[str, np.ndarray]
            ) -> tuple[dict[str, np.ndarray], set[str], dict[str, list[str]]]:
  """The import side of `rules` over `sd`: ({jaxformer path: array}, the HF keys read, {jaxformer
  path: the HF keys it lacks}). Floating tensors are converted in float32; per-layer rules are
  stacked over their groups (a path with a missing layer is only reported as missing)."""
  used, missing, stacks, arrays = set(), {}, {}, {}
  for r in rules:
    if r.to_ours is None:
      used.update(k for k in r.hf if k in sd)
      continue
    if not all(k in sd for k in r.hf):
      if r.default is None:
        for path in r.ours:
          missing.setdefault(path, []).extend(k for k in r.hf if k not in sd)
        continue
      inputs = r.default()
    else:
      inputs = tuple(np.asarray(sd[k]) for k in r.hf)
      used.update(r.hf)
    outs = r.to_ours(*[a.astype(np.float32) if a.dtype.kind == 'f' else a for a in inputs])
    for path, x in zip(r.ours, outs):
      if r.group is None:
        arrays[path] = x
      else:
        stacks.setdefault(path, {})[r.group] = x
  for path, slices in stacks.items():
    if path in missing:
      continue
    if sorted(slices) != list(range(len(slices))):
      raise AssertionError(f'{path}: layer groups {sorted(slices)} are not contiguous')
    arrays[path] = np.stack([slices[g] for g in range(len(slices))])
  return arrays, used, missing


def unused_keys(sd: Mapping[str, np.ndarray], used: set[str], ignore) -> list[str]:
  """HF keys no rule read, apart from the family's known buffers (`ignore` patterns)."""
  return sorted(k for k in set(sd) - used if not any(re.search(p, k) for p in ignore))


def _load(cfg: ModelConfig, rules, sd: dict[str, np.ndarray], ignore, layout=None
          ) -> nnx.Module:
  model = _model_shell(cfg, layout=layout)
  arrays, used, missing = convert(rules, sd)
  if missing:
    keys = sorted({k for ks in missing.values() for k in ks})
    raise ValueError(f'{len(keys)} Hugging Face tensor(s) needed by the converted config are '
                     f'missing: {keys[:12]}')
  filled = {_set(model, path, x, cfg.params_dtype, layout) for path, x in arrays.items()}
  unused = unused_keys(sd, used, ignore)
  if unused:
    raise ValueError(f'{len(unused)} Hugging Face tensor(s) have no jaxformer counterpart (an '
                     f'unsupported head or feature?): {unused[:12]}')
  unset = ['.'.join(map(str, path)) for path, v in nnx.iter_graph(model)
           if isinstance(v, nnx.Param) and id(v) not in filled]
  if unset:
    raise AssertionError(f'converter left jaxformer parameters unset: {unset[:12]}')
  return model


def _set(model, path: str, x: np.ndarray, dtype, layout=None) -> int:
  p = _resolve(model, path)
  shape = tuple(p.get_value().shape)
  if tuple(x.shape) != shape:
    raise ValueError(f'{path}: converted Hugging Face tensor has shape {tuple(x.shape)}, the '
                     f'jaxformer parameter {shape}')
  if layout is None:
    p.set_value(jnp.asarray(x, dtype))
  else:
    p.set_value(jax.device_put(np.asarray(x).astype(dtype), layout.variable_sharding(p, path)))
  return id(p)


# =========================================================================== export
def hf_model_type(cfg: ModelConfig) -> str:
  """The HF model_type a decoder config exports to (learned positions: GPT-2; RoPE: LLaMA,
  Mistral with a window, Mixtral with experts; the 'mamba' family: Mamba)."""
  if cfg.family == 'mamba':
    return 'mamba'
  if cfg.family != 'decoder':
    raise ConfigError(f'model.family={cfg.family!r} cannot be exported: to_hf_state_dict '
                      "supports the 'decoder' family (GPT-2, LLaMA, Mistral, Mixtral) and "
                      "'mamba'")
  kind = cfg.position.kind
  if kind == 'learned':
    return 'gpt2'
  if kind == 'rope':
    if cfg.moe.num_experts:
      return 'mixtral'
    return 'mistral' if cfg.attention.window else 'llama'
  raise ConfigError(f"model.position.kind={kind!r} cannot be exported: Hugging Face GPT-2 uses "
                    "'learned' and LLaMA / Mistral / Mixtral use 'rope'")


def to_hf_config(cfg: ModelConfig):
  """The transformers config (GPT2Config, LlamaConfig, MistralConfig, MixtralConfig,
  MambaConfig) of a decoder; raises ConfigError naming the first field HF cannot express."""
  kind = hf_model_type(cfg)
  if kind == 'gpt2':
    return hf_decoders.gpt2_hf_config(cfg)
  if kind == 'mamba':
    return hf_mamba.mamba_hf_config(cfg)
  return hf_decoders.llama_hf_config(cfg)


def to_hf_state_dict(model: nnx.Module, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """HF *ForCausalLM state dict (numpy, param dtype) of a decoder; tied heads are written under
  both names, as `PreTrainedModel.state_dict()` has them, so `load_state_dict(strict=True)`
  accepts it."""
  to_hf_config(cfg)  # validates that HF can express the config
  rules = _FAMILIES[hf_model_type(cfg)].rules(cfg)
  out = {}
  for r in rules:
    ours = []
    for path in r.ours:
      x = np.asarray(_resolve(model, path).get_value())
      ours.append(x if r.group is None else x[r.group])
    for k, x in zip(r.hf, r.to_hf(*ours)):
      out[k] = np.array(x, order='C')  # a writable copy (torch.from_numpy wants one)
  return out


def save_hf_safetensors(model: nnx.Module, cfg: ModelConfig, path) -> str:
  """Writes `to_hf_state_dict` as safetensors. A path ending in .safetensors is written as that
  file; any other path is a directory that receives model.safetensors and config.json, loadable
  with `AutoModelForCausalLM.from_pretrained(path)`. Returns the safetensors file path."""
  from safetensors.numpy import save_file

  path = os.fspath(path)
  sd = to_hf_state_dict(model, cfg)
  if path.endswith('.safetensors'):
    file = path
  else:
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, 'model.safetensors')
    to_hf_config(cfg).save_pretrained(path)
  save_file(sd, file, metadata={'format': 'pt'})
  return file


__all__ = ['Checkpoint', 'convert', 'electra_from_hf', 'from_hf', 'hf_model_type',
           'read_checkpoint', 'read_safetensors', 'save_hf_safetensors', 'supported_model_types',
           'to_hf_config', 'to_hf_state_dict', 'unused_keys']
