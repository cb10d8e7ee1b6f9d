"""Funnel-Transformer (Dai et al. 2020): blocks of layers over a sequence mean-pooled by 2 between
blocks, relative position and token-type attention, and (for token-level outputs) a decoder over
the up-sampled result (`jaxformer.models.funnel`).

    python -m jaxformer.train --config=configs/funnel.py --workdir=runs/funnel
    python -m jaxformer.train --config=configs/funnel.py:size=tiny --workdir=runs/funnel_tiny
    python -m jaxformer.train --config=configs/funnel.py:task=classification --workdir=runs/fc

Options (`:key=value,...`): `task` mlm (default) | classification; `size` small (default) | tiny.
  mlm             FunnelModel with an MLM head (logits h E^T + b, tied) over the decoder output;
                  the offline python_stdlib corpus, bytes (260 ids), 15% of positions masked
                  (80/10/10). One document per row (`data.packing='none'`: mean pooling would mix
                  packed documents, so the family refuses packing), cut to its first seq_len
                  bytes.
  classification  FunnelBaseModel (no decoder) with tanh(W h_[CLS] + b) then a linear layer on
                  the last block's first state; LRA ListOps (`jaxformer.data.listops`, 10
                  classes, one expression per row as [BOS] expression [EOS], the [BOS] state is
                  the [CLS]); small: expressions of 20-250 tokens in rows of 256, 20k examples.
Presets:
  small  d=128, blocks B2-2-2 (pooled twice: rows of 128 / 256 end at 32 / 64 states), 4 heads of
         32, FFN 512, 2 decoder layers (mlm), 2000 steps of 32 rows; a CPU (not timed) or one GPU
         in minutes.
  tiny   d=32, blocks B1-1, 2 heads, 1 decoder layer, rows of 64; a CPU in seconds
         (tests/test_configs.py).
Post-LN, embedding LayerNorm, tanh GELU, LayerNorm eps 1e-9, no absolute positions (the HF
FunnelConfig defaults). Optimizer: AdamW (0.9, 0.999), weight decay 0.01, clip 1.0, warmup then
linear decay (the BERT recipe of configs/bert_base_mlm.py).
Expected results: see docs/results.md ("Funnel") for the measured learning oracle
(tests/models/test_funnel.py).
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config

OPTIONS = {'size': ('small', 'tiny'), 'task': ('mlm', 'classification')}
SIZES = {
    'tiny': dict(d=32, blocks=(1, 1), heads=2, ffn=64, decoder=1,
                 seq=dict(mlm=64, classification=64), batch=8, steps=2, lr=1e-3,
                 listops=dict(num_train=256, num_validation=32, num_test=32,
                                       min_length=10, max_length=62)),
    'small': dict(d=128, blocks=(2, 2, 2), heads=4, ffn=512, decoder=2,
                  seq=dict(mlm=128, classification=256), batch=32,
                  steps=2000, lr=1e-3, listops=dict(num_train=20000, num_validation=1000,
                                                    num_test=1000, min_length=20,
                                                    max_length=254)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {k: (v[0], v) for k, v in OPTIONS.items()})
  s = SIZES[opts['size']]
  mlm = opts['task'] == 'mlm'
  seq = s['seq'][opts['task']]
  model = family_dict(
      'funnel', vocab_size=260 if mlm else 20, d_model=s['d'], num_layers=sum(s['blocks']),
      num_decoder_layers=s['decoder'] if mlm else 0, max_length=seq,
      attention=dict(num_heads=s['heads']), ffn=dict(hidden_dim=s['ffn']),
      funnel=dict(block_sizes=s['blocks']), mlm_head=mlm, head_bias=mlm,
      num_labels=0 if mlm else 10)
  if mlm:
    data = dict(name='python_stdlib', task='mlm', tokenizer='byte', extra_ids=0, seq_len=seq,
                mlm_probability=0.15, packing='none')
  else:
    data = dict(name='listops', task='classification', tokenizer='listops', extra_ids=0,
                seq_len=seq, builder_config=s['listops'])
  optim = dict(optimizer='adamw', lr=s['lr'], b2=0.999, weight_decay=0.01,
               schedule='warmup_linear', warmup_steps=max(1, s['steps'] // 20),
               grad_clip_norm=1.0)
  train = dict(batch_size=s['batch'], steps=s['steps'], log_every=max(1, s['steps'] // 100),
               eval_every=max(2, s['steps'] // 10), eval_batches=16,
               checkpoint_every=max(2, s['steps'] // 10), test_batches=16)
  return default_config(model=model, data=data, optim=optim, train=train)
