"""Fine-tuning by config end to end (CATALOG K): configs/finetune_full.py on a GPT-2 built
locally with transformers and saved as safetensors improves its held-out loss in a few steps;
the result exported as a Hugging Face directory loads in transformers with the same logits,
and exported as a jaxformer run folder evaluates to the same loss."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from jaxformer.cli import load_run_config
from jaxformer.finetune.export import export
from jaxformer.finetune.make_hf import make_hf
from jaxformer.train.experiment import load_config
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
  tokens = np.random.default_rng(0).integers(4, 260, (2, 16))
  out = export(trainer, str(tmp_path / 'hf_out'), 'hf')
  hf = T.AutoModelForCausalLM.from_pretrained(out, attn_implementation='eager').eval()
  with torch.no_grad():
    ref = hf(torch.from_numpy(tokens)).logits.numpy()
  ours = np.asarray(trainer.model()(jnp.asarray(tokens)).logits)
  assert float(np.max(np.abs(ours - ref))) <= 1e-4

  # jaxformer export: a plain run folder that evaluates to the same loss.
  out = export(trainer, str(tmp_path / 'run_out'), 'jaxformer')
  again = Trainer(load_run_config(out), out, mode='eval')
  assert int(again.state['step']) == STEPS
  np.testing.assert_allclose(again.evaluate(split, EVAL_BATCHES)['loss'], after, rtol=1e-6)
  again.close()
