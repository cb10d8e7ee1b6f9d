"""python -m jaxformer.finetune.make_hf --family=gpt2|llama|bert|t5|bart --out=DIR
       [--size=tiny|small] [--seed=0] [--num_labels=0]

Builds a small, randomly initialised Hugging Face model locally with `transformers` (PyTorch)
and saves it as DIR/config.json + DIR/model.safetensors: the stand-in for "an imported
checkpoint" in the fine-tuning configs, docs and tests (nothing is downloaded). Its vocabulary
is jaxformer's byte-level tokenizer (260 ids: pad 0, bos 1, eos 2, mask 3, bytes 4..259), so
it fine-tunes on the shipped python_stdlib corpus or the synthetic tasks as they are.

    tiny:  d=32, 2 layers, 2 heads (LLaMA: 1 kv head), FFN 64, 64 positions
    small: d=128, 4 layers, 4 heads (LLaMA: 2 kv heads), FFN 384, 256 positions

`--num_labels=K` saves a BERT as BertForSequenceClassification (else BertForMaskedLM).
`local_checkpoint(family, size)` is the same model in a cache folder, built on first use: the
default `init_from` of configs/finetune_*.py.
"""

from __future__ import annotations

import os

from jaxformer.data.tokenizers import BOS, EOS, PAD

VOCAB = 260
SIZES = {'tiny': dict(d=32, layers=2, heads=2, kv=1, ffn=64, positions=64),
         'small': dict(d=128, layers=4, heads=4, kv=2, ffn=384, positions=256)}
FAMILIES = ('gpt2', 'llama', 'bert', 't5', 'bart')


def hf_model(family: str, size: str = 'tiny', *, seed: int = 0, num_labels: int = 0):
  """The randomly initialised transformers model (eval mode, eager attention)."""
  import torch
  import transformers as T

  if family not in FAMILIES:
    raise ValueError(f'--family={family!r} is invalid: allowed values are {list(FAMILIES)}')
  if size not in SIZES:
    raise ValueError(f'--size={size!r} is invalid: allowed values are {sorted(SIZES)}')
  if num_labels and family != 'bert':
    raise ValueError(f'--num_labels={num_labels} is invalid for --family={family}: only bert '
                     'is saved with a classification head')
  s = SIZES[size]
  ids = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
  torch.manual_seed(seed)
  if family == 'gpt2':
    model = T.GPT2LMHeadModel(T.GPT2Config(
        n_embd=s['d'], n_layer=s['layers'], n_head=s['heads'], n_inner=s['ffn'],
        n_positions=s['positions'], attn_implementation='eager', **ids))
  elif family == 'llama':
    model = T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=s['d'], num_hidden_layers=s['layers'], num_attention_heads=s['heads'],
        num_key_value_heads=s['kv'], intermediate_size=s['ffn'],
        max_position_embeddings=s['positions'], tie_word_embeddings=True,
        attn_implementation='eager', **ids))
  elif family == 'bert':
    config = T.BertConfig(
        hidden_size=s['d'], num_hidden_layers=s['layers'], num_attention_heads=s['heads'],
        intermediate_size=s['ffn'], max_position_embeddings=s['positions'],
        vocab_size=VOCAB, pad_token_id=PAD, num_labels=max(num_labels, 2),
        attn_implementation='eager')
    model = (T.BertForSequenceClassification(config) if num_labels
             else T.BertForMaskedLM(config))
  elif family == 't5':
    model = T.T5ForConditionalGeneration(T.T5Config(
        d_model=s['d'], d_kv=s['d'] // s['heads'], d_ff=s['ffn'], num_layers=s['layers'],
        num_heads=s['heads'], decoder_start_token_id=PAD, attn_implementation='eager',
        **dict(ids, bos_token_id=None)))
  else:
    model = T.BartForConditionalGeneration(T.BartConfig(
        d_model=s['d'], encoder_layers=s['layers'], decoder_layers=s['layers'],
        encoder_attention_heads=s['heads'], decoder_attention_heads=s['heads'],
        encoder_ffn_dim=s['ffn'], decoder_ffn_dim=s['ffn'],
        max_position_embeddings=s['positions'], decoder_start_token_id=EOS,
        forced_eos_token_id=None, attn_implementation='eager', **ids))
  return model.eval()


def make_hf(family: str, out: str, size: str = 'tiny', *, seed: int = 0,
            num_labels: int = 0) -> str:
  """Saves `hf_model(...)` to `out` (config.json + model.safetensors); returns `out`."""
  model = hf_model(family, size, seed=seed, num_labels=num_labels)
  os.makedirs(out, exist_ok=True)
  model.save_pretrained(out)
  return out


def local_checkpoint(family: str, size: str = 'tiny') -> str:
  """The default `finetune.init_from` of the shipped fine-tuning configs: the random
  `hf_model(family, size)` (seed 0) saved under $JAXFORMER_CACHE (default ~/.cache/jaxformer)
  /hf/<family>_<size>, built on first use."""
  root = os.environ.get('JAXFORMER_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                           'jaxformer')
  out = os.path.join(root, 'hf', f'{family}_{size}')
  if not os.path.isfile(os.path.join(out, 'model.safetensors')):
    make_hf(family, out, size)
  return out


def main(argv):
  del argv
  from absl import flags

  f = flags.FLAGS
  out = make_hf(f.family, f.out, f.size, seed=f.seed, num_labels=f.num_labels)
  print(f'wrote a random {f.size} {f.family} Hugging Face model to {out} '
        '(config.json, model.safetensors)')


if __name__ == '__main__':
  from absl import app, flags

  flags.DEFINE_enum('family', None, FAMILIES, 'The Hugging Face model family.', required=True)
  flags.DEFINE_string('out', None, 'The directory to write.', required=True)
  flags.DEFINE_enum('size', 'tiny', sorted(SIZES), 'Model size.')
  flags.DEFINE_integer('seed', 0, 'torch seed of the random initialisation.')
  flags.DEFINE_integer('num_labels', 0, 'bert: save a sequence classifier with this many labels.')
  app.run(main)
