"""Mixtral-style decoder (Jiang et al. 2024): Mistral blocks whose FFN is a sparse mixture of
8 SwiGLU experts, each token routed to its top 2 (weights renormalised over the two).

    python -m jaxformer.train --config=configs/mixtral.py:size=small --workdir=runs/mixtral_small
    python -m jaxformer.train --config=configs/mixtral.py:size=tiny --workdir=runs/mixtral_tiny

Presets (`:size=`), all top-2 of 8 experts, byte-level (260 ids) on the offline python_stdlib
corpus, with the load-balancing loss (weight `model.moe.load_balance_weight`, 0.01) and the
router z-loss (0.001):
  tiny   d=32, 2 layers, experts of FFN 32; a CPU in seconds (tests/test_configs.py).
  small  d=256, 4 layers, 4 / 2 heads, experts of FFN 512, 256 context, 2000 steps of 16 rows;
         one GPU (on a CPU, hours; not timed).
  8x7b   the paper's shape: d=4096, 32 layers, 32 / 8 heads, experts of FFN 14336, RoPE theta
         10^6, full attention over 4096 tokens (the paper: 32k); a GPU cluster or TPU pod slice,
         bf16 compute, remat, FSDP over all devices.
The top-k router is computed densely by default (`model.moe.dispatch='auto'`: every expert runs
on every token and the combine weights zero the unchosen ones), so a step costs E/k = 4x the
FLOPs of a sparse kernel; `--config.model.moe.dispatch=ragged` is dropless and equal to it
(sparse where `ragged_dot` has a grouped kernel), and `--config.parallel.mesh.expert=8` with
'capacity' or 'ragged' runs the experts expert-parallel (docs/parallelism.md).
Optimizer: the paper publishes none; LLaMA's AdamW (0.9, 0.95), eps 1e-5,
weight decay 0.1, clip 1.0, warmup then cosine to 10%. 8x7b (64 x 4096 bytes, 500 steps) makes
about 12 passes over the 10.6M training bytes: it runs the architecture at scale, it is not a
pre-training recipe. Expected results: not yet measured.
"""

import ml_collections

from jaxformer.config import parse_config_arg
from jaxformer.models import family_dict
from jaxformer.train.experiment import default_config
from jaxformer.train.recipes import cadence, lm_sample, stdlib_bytes, warmup_adamw, zero3_over_host

SIZES = {
    'tiny': dict(d=32, layers=2, heads=2, kv=1, ffn=32, seq=64, batch=8, steps=2, lr=3e-3),
    'small': dict(d=256, layers=4, heads=4, kv=2, ffn=512, seq=256, batch=16, steps=2000,
                  lr=1e-3),
    '8x7b': dict(d=4096, layers=32, heads=32, kv=8, ffn=14336, seq=4096, batch=64, steps=500,
                 lr=3e-4),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = parse_config_arg(arg, {'size': ('small', SIZES)})
  size, s = opts['size'], SIZES[opts['size']]
  big = size == '8x7b'
  model = family_dict(
      'mixtral', vocab_size=260, d_model=s['d'], num_layers=s['layers'], max_length=s['seq'],
      attention=dict(num_heads=s['heads'], num_kv_heads=s['kv']), ffn=dict(hidden_dim=s['ffn']),
      moe=dict(num_experts=8, top_k=2), remat='dots_no_batch' if big else 'none',
      dtype='bfloat16' if big else 'float32')
  data = stdlib_bytes('lm', seq_len=s['seq'])
  optim = warmup_adamw(s['lr'], s['steps'], b2=0.95, eps=1e-5, weight_decay=0.1,
                       end_lr_ratio=0.1)
  train = cadence(s['batch'], s['steps'], **lm_sample(size))
  # FSDP over the model dimension of every weight (experts included): ZeRO-3 over the host.
  parallel = zero3_over_host(big)
  return default_config(model=model, data=data, optim=optim, train=train, parallel=parallel)
