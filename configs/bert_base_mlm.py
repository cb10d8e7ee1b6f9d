"""BERT-base masked language model (Devlin et al. 2019) on Python source.

    python -m jaxformer.train --config=configs/bert_base_mlm.py --workdir=runs/bert_base_mlm
    python -m jaxformer.train --config=configs/bert_base_mlm.py:size=tiny --workdir=runs/bert_tiny

Post-LN encoder with learned positions, token-type embeddings, embedding LayerNorm, GELU and an
MLM head tied to the input embeddings. 15% of tokens are selected; of those 80% become [MASK],
10% a random token, 10% stay (Sec. 3.1); the loss is on the selected tokens only. The corpus is
not sentence pairs, so there is no next-sentence prediction and every token has type 0.
Presets (`:size=`), byte-level (260 ids) on the offline python_stdlib corpus:
  base   the paper's shape: 12 layers, d=768, 12 heads, FFN 3072, 512 positions, dropout 0.1;
         one GPU / TPU host.
  tiny   2 layers, d=32; a CPU in seconds (tests/test_configs.py).
Optimizer (the paper's): Adam with decoupled weight decay 0.01, betas (0.9, 0.999), peak lr
1e-4, linear warmup then linear decay to 0, clip 1.0. The paper's 1M steps of 256 x 512 tokens
are scaled to the corpus: 2000 steps of 128 x 512 bytes, about 12 passes over its 10.6M
training bytes (masks are redrawn every pass), with warmup 5% of the steps.
Expected result: not yet measured.
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import cadence, stdlib_bytes, warmup_adamw

SIZES = {'tiny': dict(d=32, layers=2, heads=2, seq=64, batch=8, steps=2, lr=1e-3, dropout=0.0),
         'base': dict(d=768, layers=12, heads=12, seq=512, batch=128, steps=2000, lr=1e-4,
                      dropout=0.1)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {'size': ('base', SIZES)})
  s = SIZES[opts['size']]
  model = family_dict(
      'bert', vocab_size=260, pad_id=0, d_model=s['d'], num_layers=s['layers'],
      attention=dict(num_heads=s['heads'], dropout=s['dropout']),
      ffn=dict(hidden_dim=4 * s['d']), embed_dropout=s['dropout'],
      residual_dropout=s['dropout'])
  data = stdlib_bytes('mlm', seq_len=s['seq'], mlm_probability=0.15)
  optim = warmup_adamw(s['lr'], s['steps'], b2=0.999, eps=1e-6, weight_decay=0.01,
                       schedule='warmup_linear')
  train = cadence(s['batch'], s['steps'])
  return default_config(model=model, data=data, optim=optim, train=train)
