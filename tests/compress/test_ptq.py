"""Post-training quantization of a run and quantization-aware training through the trainer
(CATALOG H): the quantized run folder holds int8 / packed int4 codes, loads through
Trainer(mode='eval') as exactly the dequantized weights, keeps held-out bits per byte within the
acceptance bounds on a tiny trained run, samples, and refuses training; a QAT run trains, and
its PTQ with the same scheme is its forward pass."""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from jaxformer.compress import ptq, quant
from jaxformer.compress.config import QatConfig, QuantScheme
from jaxformer.config import ConfigError
from jaxformer.finetune import export, lora
from jaxformer.finetune.config import FinetuneConfig
from jaxformer.models import family_dict
from jaxformer.parallel import state as state_lib
from jaxformer.train import checkpoint as ckpt_lib
from jaxformer.train.experiment import Experiment, default_config
from jaxformer.train.param_plan import ParamPlan
from jaxformer.train.recipes import stdlib_bytes
from jaxformer.train.trainer import Trainer

D, L, F, V = 32, 2, 64, 260


def config(steps, **compress):
  model = family_dict('llama', vocab_size=V, max_length=32, d_model=D, num_layers=L,
                      attention=dict(num_heads=2, num_kv_heads=1), ffn=dict(hidden_dim=F),
                      tie_embeddings=True)
  train = dict(batch_size=4, steps=steps, log_every=steps, eval_every=1000, eval_batches=1,
               checkpoint_every=1000, test_batches=0, sample_tokens=0, progress=False,
               async_checkpoint=False, tensorboard=False)
  optim = dict(optimizer='adamw', lr=1e-2, weight_decay=0.1, schedule='constant')
  return default_config(model=model, data=stdlib_bytes('lm', seq_len=32), optim=optim,
                        train=train, compress=compress)


def open_run(workdir, cfg=None):
  cfg = cfg if cfg is not None else json.loads((pathlib.Path(workdir) / 'config.json').read_text())
  return Trainer(cfg, str(workdir), mode='eval', devices=jax.devices()[:1])


