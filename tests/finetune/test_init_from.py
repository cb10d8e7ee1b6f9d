"""`finetune.init_from` (CATALOG K): tiny random HF models built locally and saved as safetensors
load through `load_initial_params` with HF's outputs (decoders, an encoder with a new or a
loaded classifier, a seq2seq model); a jaxformer run's parameters load exactly into a sharded
target; new task heads start with their fresh initialisation; and bad input fails early with
messages that name what to change."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxformer.config import ConfigError, ModelConfig
from jaxformer.finetune.init_from import load_initial_params, model_section
from jaxformer.finetune.make_hf import hf_model
from jaxformer.models import build_model
from jaxformer.parallel.state import abstract_model
from jaxformer.train import checkpoint as ckpt_lib
from jaxformer.train.workdir import to_plain

ATOL = 1e-4
TOKENS = np.random.default_rng(0).integers(4, 260, (2, 12))


def perturbed(model):
  """Norm scales and biases away from ones / zeros, so a missed tensor shows."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def save(model, path):
  model.save_pretrained(path)
  return str(path)


def load(source, cfg, layout=None):
  abstract = nnx.state(abstract_model(cfg), nnx.Param)
  params, fresh = load_initial_params(source, cfg, abstract, layout)
  model = build_model(cfg)
  nnx.update(model, params)
  return model, fresh


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# =========================================================================== HF sources
@pytest.mark.parametrize('family,form', [('gpt2', 'dir'), ('llama', 'file')])
def test_decoder_from_hf_gives_hf_logits(tmp_path, family, form):
  hf = perturbed(hf_model(family, seed=1))
  path = save(hf, tmp_path / family)
  source = path if form == 'dir' else f'{path}/model.safetensors'
  cfg = ModelConfig.from_dict(model_section(source))
  model, fresh = load(source, cfg)
  assert fresh == []
  with torch.no_grad():
    ref = hf(torch.from_numpy(TOKENS)).logits.numpy()
  assert max_err(model(jnp.asarray(TOKENS)).logits, ref) <= ATOL


def test_encoder_gets_a_new_classifier_and_keeps_hf_hidden_states(tmp_path):
  """An MLM checkpoint under a classification config: the MLM head is skipped, the pooler and
  classifier are new and equal a from-scratch (jitted, as the trainer's) initialisation, the
  encoder is HF's."""
  hf = perturbed(hf_model('bert', seed=2))
  path = save(hf, tmp_path / 'bert')
  cfg = ModelConfig.from_dict(model_section(path, mlm_head=False, pooler=True, num_labels=3))
  model, fresh = load(path, cfg)
  assert fresh == ['classifier.dense.b', 'classifier.dense.w', 'pooler.dense.b',
                   'pooler.dense.w']
  init = jax.jit(lambda: nnx.state(build_model(cfg).classifier, nnx.Param))()
  chex.assert_trees_all_equal(nnx.state(model.classifier, nnx.Param), init)
  with torch.no_grad():
    ref = hf.bert(torch.from_numpy(TOKENS)).last_hidden_state.numpy()
  out = model(jnp.asarray(TOKENS))
  assert out.logits.shape == (2, 3)
  assert max_err(out.hidden, ref) <= ATOL


def test_sequence_classifier_loads_its_head_or_replaces_it(tmp_path):
  hf = perturbed(hf_model('bert', seed=3, num_labels=4))
  path = save(hf, tmp_path / 'bert_cls')
  section = model_section(path)
  assert section['num_labels'] == 4
  model, fresh = load(path, ModelConfig.from_dict(section))
  assert fresh == []
  with torch.no_grad():
    ref = hf(torch.from_numpy(TOKENS)).logits.numpy()
  assert max_err(model(jnp.asarray(TOKENS)).logits, ref) <= ATOL
  # Another label set: a new classifier on the same body.
  model, fresh = load(path, ModelConfig.from_dict(dict(section, num_labels=2)))
  assert fresh == ['classifier.dense.b', 'classifier.dense.w']


def test_seq2seq_from_hf_gives_hf_logits(tmp_path):
  hf = perturbed(hf_model('t5', seed=4))
  path = save(hf, tmp_path / 't5')
  cfg = ModelConfig.from_dict(model_section(path))
  model, fresh = load(path, cfg)
  assert fresh == []
  src, tgt = TOKENS, TOKENS[:, :7]
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(src), decoder_input_ids=torch.from_numpy(tgt)).logits
  assert max_err(model(jnp.asarray(src), jnp.asarray(tgt)).logits, ref.numpy()) <= ATOL


