"""Funnel-Transformer (CATALOG D8, E8; jaxformer.models.funnel): pooling and up-sampling by
formula, the attention scores by their O(T S) definition, Hugging Face parity (FunnelModel,
FunnelBaseModel and the task heads, fp32, 1e-4), config refusals, and (slow) a learning oracle."""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx
from transformers.models.funnel import modeling_funnel as hf_funnel

from jaxformer.config import ConfigError
from jaxformer.interop.hf import from_hf
from jaxformer.models import build_model, family, family_dict
from jaxformer.models import funnel as F
from jaxformer.train.experiment import Experiment, default_config, load_config
from jaxformer.train.trainer import Trainer

ATOL = 1e-4
FLAGS = list(itertools.product([True, False], [True, False]))  # (separate_cls, truncate_seq)


def windows(length, separate_cls, truncate):
  """The pooling windows (lists of positions) as the paper / HF define them."""
  if not separate_cls:
    return [list(range(i, min(i + 2, length))) for i in range(0, length, 2)]
  end = length - 1 if truncate else length
  return [[0]] + [list(range(i, min(i + 2, end))) for i in range(1, end, 2)]


@pytest.mark.parametrize('separate_cls, truncate', FLAGS)
@pytest.mark.parametrize('length', [7, 8])
def test_pooling_by_formula(separate_cls, truncate, length):
  rng = np.random.default_rng(length)
  x = rng.normal(size=(2, length, 3)).astype(np.float32)
  types = rng.integers(0, 3, (2, length))
  valid = rng.random((2, length)) > 0.3
  kw = dict(separate_cls=separate_cls, truncate=truncate)
  win = windows(length, separate_cls, truncate)
  np.testing.assert_allclose(F.mean_pool(jnp.asarray(x), **kw),
                             np.stack([x[:, w].mean(1) for w in win], 1), atol=1e-6)
  np.testing.assert_array_equal(F.first_pool(jnp.asarray(types), **kw),
                                np.stack([types[:, w[0]] for w in win], 1))
  np.testing.assert_array_equal(F.all_pool(jnp.asarray(valid), **kw),
                                np.stack([valid[:, w].all(1) for w in win], 1))
  np.testing.assert_array_equal(F.pool_positions(np.arange(length), **kw), [w[0] for w in win])
  if separate_cls:  # [CLS] is never averaged with another position
    np.testing.assert_array_equal(F.mean_pool(jnp.asarray(x), **kw)[:, 0], x[:, 0])


@pytest.mark.parametrize('separate_cls, truncate', FLAGS)
@pytest.mark.parametrize('length, stride', [(11, 4), (9, 2)])
def test_upsampling_repeats_pooled_rows_as_hf_does(separate_cls, truncate, length, stride):
  kw = dict(separate_cls=separate_cls, truncate=truncate)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, length, 5)), jnp.float32)
  g = x
  for _ in range(int(np.log2(stride))):
    g = F.mean_pool(g, **kw)
  up = F.upsample(g, stride, length, separate_cls=separate_cls)
  assert up.shape == (2, length, 5)
  ref = hf_funnel.upsample(torch.from_numpy(np.array(g)), stride, length,
                           separate_cls=separate_cls, truncate_seq=truncate)
  np.testing.assert_allclose(up, ref.numpy(), atol=0)
  # Row t repeats the pooled row whose windows contain t (the inverse of pooling): constant
  # windows come back unchanged wherever pooling kept the position.
  owner, rows = np.arange(length), length
  for _ in range(int(np.log2(stride))):
    win = windows(rows, separate_cls, truncate)
    rows, where = len(win), {p: k for k, w in enumerate(win) for p in w}
    owner = np.array([where.get(o, -1) if o >= 0 else -1 for o in owner])
  np.testing.assert_array_equal(owner, np.where(owner >= 0, F.upsample_index(
      stride, length, g.shape[1], separate_cls=separate_cls), -1))


def tiny(**kw):
  base = dict(vocab_size=40, d_model=16, num_layers=2, num_decoder_layers=1, max_length=32,
              attention=dict(num_heads=2), ffn=dict(hidden_dim=32), funnel=dict(block_sizes=(1, 1)))
  base.update(kw)
  return family('funnel', **base)