def flat(tree):
  return {lora.path_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('ptq') / 'run'
  Trainer(config(30), str(workdir), devices=jax.devices()[:1]).run()
  return workdir


@pytest.mark.parametrize('scheme, bound', [
    pytest.param(QuantScheme(bits=8, granularity='channel'), 0.02, marks=pytest.mark.slow),
    (QuantScheme(bits=4, granularity='group', group_size=16), 0.1)],
    ids=['int8-channel', 'int4-group'])
def test_ptq_run_folder_loads_the_dequantized_weights(trained, tmp_path, scheme, bound):
  source = open_run(trained)
  before = source.evaluate('validation', 2)['bits_per_byte']
  out = tmp_path / 'q'
  record = ptq.quantize_run(source, str(out), scheme)
  float_tree = source.model_params()
  float_params = flat(float_tree)
  source.close()
  assert json.loads((out / ptq.RECORD).read_text()) == record
  # Real integer storage in the checkpoint: int8 codes, int4 codes two to a byte.
  ckpt = ckpt_lib.Checkpointer(str(out), async_save=False, read_only=True)
  saved = ckpt_lib.flatten(ckpt._manager.restore(ckpt.latest_step())['state'])  # pylint: disable=protected-access
  ckpt.close()
  codes = {k: v for k, v in saved.items() if k.endswith('codes')}
  assert len(codes) == 7 and all(v.dtype == (np.int8 if scheme.bits == 8 else np.uint8)
                                 for v in codes.values())
  assert not any('opt_state' in k for k in saved)
  size = record['size']
  assert size['quantized_model_bytes'] == sum(
      v.nbytes for k, v in saved.items() if k.startswith('params'))
  assert size['float_model_bytes'] == 4 * sum(v.size for v in float_params.values())
  # The folder loads through the eval path as exactly dequant(quant(w)).
  q = open_run(out)
  loaded = flat(q.model_params())
  chosen = quant.targets(q.program.plan.templates, scheme, '--')
  assert sorted(chosen) == record['quantized']
  expected = flat(jax.jit(lambda p: quant.fake_quant_params(p, chosen, scheme))(float_tree))
  for k, w in float_params.items():
    # dequant(quant(w)) of the matrices; norms and the (tied) embedding table stay float
    np.testing.assert_array_equal(loaded[k], expected[k] if k in chosen else w, err_msg=k)
    assert (k in chosen) != np.array_equal(loaded[k], w)
  after = q.evaluate('validation', 2)['bits_per_byte']
  assert abs(after - before) < bound, (before, after)
  q.close()
  with pytest.raises(ConfigError, match='post-training-quantized model'):
    Trainer(json.loads((out / 'config.json').read_text()), str(out), devices=jax.devices()[:1])


def test_w8a8_run_folder_quantizes_activations(trained, tmp_path):
  """--activations: static int8 ranges for every matrix input of every layer, calibrated on
  the training split, stored with the int8 weights; the folder evaluates within the int8
  bound of the float run but not equal to the weight-only folder (the activations really are
  quantized), samples, and its config refuses training."""
  source = open_run(trained)
  before = source.evaluate('validation', 2)['bits_per_byte']
  scheme = QuantScheme(bits=8, granularity='channel')
  ptq.quantize_run(source, str(tmp_path / 'w8'), scheme)
  record = ptq.quantize_run(source, str(tmp_path / 'w8a8'), scheme,
                            ptq.ActScheme(calibration='percentile', percentile=99.9, batches=2))
  source.close()
  acts = record['activations']
  assert (acts['split'], acts['batches'], acts['calibration']) == ('train', 2, 'percentile')
  # The LM head's input, and per layer q k v o and the gated FFN's three matrices.
  assert acts['sites'] == 8 and len(acts['ranges']) == 8
  for k, r in acts['ranges'].items():
    r = np.asarray(r)
    assert r.shape == ((2,) if k == 'head.input_act' else (L, 2)), k
    assert np.all(r[..., 0] < 0) and np.all(r[..., 1] > 0) and np.allclose(r[..., 0], -r[..., 1])
  cfg = json.loads((tmp_path / 'w8a8' / 'config.json').read_text())
  assert cfg['model']['act_quant'] == {'bits': 8, 'symmetric': True}
  w8, w8a8 = open_run(tmp_path / 'w8'), open_run(tmp_path / 'w8a8')
  loaded = flat(w8a8.model_params())
  for k, r in acts['ranges'].items():  # the stored ranges are the calibrated ones
    np.testing.assert_allclose(loaded[k], r, atol=1e-5, err_msg=k)
  weights = flat(w8.model_params())
  for k, w in weights.items():  # and the weights those of the weight-only folder
    np.testing.assert_array_equal(loaded[k], w, err_msg=k)
  weight_only = w8.evaluate('validation', 2)['bits_per_byte']
  after = w8a8.evaluate('validation', 2)['bits_per_byte']
  assert after != weight_only and abs(after - before) < 0.02, (before, weight_only, after)
  assert isinstance(w8a8.sample('def ', 4), str)
  for fmt in ('hf', 'jaxformer'):  # the ranges have no place in either
    with pytest.raises(ConfigError, match='quantizes activations'):
      export.export(w8a8, str(tmp_path / fmt), fmt)
  w8.close()
  w8a8.close()
  with pytest.raises(ConfigError, match='model.act_quant.bits=8 is invalid for training'):
    Trainer(cfg, str(tmp_path / 'fresh'), devices=jax.devices()[:1])


@pytest.mark.parametrize('acts, match', [
    (ptq.ActScheme(calibration='mean'), '--act_calibration'),
    (ptq.ActScheme(calibration='percentile', percentile=0.0), '--act_percentile'),
    (ptq.ActScheme(batches=0), '--calibration_batches')])
def test_bad_activation_options_name_the_flag(acts, match):
  with pytest.raises(ConfigError, match=match):
    acts.validate()

def test_qat_model_params_are_fake_quantized_with_the_ste():
  """ParamPlan.model_params under compress.qat: the matrices are dequant(quant(w)), the rest
  as they are, and the gradient of a loss of the model's parameters is its gradient at them."""
  exp = Experiment.from_config(config(1))
  params = nnx.state(state_lib._build(exp.model, 0), nnx.Param)  # pylint: disable=protected-access
  qat = QatConfig(bits=8, granularity='tensor', symmetric=False)
  plan = ParamPlan(FinetuneConfig(), params, qat=qat)
  chosen = plan.qat_targets
  assert len(chosen) == 7
  def loss(p):
    return sum(jax.numpy.sum(jax.numpy.sin(v.get_value())) for _, v in nnx.to_flat_state(p))

  @jax.jit
  def run(p):  # one program: the model's parameters, the oracle, both gradients
    seen = plan.model_params(p, None)
    expected = {k: quant.dequantize(quant.quantize(p_k, chosen[k], qat.scheme()), p_k.shape,
                                    p_k.dtype)
                for k, p_k in ((k, v.get_value()) for k, v in lora.flat_params(p).items())
                if k in chosen}
    return (seen, expected, jax.grad(lambda q: loss(plan.model_params(q, None)))(p),
            jax.grad(loss)(seen))

  seen, expected, g, g_at = run(params)
  raw, got = flat(params), flat(seen)
  for k, w in raw.items():
    np.testing.assert_array_equal(got[k], np.asarray(expected.get(k, w)), err_msg=k)
    assert (k in chosen) != np.array_equal(got[k], w)
  g, g_at = flat(g), flat(g_at)
  for k in raw:
    np.testing.assert_array_equal(g[k], g_at[k], err_msg=k)


@pytest.mark.slow
def test_qat_trains_and_its_ptq_is_its_forward_pass(tmp_path):
  qat = dict(bits=4, granularity='group', group_size=16, symmetric=False)
  cfg = config(6, qat=qat)
  trainer = Trainer(cfg, str(tmp_path / 'run'), devices=jax.devices()[:1])
  first = trainer.evaluate('validation', 1)['loss']
  raw = flat(trainer.program.plan.view_params(trainer.state['params'], fake_quant=False))
  seen = flat(trainer.model_params())
  chosen = trainer.program.plan.qat_targets
  assert len(chosen) == 7  # the matrices; the tied embedding table and norms stay float
  for k, w in raw.items():  # the model sees dequant(quant(w)) of the matrices
    if k in chosen:
      s = QatConfig(**qat).scheme()
      np.testing.assert_array_equal(
          seen[k], np.asarray(quant.dequantize(quant.quantize(w, chosen[k], s), w.shape,
                                               w.dtype)))
      assert not np.array_equal(seen[k], w)
    else:
      np.testing.assert_array_equal(seen[k], w)
  trainer.run()
  qat_run = open_run(tmp_path / 'run', cfg)
  last = qat_run.evaluate('validation', 1)['loss']
  assert last < first
  out = tmp_path / 'q'
  ptq.quantize_run(qat_run, str(out), QatConfig(**qat).scheme())
  qat_params = flat(qat_run.model_params())
  qat_run.close()
  q = open_run(out)
  for k, v in flat(q.model_params()).items():
    np.testing.assert_array_equal(v, qat_params[k], err_msg=k)
  assert q.evaluate('validation', 1)['loss'] == last
  q.close()


@pytest.mark.parametrize('qat, match', [
    (dict(bits=3), r'compress\.qat\.bits=3 is invalid: allowed values are \[4, 8\]'),
    (dict(bits=8, granularity='block'), r"compress\.qat\.granularity='block' is invalid"),
    (dict(bits=8, calibration='percentile', percentile=0.0),
     r'compress\.qat\.percentile=0\.0 is invalid'),
])
def test_bad_qat_options_name_the_field(qat, match):
  with pytest.raises(ConfigError, match=match):
    Experiment.from_config(config(1, qat=qat))


def test_qat_group_must_divide_the_inputs():
  exp = Experiment.from_config(config(1))
  abstract = nnx.state(state_lib.abstract_model(exp.model, 0), nnx.Param)
  with pytest.raises(ConfigError, match=r"compress\.qat\.group_size=24 is invalid: it must "
                     r"divide the input size 32 of .*largest divisor of 32 up to 24 is 16"):
    ParamPlan(FinetuneConfig(), abstract, qat=QatConfig(bits=4, granularity='group',
                                                        group_size=24))


@pytest.mark.slow
def test_ptq_folder_restores_onto_a_mesh(trained, tmp_path):
  """The codes and scales are read into their shardings on 4 devices (FSDP) and
  dequantize to the one-device weights; the evaluation agrees."""
  source = open_run(trained)
  out = tmp_path / 'q'
  ptq.quantize_run(source, str(out), QuantScheme(bits=4, granularity='group', group_size=16))
  source.close()
  one = open_run(out)
  cfg = json.loads((out / 'config.json').read_text())
  cfg['parallel']['mesh'] = {'fsdp': 4}  # the tiny model's one KV head rules out 'tensor'
  mesh = Trainer(cfg, str(out), mode='eval', devices=jax.devices()[:4])
  wo = mesh.model_params()['stack']['layers']['blocks'][0]['ffn']['wo'].get_value()
  assert any(a is not None for a in wo.sharding.spec), wo.sharding.spec
  for k, v in flat(mesh.model_params()).items():
    np.testing.assert_array_equal(v, flat(one.model_params())[k], err_msg=k)
  np.testing.assert_allclose(mesh.evaluate('validation', 1)['loss'],
                             one.evaluate('validation', 1)['loss'], rtol=1e-5)
  one.close()
  mesh.close()


@pytest.mark.slow
def test_w8a8_calibrates_alike_on_a_mesh(trained, tmp_path):
  """Activation ranges calibrated on 4 devices (FSDP) equal the one-device ones, and the
  folders evaluate alike."""
  scheme, acts = QuantScheme(bits=8), ptq.ActScheme(batches=2)
  one = open_run(trained)
  r1 = ptq.quantize_run(one, str(tmp_path / 'one'), scheme, acts)
  one.close()
  cfg = json.loads((pathlib.Path(trained) / 'config.json').read_text())
  cfg['parallel']['mesh'] = {'fsdp': 4}
  mesh = Trainer(cfg, str(trained), mode='eval', devices=jax.devices()[:4])
  r4 = ptq.quantize_run(mesh, str(tmp_path / 'mesh'), scheme, acts)
  mesh.close()
  assert r1['activations']['ranges'].keys() == r4['activations']['ranges'].keys()
  for k, r in r1['activations']['ranges'].items():
    np.testing.assert_allclose(r4['activations']['ranges'][k], r, rtol=1e-4, err_msg=k)
  cfg = json.loads((tmp_path / 'mesh' / 'config.json').read_text())
  cfg['parallel']['mesh'] = {'fsdp': 4}
  q4 = Trainer(cfg, str(tmp_path / 'mesh'), mode='eval', devices=jax.devices()[:4])
  q1 = open_run(tmp_path / 'one')
  np.testing.assert_allclose(q4.evaluate('validation', 1)['loss'],
                             q1.evaluate('validation', 1)['loss'], rtol=1e-5)
  q4.close()
  q1.close()


@pytest.mark.slow
def test_ptq_experiment_runs_the_commands(trained, tmp_path, monkeypatch):
  """experiments/ptq_quickstart.py end to end (python -m jaxformer.compress quantize and
  python -m jaxformer.eval in subprocesses, on one CPU device as the run trained) on the tiny
  run."""
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  import csv  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / 'experiments'))
  import ptq_quickstart  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'ptq.csv'
  assert ptq_quickstart.main([f'--workdir={trained}', f'--out={out}', '--split=validation',
                              '--batches=1', '--schemes=int8-channel,int4-channel']) == 0
  with open(out) as f:
    rows = {r['scheme']: r for r in csv.DictReader(f)}
  assert set(rows) == {'float32', 'int8-channel', 'int4-channel'}
  assert int(rows['int4-channel']['quantized_model_bytes']) < int(
      rows['int8-channel']['quantized_model_bytes']) < int(rows['float32']['float_model_bytes'])
