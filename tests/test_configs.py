"""Every shipped config: documented, every preset valid, paper sizes exact, and the tiny preset
trained for 2 steps end to end (a new file in configs/ is picked up automatically)."""

import glob
import math
import os

import jax
import pytest
from flax import nnx
# The loader the --config flag itself uses, so configs are imported exactly as on the CLI.
from ml_collections.config_flags import config_flags as cf

from jaxformer.config import ModelConfig
from jaxformer.models import build_model
from jaxformer.train.experiment import Experiment
from jaxformer.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def _name(path):
  return os.path.basename(path)[:-3]


def load(name):
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  return cf._LoadConfigModule(f'{name}_config', path)  # pylint: disable=protected-access


def presets(module):
  """The `:size=` values a config offers (SIZES, or OPTIONS['size'] for multi-option files)."""
  return list(getattr(module, 'SIZES', None) or getattr(module, 'OPTIONS', {}).get('size', ()))


def test_every_config_is_collected():
  assert len(CONFIGS) >= 12 and 'quickstart' in map(_name, CONFIGS)


# Configs whose kind another config of the default suite trains too (the slow suite trains them
# all): the Mistral decoder (LLaMA's blocks with a window: quickstart, llama), RoBERTa MLM
# (bert_base_mlm), fine-tuning GPT-2 from a local HF import (gpt2_small trains the family,
# finetune_lora trains from an HF import).
SAME_KIND_AS_ANOTHER = ('mistral', 'roberta', 'finetune_full')


@pytest.mark.parametrize('path', [
    pytest.param(p, marks=pytest.mark.slow) if _name(p) in SAME_KIND_AS_ANOTHER else p
    for p in CONFIGS], ids=_name)
def test_tiny_preset_trains_two_steps(path, tmp_path):
  module = load(_name(path))
  assert module.__doc__ and 'python -m jaxformer.train' in module.__doc__, path
  config = module.get_config('size=tiny')
  Experiment.from_config(config)
  assert config.data.seq_len <= 64, 'the tiny preset must stay CPU-sized'
  config.train.update(steps=2, batch_size=8, eval_batches=1, test_batches=0, sample_tokens=0,
                      progress=False, async_checkpoint=False, checkpoint_every=2, log_every=1,
                      eval_every=2)
  if config.optim.total_steps is not None:
    config.optim.total_steps = 2
    config.optim.warmup_steps = min(config.optim.warmup_steps, 1)
  result = Trainer(config, str(tmp_path)).run()
  assert result['step'] == 2
  assert math.isfinite(result['last_train']['loss'])
  assert math.isfinite(result['eval']['loss'])
  assert os.path.isdir(tmp_path / 'checkpoints' / '2')


PRESETS = [(_name(p), size) for p in CONFIGS for size in presets(load(_name(p)))]


@pytest.mark.parametrize('name, size', PRESETS, ids=[f'{n}:{s}' for n, s in PRESETS])
def test_every_preset_is_a_valid_experiment(name, size):
  module = load(name)
  exp = Experiment.from_config(module.get_config(f'size={size}'))
  assert exp.train.batch_size % 8 == 0  # splits over 8 devices (and the test's 8 CPUs)


@pytest.mark.parametrize('name', sorted({n for n, _ in PRESETS}))
def test_bad_arguments_name_the_allowed_values(name):
  module = load(name)
  with pytest.raises(ValueError, match='size') as e:
    module.get_config('size=nonexistent')
  assert presets(module)[0] in str(e.value)
  with pytest.raises(ValueError):
    module.get_config('sise=tiny')


def test_rnn_attention_options_select_cell_and_attention():
  module = load('rnn_attention')
  for cell in module.OPTIONS['cell']:
    for attention in module.OPTIONS['attention']:
      exp = Experiment.from_config(module.get_config(f'size=tiny,cell={cell},'
                                                     f'attention={attention},task=reverse'))
      assert (exp.model.rnn.cell, exp.model.rnn.attention) == (cell, attention)
      assert exp.data.name == 'synthetic_seq2seq/reverse'


# Paper-size presets with the original vocabulary (and image size) have exactly the published
# models' parameter counts (Hugging Face / timm checkpoints; BART's final logits bias, a
# buffer there, is a parameter here). Shapes only: nothing is allocated.
PAPER_SIZES = [
    ('gpt2_small', 'small', dict(vocab_size=50257), 124_439_808),
    ('llama', '1b', dict(vocab_size=128256, tie_embeddings=True), 1_235_814_400),  # Llama 3.2 1B
    ('mistral', '7b', dict(vocab_size=32000), 7_241_732_096),
    ('mixtral', '8x7b', dict(vocab_size=32000), 46_702_792_704),
    ('bert_base_mlm', 'base', dict(vocab_size=30522), 109_514_298),
    ('roberta', 'base', dict(vocab_size=50265), 124_697_433),
    ('t5_small', 'small', dict(vocab_size=32128), 76_961_152),
    ('bart', 'base', dict(vocab_size=50265), 139_420_416 + 50265),
    ('vit', 'base', dict(image_size=224, patch_size=16, num_labels=1000, max_length=197),
     86_567_656),  # ViT-B/16
    ('swin', 'swin_t', dict(image_size=224, patch_size=4, num_labels=1000,
                            swin=dict(depths=(2, 2, 6, 2), window_size=7)),
     28_288_354),  # Swin-T (microsoft/swin-tiny-patch4-window7-224)
    ('mamba', '130m', dict(vocab_size=50280), 129_135_360),  # state-spaces/mamba-130m-hf
]


@pytest.mark.parametrize('name, size, overrides, expected', PAPER_SIZES,
                         ids=[f'{n}:{s}' for n, s, _, _ in PAPER_SIZES])
def test_paper_presets_have_the_published_parameter_count(name, size, overrides, expected):
  model = dict(load(name).get_config(f'size={size}').model.to_dict(), **overrides)
  cfg = ModelConfig.from_dict(model)
  abstract = nnx.eval_shape(lambda: build_model(cfg, seed=0))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == expected