def test_attention_scores_equal_their_definition():
  """A_ij by the module docstring, pair by pair (a sinusoid per distance), pooled queries over
  unpooled keys with [CLS] and token types."""
  cfg = tiny()
  attn = F.FunnelAttention(cfg, rngs=nnx.Rngs(0))
  for i, p in enumerate(('r_w_bias', 'r_r_bias', 'r_s_bias', 'seg_embed', 'bk')):
    getattr(attn, p).set_value(jax.random.normal(jax.random.key(i), getattr(attn, p).shape))
  rng = np.random.default_rng(0)
  kv = rng.normal(size=(2, 9, 16)).astype(np.float32)
  x = np.asarray(F.mean_pool(jnp.asarray(kv), separate_cls=True, truncate=True))
  k = F.Side(np.arange(9), jnp.asarray(rng.integers(0, 3, (2, 9))), jnp.ones((2, 9), bool))
  q = k.pool(True, True)
  got = np.asarray(attn.logits(jnp.asarray(x), jnp.asarray(kv), q, k))
  p = {n: np.asarray(getattr(attn, n)[...]) for n in ('wq', 'wk', 'bk', 'r_kernel', 'r_w_bias',
                                                        'r_r_bias', 'r_s_bias', 'seg_embed')}
  qh = np.einsum('btd,dnh->btnh', x, p['wq'])
  kh = np.einsum('bsd,dnh->bsnh', kv, p['wk']) + p['bk']
  want = np.zeros(got.shape, np.float32)
  qt, kt = np.asarray(q.types), np.asarray(k.types)
  for b, n, i, j in itertools.product(*map(range, got.shape)):
    a = (qh[b, i, n] + p['r_w_bias'][n]) @ kh[b, j, n]
    if i and j:
      angle = (q.positions[i] - k.positions[j]) * 10000.0 ** (-np.arange(8) / 8)
      r = np.concatenate([np.sin(angle), np.cos(angle)])
      a += (qh[b, i, n] + p['r_r_bias'][n]) @ (r @ p['r_kernel'][:, n])
      same = qt[b, i] == kt[b, j] or 2 in (qt[b, i], kt[b, j])
      a += (qh[b, i, n] + p['r_s_bias'][n]) @ p['seg_embed'][int(same), n]
    want[b, n, i, j] = a / np.sqrt(8)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ Hugging Face parity
HF = dict(vocab_size=50, d_model=32, n_head=4, d_head=8, d_inner=48, block_sizes=[1, 1, 1],
          num_decoder_layers=1, hidden_dropout=0.0, attention_dropout=0.0,
          activation_dropout=0.0)


def hf_parity(model_cls, t=11, **kw):
  """Max abs difference of a converted random HF model on a batch with padding and token types
  (type 2 = [CLS] at position 0), over the outputs that do not read padding-only windows."""
  torch.manual_seed(0)
  model = model_cls(T.FunnelConfig(**{**HF, **kw}))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.eval()
  rng = np.random.default_rng(0)
  tokens = torch.from_numpy(rng.integers(0, HF['vocab_size'], (2, t)))
  types = torch.from_numpy(rng.integers(0, 2, (2, t)))
  types[:, 0] = 2
  mask = torch.ones(2, t, dtype=torch.long)
  mask[1, t - 3:] = 0
  with torch.no_grad():
    ref = model(tokens, attention_mask=mask, token_type_ids=types)[0].numpy()
  cfg, ours = from_hf(model)
  out = np.asarray(jax.jit(lambda a, b, c: ours(a, segment_ids=b, token_types=c).logits)(
      *(jnp.asarray(v.numpy()) for v in (tokens, mask, types))))
  assert out.shape == ref.shape, (out.shape, ref.shape)
  if out.ndim == 3 and out.shape[1] == t:
    keep = mask.numpy().astype(bool)  # token outputs: the non-padding positions
  elif out.ndim == 3:
    keep = (slice(None), 0)           # pooled outputs: the [CLS] states
  else:
    keep = slice(None)                # class logits
  return cfg, float(np.max(np.abs(out[keep] - ref[keep])))


def test_hf_parity_funnel_model_with_decoder():
  cfg, err = hf_parity(T.FunnelModel)
  assert cfg.num_decoder_layers == 1 and cfg.funnel.block_sizes == (1, 1, 1)
  assert err <= ATOL, err


@pytest.mark.slow
@pytest.mark.parametrize('model_cls, kw', [
    (T.FunnelBaseModel, {}),
    (T.FunnelModel, dict(pool_q_only=False)),
    (T.FunnelModel, dict(separate_cls=False)),
    (T.FunnelModel, dict(truncate_seq=False, t=12)),
    (T.FunnelModel, dict(t=16, block_sizes=[2, 1], num_decoder_layers=2, hidden_act='gelu')),
    (T.FunnelModel, dict(block_sizes=[1, 2], block_repeats=[1, 2], t=9)),
    (T.FunnelForMaskedLM, dict(t=13)),
    (T.FunnelForMaskedLM, dict(tie_word_embeddings=False)),
    (T.FunnelForSequenceClassification, dict(num_labels=3)),
], ids=lambda v: getattr(v, '__name__', None) or ','.join(f'{k}={x}' for k, x in v.items()))
def test_hf_parity_variants(model_cls, kw):
  _, err = hf_parity(model_cls, **kw)
  assert err <= ATOL, err


@pytest.mark.parametrize('kw, field', [
    (dict(attention_type='factorized'), 'hf.attention_type'),
    (dict(block_repeats=[2, 1, 1]), 'hf.block_repeats')])
