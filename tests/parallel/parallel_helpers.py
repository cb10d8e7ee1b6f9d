"""Helpers for the parallelism tests: experiments on a chosen set of the 8 simulated devices.

(A plain module, not a conftest: `tests/conftest.py` already owns that module name.)"""

import jax
import numpy as np
from flax import nnx

from jaxformer.models import family_dict
from jaxformer.parallel.mesh import make_mesh
from jaxformer.parallel.sharding import Layout
from jaxformer.train.experiment import Experiment, default_config
from jaxformer.train.program import TrainProgram

# A LLaMA-style decoder every layout of 8 devices divides: 16 query / 8 kv heads (GQA), FFN 128,
# vocabulary 64, model width 64. Residual dropout makes the layouts draw their masks too.
LLAMA = dict(vocab_size=64, d_model=64, num_layers=2, max_length=32, residual_dropout=0.1,
             attention=dict(num_heads=16, num_kv_heads=8, head_dim=8),
             ffn=dict(hidden_dim=128))
# AdamW for the loss curves. Its update is lr * m / (sqrt(v) + eps): for gradients near eps that
# come out of sums with cancellation, fp32 rounding differences between two summation orders are
# amplified up to lr / 100 per parameter, and the differences compound over steps. Measured on
# the T5 model below on ONE device, splitting each batch into 2 micro-batches (nothing but a
# change of summation order) moves the loss at step 20 by 8e-4 with eps=1e-8, more than any
# mesh does; with eps=1e-6 the layouts agree with one device to 5e-7 over 20 steps. So the
# curves use eps=1e-6 (what they compare is the layout, not this amplifier), and updated
# parameters are compared after SGD with momentum, which is linear in the gradient (global-norm
# clipping and decoupled weight decay included, as in AdamW).
OPTIM = dict(optimizer='adamw', lr=1e-2, eps=1e-6, schedule='constant', warmup_steps=0,
             weight_decay=0.1, grad_clip_norm=1.0)
LINEAR_OPTIM = dict(optimizer='sgd', momentum=0.9, lr=0.5, weight_decay=0.1)

LAYOUTS = {
    'dp8': dict(preset='dp', mesh={'data': 8}),
    'fsdp8': dict(preset='fsdp', mesh={'fsdp': 8}),
    'tp8': dict(preset='tp', mesh={'tensor': 8}),
    'dp2_fsdp2_tp2': dict(preset='dp_fsdp_tp', mesh={'data': 2, 'fsdp': 2, 'tensor': 2}),
    'fsdp4_tp2_sp': dict(preset='fsdp_tp', mesh={'fsdp': 4, 'tensor': 2},
                         sequence_parallel=True),
}
ONE_DEVICE = dict(mesh={'data': 1})


def experiment(family: str, model: dict, *, task: str = 'lm', seq_len: int = 16,
               parallel: dict | None = None, batch_size: int = 8, optim: dict | None = None,
               **data) -> Experiment:
  cfg = default_config(
      model=family_dict(family, **model),
      data=dict(name='python_stdlib', task=task, seq_len=seq_len, **data),
      optim=dict(OPTIM, **(optim or {})), train=dict(batch_size=batch_size, steps=100),
      parallel=parallel or {})
  return Experiment.from_config(cfg)


def program(exp: Experiment, devices=None) -> TrainProgram:
  devices = jax.devices() if devices is None else devices
  return TrainProgram(exp, Layout(make_mesh(exp.parallel, devices), exp.parallel.logical_rules()))


def lm_batches(n: int, *, batch: int = 8, length: int = 16, vocab: int = 64, seed: int = 0):
  """Rows of the schema of data.task='lm' with two packed segments each. Each token follows
  from the previous one (t -> 5 t + 3 mod V) from a random start, so a model can learn it
  (equal loss curves that also fall are not two flat lines)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tokens = np.empty((batch, length + 1), np.int64)
    tokens[:, 0] = rng.integers(0, vocab, batch)
    for i in range(1, length + 1):
      tokens[:, i] = (5 * tokens[:, i - 1] + 3) % vocab
    tokens = tokens.astype(np.int32)
    seg = np.ones((batch, length), np.int32)
    seg[:, length // 2 + 1:] = 2
    pos = np.concatenate([np.arange(length // 2 + 1), np.arange(length - length // 2 - 1)])
    out.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': seg,
                'positions': np.broadcast_to(pos, (batch, length)).astype(np.int32),
                'loss_mask': np.ones((batch, length), np.float32)})
  return out


def train(prog: TrainProgram, batches):
  """Runs the batches through `prog`; returns (per-step losses, final params as numpy)."""
  state = prog.init_state()
  losses = []
  for b in batches:
    b = {k: jax.device_put(v, prog.batch_sharding) for k, v in b.items()}
    state, metrics = prog.train_step(state, b)
    losses.append(float(metrics['loss']))
  return np.asarray(losses), jax.tree.map(np.asarray, nnx.to_pure_dict(state['params']))


def one_device():
  return jax.devices()[:1]


def max_abs_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


