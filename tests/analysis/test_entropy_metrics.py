"""train.entropy_metrics: the mean attention entropy per layer as a training metric."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from analysis_models import tiny, tokens
from jaxformer.analysis import maps
from jaxformer.config import ConfigError
from jaxformer.train import tasks
from jaxformer.train.experiment import Experiment, default_config


def test_entropy_metric_equals_hand_computation():
  model = tiny()
  x = tokens()
  seg = jnp.array([[1] * 6, [1] * 4 + [0] * 2])  # padding queries are left out
  batch = {'inputs': x, 'targets': x, 'segment_ids': seg}

  @nnx.jit
  def run(m):
    on = tasks.compute_loss(m, 'lm', batch, m.cfg, tasks.LossConfig(entropy_metrics=True),
                            deterministic=True)
    off = tasks.compute_loss(m, 'lm', batch, m.cfg, tasks.LossConfig(), deterministic=True)
    return on, off, maps.attention_maps(m, lambda m: m(x, segment_ids=seg))

  (loss, metrics), (off_loss, off), sites = run(model)
  assert not any(k.startswith('attention_entropy') for k in off)
  np.testing.assert_allclose(loss, off_loss, rtol=1e-6)
  w = np.asarray(sites['stack/self_attn'].weights, np.float64)
  for layer in range(2):
    rows = []
    for b in range(2):
      for n in range(2):
        for t in range(6 if b == 0 else 4):
          p = w[layer, b, n, t]
          p = p[p > 0]
          rows.append(-np.sum(p * np.log(p)))
    assert metrics[f'attention_entropy/stack/self_attn/{layer}'] == pytest.approx(
        np.mean(rows), rel=1e-5)
  assert 0 < np.mean(rows) < np.log(6)


@pytest.mark.parametrize('model, words', [
    (dict(attention={'kind': 'performer'}), 'never formed'),
    (dict(reversible=True), 'reversible'),
])
def test_entropy_metrics_refused_without_weights(model, words):
  base = dict(family='decoder', d_model=16, num_layers=1, vocab_size=32, max_length=8,
              attention={'num_heads': 2})
  base.update({k: v if k != 'attention' else {**base['attention'], **v} for k, v in
               model.items()})
  c = default_config(model=base, data={'task': 'lm', 'seq_len': 8},
                     train=dict(entropy_metrics=True))
  with pytest.raises(ConfigError, match=f'train.entropy_metrics.*{words}'):
    Experiment.from_config(c)


def test_activation_entropy_equals_hand_computation_on_the_ffn_inputs(monkeypatch):
  """The metric of each layer is the mean over tokens of the entropy of |h| / sum |h|, h the
  hidden activation that enters the FFN's output matrix (captured by spying on the unrolled
  stack); the scanned stack gives the same metrics, and the loss is unchanged."""
  from jaxformer.layers.ffn import FeedForward  # pylint: disable=import-outside-toplevel
  x = tokens()
  seg = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
  batch = {'inputs': x, 'targets': x, 'segment_ids': seg}
  on_cfg = tasks.LossConfig(activation_entropy=True, entropy_metrics=True)
  unrolled = tiny(scan_layers=False)
  captured = []
  dense = FeedForward._dense

  def spy(self, h, w, b):
    if w == 'wo':
      captured.append(np.asarray(h, np.float64))
    return dense(self, h, w, b)

  monkeypatch.setattr(FeedForward, '_dense', spy)
  loss, metrics = tasks.compute_loss(unrolled, 'lm', batch, unrolled.cfg, on_cfg,
                                     deterministic=True)
  monkeypatch.setattr(FeedForward, '_dense', dense)
  assert len(captured) == 2  # one call per layer
  for layer, h in enumerate(captured):
    p = np.abs(h) / np.abs(h).sum(-1, keepdims=True)
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1)
    assert float(metrics[f'activation_entropy/stack/ffn/{layer}']) == pytest.approx(ent.mean(),
                                                                            rel=1e-5)
    assert 0 < ent.mean() < np.log(h.shape[-1])
  off_loss, off = tasks.compute_loss(unrolled, 'lm', batch, unrolled.cfg, tasks.LossConfig(),
                                     deterministic=True)
  assert not any(k.startswith('activation_entropy') for k in off)
  np.testing.assert_allclose(loss, off_loss, rtol=1e-6)
  scanned = tiny()
  _, got = nnx.jit(lambda m: tasks.compute_loss(m, 'lm', batch, m.cfg, on_cfg,
                                                deterministic=True))(scanned)
  assert {k for k in got if 'entropy' in k} == {k for k in metrics if 'entropy' in k}
  for k, v in metrics.items():
    if 'entropy' in k:
      assert float(got[k]) == pytest.approx(float(v), rel=1e-5), k


def test_activation_entropy_needs_dense_ffn_activations():
  base = dict(family='decoder', d_model=16, num_layers=1, vocab_size=32, max_length=8,
              attention={'num_heads': 2}, ffn={'chunk_size': 4})
  c = default_config(model=base, data={'task': 'lm', 'seq_len': 8},
                     train=dict(activation_entropy=True))
  with pytest.raises(ConfigError, match='train.activation_entropy.*chunk'):
    Experiment.from_config(c)
  mamba = tiny('mamba')  # no dense FFN at all
  x = tokens()
  with pytest.raises(ConfigError, match="'hidden'"):
    tasks.compute_loss(mamba, 'lm', {'inputs': x, 'targets': x}, mamba.cfg,
                       tasks.LossConfig(activation_entropy=True), deterministic=True)
