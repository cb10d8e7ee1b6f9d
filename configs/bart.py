"""BART-base (Lewis et al. 2020) pre-trained as a denoising autoencoder with text infilling.

    python -m jaxformer.train --config=configs/bart.py --workdir=runs/bart
    python -m jaxformer.train --config=configs/bart.py:size=tiny --workdir=runs/bart_tiny

Post-LN encoder-decoder with learned positions (offset 2, as fairseq), embedding LayerNorm,
GELU, tied embeddings and a final logits bias. Text infilling (Sec. 2.2): 30% of the tokens are
masked in spans with Poisson(3) lengths, each span (0-length spans too) replaced by a single
mask id; the decoder reconstructs the original text. This is the paper's best single noising
scheme (Table 1); its final models also permute sentences, which is
`--config.data.bart_permute_sentences=True` (sentences end at . ! ? or a newline).
Presets (`:size=`), byte-level (260 ids) on the offline python_stdlib corpus:
  base   6 + 6 layers, d=768, 12 heads, FFN 3072, dropout 0.1, 512 positions used of 1024;
         one GPU / TPU host.
  tiny   2 + 2 layers, d=32; a CPU in seconds (tests/test_configs.py).
Optimizer: the paper gives none for base-size pre-training, so RoBERTa's (BART's starting
point): AdamW, betas (0.9, 0.98), eps 1e-6, weight decay 0.01, peak lr 1e-4, linear warmup
(5%) then linear decay, clip 1.0. 2000 steps of 128 x 511 bytes make about 12 passes over the
10.6M training bytes (fresh noise every pass). Expected result: not yet measured.
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import cadence, stdlib_bytes, warmup_adamw

SIZES = {'tiny': dict(d=32, layers=2, heads=2, seq=64, batch=8, steps=2, lr=1e-3, dropout=0.0),
         'base': dict(d=768, layers=6, heads=12, seq=512, batch=128, steps=2000, lr=1e-4,
                      dropout=0.1)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {'size': ('base', SIZES)})
  s = SIZES[opts['size']]
  # The byte tokenizer pads with id 0 (the family's pad_id=1 is fairseq's vocabulary).
  model = family_dict(
      'bart', vocab_size=260, pad_id=0, d_model=s['d'], num_layers=s['layers'],
      attention=dict(num_heads=s['heads'], dropout=s['dropout']),
      ffn=dict(hidden_dim=4 * s['d']), embed_dropout=s['dropout'],
      residual_dropout=s['dropout'])
  data = stdlib_bytes('denoise', seq_len=s['seq'], bart_mask_ratio=0.3,
                      bart_poisson_lambda=3.0)
  optim = warmup_adamw(s['lr'], s['steps'], b2=0.98, eps=1e-6, weight_decay=0.01,
                       schedule='warmup_linear')
  train = cadence(s['batch'], s['steps'])
  return default_config(model=model, data=data, optim=optim, train=train)