def test_hf_settings_jaxformer_cannot_express_are_refused(kw, field):
  model = T.FunnelModel(T.FunnelConfig(**{**HF, **kw}))
  with pytest.raises(ConfigError, match=field):
    from_hf(model)


# ------------------------------------------------------------------------ config
@pytest.mark.parametrize('over, field', [
    (dict(num_layers=3), 'model.num_layers'),
    (dict(num_decoder_layers=0, mlm_head=True), 'model.num_decoder_layers'),
    (dict(num_labels=3), 'model.num_decoder_layers'),
    (dict(position=dict(kind='rope')), 'model.position.kind'),
    (dict(scan_layers=True), 'model.scan_layers'),
    (dict(attention=dict(num_heads=2, kind='performer')), 'model.attention.kind'),
    (dict(attention=dict(num_heads=2, impl='pallas')), 'model.attention.impl'),
    (dict(attention=dict(num_heads=2, num_kv_heads=1)), 'model.attention.num_kv_heads'),
    (dict(funnel=dict(block_sizes=(1, 1), block_repeats=(1,))), 'model.funnel.block_repeats'),
])
def test_what_funnel_cannot_do_is_refused_at_config_time(over, field):
  with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
    tiny(**over)


def test_packed_data_is_refused():
  config = load_config(os.path.join(os.path.dirname(__file__), '..', '..', 'configs',
                                    'funnel.py'), 'size=tiny')
  config.data.packing = 'concat'
  with pytest.raises(ConfigError, match="data.packing='concat'.*mean pooling"):
    Experiment.from_config(config)


def test_mlm_and_classification_shapes_and_layer_metadata():
  mlm = build_model(tiny(mlm_head=True, head_bias=True))
  assert nnx.eval_shape(lambda: mlm(jnp.ones((2, 13), jnp.int32))).logits.shape == (2, 13, 40)
  cls = build_model(tiny(num_decoder_layers=0, num_labels=3))
  assert nnx.eval_shape(lambda: cls(jnp.ones((2, 13), jnp.int32))).logits.shape == (2, 3)
  layers = {v.get_metadata().get('layer') for _, v in nnx.to_flat_state(nnx.state(mlm, nnx.Param))
            if v.get_metadata().get('layer') is not None}
  assert layers == {0, 1, 2}  # two encoder blocks, then the decoder layer


# ------------------------------------------------------------------------ learning (slow)
def best_constant_accuracy(data_cfg, split):
  """Accuracy of always predicting the most frequent byte of the split's rows (one document per
  row, its first seq_len bytes): the best a model that ignores context does on masked bytes."""
  from jaxformer.data import sources  # pylint: disable=import-outside-toplevel
  from jaxformer.data.config import DataConfig  # pylint: disable=import-outside-toplevel
  cfg = DataConfig.from_dict(data_cfg)
  src, _ = sources.load(cfg, split)
  counts = np.zeros(256)
  for i in range(len(src)):
    counts += np.bincount(np.frombuffer(src[i]['text'][:cfg.seq_len], np.uint8), minlength=256)
  return float(counts.max() / counts.sum())


@pytest.mark.slow
def test_funnel_learns_masked_bytes(tmp_path):
  """CATALOG E8: a 3-block Funnel (B1-1-1 over 64 bytes, pooled to 32 and 16, one decoder layer
  over the up-sampled states) trained on MLM reaches a held-out masked-byte accuracy far above
  the best context-free predictor (measured once: see docs/results.md, "Funnel")."""
  data = dict(name='python_stdlib', task='mlm', tokenizer='byte', extra_ids=0, seq_len=64,
              mlm_probability=0.15, packing='none')
  model = family_dict('funnel', vocab_size=260, d_model=64, num_layers=3, num_decoder_layers=1,
                      max_length=64, attention=dict(num_heads=4), ffn=dict(hidden_dim=256),
                      funnel=dict(block_sizes=(1, 1, 1)), mlm_head=True, head_bias=True)
  optim = dict(optimizer='adamw', lr=3e-3, weight_decay=0.01, schedule='warmup_linear',
               warmup_steps=20, grad_clip_norm=1.0)
  train = dict(batch_size=32, steps=STEPS, log_every=50, eval_every=STEPS, eval_batches=-1,
               checkpoint_every=STEPS, test_batches=0, progress=False, async_checkpoint=False)
  result = Trainer(default_config(model=model, data=data, optim=optim, train=train),
                   str(tmp_path)).run()
  baseline = best_constant_accuracy(data, 'validation')
  print(f'funnel masked-byte accuracy {result["eval"]["accuracy"]:.4f}, '
        f'best constant {baseline:.4f}')
  assert 0.1 < baseline < 0.3, baseline  # Python source: spaces are about a fifth of the bytes
  assert result['eval']['accuracy'] > baseline + 0.15, (baseline, result['eval'])


STEPS = 400
