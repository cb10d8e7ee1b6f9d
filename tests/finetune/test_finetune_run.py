"""Fine-tuning by config end to end (CATALOG K): configs/finetune_full.py on a GPT-2 built
locally with transformers and saved as safetensors improves its held-out loss in a few steps;
the result exported as a Hugging Face directory loads in transformers with the same logits,
and exported as a jaxformer run folder evaluates to the same loss."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx

from jaxformer.cli import load_run_config
from jaxformer.finetune.export import export
from jaxformer.finetune.make_hf import make_hf
from jaxformer.train.experiment import load_config
from jaxformer.train import checkpoint as ckpt_lib
from jaxformer.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8
EVAL_BATCHES = 2


@pytest.mark.slow  # ~20 s on a quiet 2-core CPU (the default suite has tests/finetune/test_init_from.py)
def test_finetune_full_improves_and_exports(tmp_path):
  hf_dir = make_hf('gpt2', str(tmp_path / 'hf_gpt2'), 'tiny')
  config = load_config(os.path.join(ROOT, 'configs', 'finetune_full.py'),
                       f'init_from={hf_dir},size=tiny')
  assert config.finetune.init_from == hf_dir and config.finetune.method == 'full'
  config.train.update(steps=STEPS, eval_every=STEPS, checkpoint_every=STEPS, log_every=1,
                      eval_batches=EVAL_BATCHES, test_batches=0, progress=False,
                      async_checkpoint=False)
  config.optim.total_steps = STEPS
  workdir = str(tmp_path / 'run')
  trainer = Trainer(config, workdir)
  split = trainer.exp.data.eval_split
  before = trainer.evaluate(split, EVAL_BATCHES)['loss']
  trainer.run()
  after = trainer.evaluate(split, EVAL_BATCHES)['loss']
  print(f'held-out loss before {before:.4f}, after {STEPS} steps {after:.4f}')
  assert after < before - 0.1, (before, after)

  # HF export: transformers reproduces the fine-tuned logits.
  assert_hf_export_matches(trainer, str(tmp_path / 'hf_out'))

  # jaxformer export: a plain run folder that evaluates to the same loss.
  out = export(trainer, str(tmp_path / 'run_out'), 'jaxformer')
  again = Trainer(load_run_config(out), out, mode='eval')
  assert int(again.state['step']) == STEPS
  np.testing.assert_allclose(again.evaluate(split, EVAL_BATCHES)['loss'], after, rtol=1e-6)
  again.close()


def test_lora_finetune_of_an_hf_llama_trains_adapters_only_and_exports(tmp_path):
  """configs/finetune_lora.py on a locally built HF LLaMA saved as safetensors: the held-out
  loss falls, only the LoRA targets of the merged model move, the checkpoint holds the factors
  only, and the merged export loads in transformers with the LoRA model's logits."""
  steps = 6
  hf_dir = make_hf('llama', str(tmp_path / 'hf_llama'), 'tiny')
  config = load_config(os.path.join(ROOT, 'configs', 'finetune_lora.py'),
                       f'init_from={hf_dir},size=tiny')
  config.finetune.lora.rank = 4
  config.optim.lr = 2e-2
  config.train.update(steps=steps, eval_every=steps, checkpoint_every=steps, log_every=1,
                      eval_batches=EVAL_BATCHES, test_batches=0, progress=False,
                      async_checkpoint=False)
  config.optim.total_steps = steps
  workdir = str(tmp_path / 'run')
  trainer = Trainer(config, workdir, devices=jax.devices()[:1])
  split = trainer.exp.data.eval_split
  base = {k: np.asarray(v) for k, v in _flat(trainer.model_params()).items()}
  before = trainer.evaluate(split, EVAL_BATCHES)['loss']
  trainer.run()
  after = trainer.evaluate(split, EVAL_BATCHES)['loss']
  assert after < before - 0.05, (before, after)
  merged = _flat(trainer.model_params())
  moved = {k for k in base if not np.array_equal(np.asarray(merged[k]), base[k])}
  assert moved == {'stack.layers.blocks.0.self_attn.wq', 'stack.layers.blocks.0.self_attn.wv'}
  saved = [k for k in _checkpoint_keys(workdir) if k.startswith('params/')]
  assert saved and all(k.startswith('params/lora/') for k in saved), saved

  assert_hf_export_matches(trainer, str(tmp_path / 'hf_out'))


def assert_hf_export_matches(trainer, out):
  """The HF export of the run's (merged) parameters loads in transformers with its logits."""
  tokens = np.random.default_rng(0).integers(4, 260, (2, 16))
  out = export(trainer, out, 'hf')
  hf = T.AutoModelForCausalLM.from_pretrained(out, attn_implementation='eager').eval()
  with torch.no_grad():
    ref = hf(torch.from_numpy(tokens)).logits.numpy()
  ours = np.asarray(trainer.model()(jnp.asarray(tokens)).logits)
  assert float(np.max(np.abs(ours - ref))) <= 1e-4


def _flat(state):
  return {'.'.join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def _checkpoint_keys(workdir):
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False, read_only=True)
  try:
    return list(ckpt_lib.flatten(ckpt._manager.restore(ckpt.latest_step())['state']))  # pylint: disable=protected-access
  finally:
    ckpt.close()