# =========================================================================== jaxformer runs
def _fake_run(tmp_path, cfg, seed=0, keep=('params',)):
  """A run folder as the trainer leaves it: config.json and a checkpoint with params and an
  optimizer state."""
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text(json.dumps({'model': to_plain(cfg)}))
  params = nnx.state(build_model(cfg, seed=seed), nnx.Param)
  if keep != ('params',):
    params = nnx.State({k: v for k, v in params.items() if k in keep})
  state = {'params': params, 'opt_state': jax.tree.map(jnp.zeros_like, params),
           'step': jnp.zeros((), jnp.int32)}
  with ckpt_lib.Checkpointer(run, async_save=False) as ckpt:
    ckpt.save(5, state, {'step': 5}, force=True)
  return run, params


def test_run_params_load_exactly_into_a_sharded_target(tmp_path):
  from jaxformer.parallel.config import ParallelConfig
  from jaxformer.parallel.mesh import make_mesh
  from jaxformer.parallel.sharding import Layout
  cfg = ModelConfig.from_dict(dict(d_model=32, num_layers=2, vocab_size=64,
                                   attention=dict(num_heads=4), max_length=32))
  run, saved = _fake_run(tmp_path, cfg, seed=7)
  parallel = ParallelConfig(mesh={'data': 2, 'fsdp': 2, 'tensor': 2})
  layout = Layout(make_mesh(parallel), parallel.logical_rules())
  abstract = nnx.state(abstract_model(cfg), nnx.Param)
  for source in (run, run / 'checkpoints' / '5'):
    params, fresh = load_initial_params(str(source), cfg, abstract, layout)
    assert fresh == []
    chex.assert_trees_all_equal(nnx.to_pure_dict(params), nnx.to_pure_dict(saved))
    wq = params['stack']['layers']['blocks'][0]['self_attn']['wq'].get_value()  # [L, D, N, H]
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 16, 2, 8)}


def test_run_without_base_weights_is_refused(tmp_path):
  """An adapter-only checkpoint (what a LoRA run keeps) cannot seed a model on its own."""
  cfg = ModelConfig.from_dict(dict(d_model=16, num_layers=1, vocab_size=32,
                                   attention=dict(num_heads=2), max_length=16))
  run, _ = _fake_run(tmp_path, cfg, keep=('final_norm',))
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match='lacks parameter.*export'):
    load(str(run), cfg)


# =========================================================================== errors
@pytest.fixture(scope='module')
def gpt2_dir(tmp_path_factory):
  return save(hf_model('gpt2'), tmp_path_factory.mktemp('hf') / 'gpt2')


def test_bad_paths_fail_before_loading(tmp_path, gpt2_dir):
  cfg = ModelConfig.from_dict(model_section(gpt2_dir))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    load(str(tmp_path / 'nowhere'), cfg)
  with pytest.raises(FileNotFoundError, match='neither config.json nor a checkpoints'):
    load(str(tmp_path), cfg)
  only_config = tmp_path / 'only_config'
  only_config.mkdir()
  (only_config / 'config.json').write_text(open(f'{gpt2_dir}/config.json').read())
  with pytest.raises(FileNotFoundError, match='no \\*.safetensors'):
    load(str(only_config), cfg)
  lone = tmp_path / 'lone'
  lone.mkdir()
  save_file(load_file(f'{gpt2_dir}/model.safetensors'), str(lone / 'w.safetensors'))
  with pytest.raises(FileNotFoundError, match='no config.json next to it'):
    load(str(lone / 'w.safetensors'), cfg)


def test_mismatched_configs_name_the_fields(gpt2_dir):
  section = model_section(gpt2_dir)
  with pytest.raises(ConfigError, match="family 'decoder', but model.family='encoder'"):
    load(gpt2_dir, ModelConfig.from_dict(model_section(gpt2_dir, family='encoder',
                                                       position=dict(kind='learned'))))
  wider = dict(section, d_model=48, ffn=dict(section['ffn'], hidden_dim=64))
  with pytest.raises(ConfigError, match=r'model.d_model=48 \(the checkpoint has 32\)'):
    load(gpt2_dir, ModelConfig.from_dict(wider))
  # A free field that changes a shape: the learned position table is longer.
  longer = dict(section, max_length=128, position=dict(section['position'], max_length=128))
  with pytest.raises(ConfigError, match=r"'embedder.positions.table' has shape \(64, 32\) in "
                     r'the checkpoint but \(128, 32\) in the model: set '
                     r'model.position.max_length \(and model.max_length\)=64'):
    load(gpt2_dir, ModelConfig.from_dict(longer))


def test_missing_body_tensor_is_an_error(tmp_path, gpt2_dir):
  sd = load_file(f'{gpt2_dir}/model.safetensors')
  del sd['transformer.h.1.mlp.c_fc.weight']
  broken = tmp_path / 'broken'
  broken.mkdir()
  save_file(sd, str(broken / 'model.safetensors'))
  (broken / 'config.json').write_text(open(f'{gpt2_dir}/config.json').read())
  cfg = ModelConfig.from_dict(model_section(gpt2_dir))
  with pytest.raises(ConfigError, match=r"lacks the tensor\(s\) \['transformer.h.1.mlp.c_fc"):
    load(str(broken), cfg)
