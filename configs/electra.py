"""ELECTRA (Clark et al. 2020): a small MLM generator fills 15% of masked positions with samples
and the discriminator learns to tell replaced tokens from original ones, on every token.

    python -m jaxformer.train --config=configs/electra.py --workdir=runs/electra_small
    python -m jaxformer.train --config=configs/electra.py:size=base --workdir=runs/electra_base
    python -m jaxformer.train --config=configs/electra.py:size=tiny --workdir=runs/electra_tiny

Model (family 'electra', jaxformer/models/electra.py): BERT's post-LN encoder as discriminator;
the generator is the same encoder at a fraction of the width (model.electra.generator_*);
both share the token, position and type embeddings (width model.embed_dim, projected to each
half's width) and the generator's MLM head is tied to them. Objective (data.task='rtd'):
generator MLM loss + 50 x the discriminator's sigmoid cross entropy over all non-padding
tokens; replacements are sampled from the generator at temperature 1 without gradient.
Masking is ELECTRA's: 15% of tokens, of those 85% become <mask> and 15% stay.
Presets (`:size=`), byte-level (260 ids) on the offline python_stdlib corpus:
  small  ELECTRA-Small (Table 6): discriminator 12 layers, d=256, 4 heads, FFN 1024,
         embeddings 128; generator 1/4 wide (d=64, 1 head, FFN 256); 512 positions,
         trained on 128; dropout 0.1. One GPU, or a CPU slowly.
  base   ELECTRA-Base: 12 layers, d=768, 12 heads, FFN 3072, embeddings 768; generator 1/3
         (d=256, 4 heads, FFN 1024); 512 positions, dropout 0.1; one GPU / TPU host.
  tiny   2 layers, d=32, embeddings 16, generator d=16; a CPU in seconds (tests/test_configs.py).
Optimizer (the paper's): Adam with decoupled weight decay 0.01, betas (0.9, 0.999), eps 1e-6,
linear warmup then linear decay to 0, clip 1.0; peak lr 5e-4 (small) / 2e-4 (base). The
paper's 1M (small) / 766k (base) steps are scaled to the corpus: 2000 steps of 128 x 128
(small) or 128 x 512 (base) bytes, warmup 5% of the steps.
Expected result: not yet measured.
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import cadence, stdlib_bytes, warmup_adamw

SIZES = {
    'tiny': dict(d=32, layers=2, heads=2, ffn=64, embed=16, gen_d=16, positions=64, seq=64,
                 batch=8, steps=2, lr=1e-3, dropout=0.0),
    'small': dict(d=256, layers=12, heads=4, ffn=1024, embed=128, gen_d=64, positions=512,
                  seq=128, batch=128, steps=2000, lr=5e-4, dropout=0.1),
    'base': dict(d=768, layers=12, heads=12, ffn=3072, embed=768, gen_d=256, positions=512,
                 seq=512, batch=128, steps=2000, lr=2e-4, dropout=0.1),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {'size': ('small', SIZES)})
  s = SIZES[opts['size']]
  model = family_dict(
      'electra', vocab_size=260, pad_id=0, d_model=s['d'], num_layers=s['layers'],
      embed_dim=s['embed'], max_length=s['positions'],
      position=dict(max_length=s['positions']),
      attention=dict(num_heads=s['heads'], dropout=s['dropout']),
      ffn=dict(hidden_dim=s['ffn']), embed_dropout=s['dropout'],
      residual_dropout=s['dropout'], electra=dict(generator_d_model=s['gen_d']))
  data = stdlib_bytes('rtd', seq_len=s['seq'], mlm_probability=0.15)
  optim = warmup_adamw(s['lr'], s['steps'], b2=0.999, eps=1e-6, weight_decay=0.01,
                       schedule='warmup_linear')
  train = cadence(s['batch'], s['steps'])
  return default_config(model=model, data=data, optim=optim, train=train)
