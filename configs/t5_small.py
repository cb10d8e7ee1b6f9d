"""T5 v1.1 small (Raffel et al. 2020; the v1.1 checkpoints' changes) pre-trained with span
corruption.

    python -m jaxformer.train --config=configs/t5_small.py --workdir=runs/t5_small
    python -m jaxformer.train --config=configs/t5_small.py:size=tiny --workdir=runs/t5_tiny

T5 v1.1: pre-LN RMSNorm encoder-decoder without biases, bucketed relative position bias (32
buckets, max distance 128), unscaled attention logits, gated-GELU FFN, untied output head, no
dropout in pre-training. Span corruption (Sec. 3.1.4): 15% of tokens in spans of mean length 3,
each span replaced by one sentinel id in the inputs; the targets are the sentinels followed by
the spans they replaced. Inputs of 512 ids give targets of 114, as in the paper.
Presets (`:size=`), byte-level on the offline python_stdlib corpus with 100 sentinel ids at the
top of the vocabulary (260 + 100 = 360 ids):
  small  8 + 8 layers, d=512, 6 heads of 64, FFN 1024; one GPU / TPU host.
  tiny   2 + 2 layers, d=32; a CPU in seconds (tests/test_configs.py).
Optimizer (the paper's): Adafactor (factored second moments, decay 0.8, update clipping 1.0,
relative parameter scale), lr = 0.01 * min(step / W, sqrt(W / step)): the paper's
1 / sqrt(max(step, 10^4)) decay with a linear warmup to 0.01 instead of a flat start, and W
scaled from 10^4 of 2^19 steps to 10% of the steps. 2000 steps of 128 x 568 bytes make about 14
passes over the 10.6M training bytes (fresh spans every pass). Expected result: not yet measured.
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import cadence, stdlib_bytes

SIZES = {'tiny': dict(d=32, layers=2, heads=2, head_dim=16, ffn=64, seq=64, batch=8, steps=2),
         'small': dict(d=512, layers=8, heads=6, head_dim=64, ffn=1024, seq=512, batch=128,
                       steps=2000)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {'size': ('small', SIZES)})
  s = SIZES[opts['size']]
  model = family_dict(
      't5_v1_1', vocab_size=360, d_model=s['d'], num_layers=s['layers'], max_length=s['seq'],
      attention=dict(num_heads=s['heads'], head_dim=s['head_dim']),
      ffn=dict(hidden_dim=s['ffn']))
  data = stdlib_bytes('span_corruption', seq_len=s['seq'], extra_ids=100, noise_density=0.15,
                      mean_noise_span_length=3.0)
  optim = dict(optimizer='adafactor', lr=1e-2, schedule='inverse_sqrt',
               warmup_steps=max(1, s['steps'] // 10))
  train = cadence(s['batch'], s['steps'])
  return default_config(model=model, data=data, optim=optim, train=train)
