"""`train_and_evaluate(config, workdir)`: the one training loop every experiment uses.

Order of work, so that bad input fails before anything is compiled: validate the config, check
the workdir is writable, build the device mesh and check the batch splits over it, open the data
(a missing dataset fails here), build the model and optimizer, then restore the latest good
checkpoint (refusing an incompatible one) or start fresh, and only then compile.

The loop syncs with the host only every `train.log_every` steps (metrics, non-finite check,
progress bar), at evaluation and at checkpoints. SIGTERM / SIGINT finish the current step, save
a checkpoint and exit cleanly; a run killed outright resumes from its last checkpoint with the
data iterator, step and RNG exactly where they were.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxformer.data import pipeline as data_pipeline
from jaxformer.layers.base import logical_rules
from jaxformer.models import build_model
from jaxformer.parallel.sharding import make_mesh, shard_params
from jaxformer.train import checkpoint as ckpt_lib
from jaxformer.train import metrics as metrics_lib
from jaxformer.train import optimizer as optim_lib
from jaxformer.train import tasks
from jaxformer.train.experiment import Experiment
from jaxformer.train.precision import make_loss_scale
from jaxformer.train.step import make_eval_step, make_train_step
from jaxformer.train.workdir import prepare_workdir, save_config, save_param_summary

log = logging.getLogger('jaxformer')


class NonFiniteLossError(FloatingPointError):
  """Raised when the loss or the gradients became NaN/Inf and train.nonfinite == 'stop'."""


class Trainer:
  """Holds everything a run needs; `run()` trains, evaluates, checkpoints and samples."""

  def __init__(self, config, workdir: str):
    self.exp = exp = Experiment.from_config(config)
    self.workdir = prepare_workdir(workdir)
    shape = exp.parallel.mesh_shape(jax.device_count())
    exp.check_devices(shape)
    self.mesh = make_mesh(list(shape.values()), list(shape.keys()))
    self.rules = exp.parallel.rule_items()
    batch_axes = dict(self.rules).get('batch')
    self.batch_sharding = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec(batch_axes))
    t = exp.train
    self.train_iter = data_pipeline.make_pipeline(
        exp.data, exp.data.train_split, batch_size=t.batch_size // jax.process_count(),
        seed=t.seed, shard_index=jax.process_index(), shard_count=jax.process_count())
    self.tokenizer = self.train_iter.tokenizer
    if self.tokenizer is not None and self.tokenizer.vocab_size > exp.model.vocab_size:
      raise ValueError(
          f'model.vocab_size={exp.model.vocab_size} is smaller than the tokenizer vocabulary '
          f'({self.tokenizer.vocab_size} ids for data.tokenizer={exp.data.tokenizer!r}); set '
          f'model.vocab_size >= {self.tokenizer.vocab_size}')
    save_config(self.workdir, exp.to_dict())

    model = build_model(exp.model, seed=t.seed)
    with jax.set_mesh(self.mesh):
      shard_params(model, self.mesh, self.rules)
    self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
    save_param_summary(self.workdir, params)
    self.num_params = sum(x.size for x in jax.tree.leaves(params))
    self.tx = optim_lib.make_optimizer(exp.optim.replace(skip_nonfinite=True), params)
    state = {'params': params, 'opt_state': jax.jit(self.tx.init)(params),
             'step': jnp.zeros((), jnp.int32)}
    scale = make_loss_scale(exp.optim)
    if scale is not None:
      state['loss_scale'] = scale
    self.state = self._place(state)

    self.ckpt = ckpt_lib.Checkpointer(self.workdir, keep=t.keep_checkpoints,
                                      async_save=t.async_checkpoint,
                                      save_interval_steps=t.checkpoint_every)
    self._restore()
    loss_cfg = tasks.LossConfig(label_smoothing=t.label_smoothing, z_loss=t.z_loss)
    self.train_step = jax.jit(make_train_step(
        self.graphdef, self.rest, task=exp.data.task, model_cfg=exp.model, loss_cfg=loss_cfg,
        tx=self.tx, accum_steps=exp.optim.grad_accum_steps, seed=t.seed), donate_argnums=0)
    regular = None
    if self.tokenizer is not None and getattr(self.tokenizer, 'char_level', False):
      ids = self.tokenizer.regular_ids
      regular = (ids.start, ids.stop)
    self.eval_step = jax.jit(make_eval_step(
        self.graphdef, self.rest, task=exp.data.task, model_cfg=exp.model,
        loss_cfg=tasks.LossConfig(), regular_ids=regular))

  def _place(self, tree):
    """Everything not already laid out on the mesh (optimizer counters, step, loss scale) is
    replicated over it, so jit sees one device set and restored leaves keep their layout."""

    def sharding(x):
      s = getattr(x, 'sharding', None)
      if isinstance(s, jax.sharding.NamedSharding) and s.mesh == self.mesh:
        return s
      return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    return jax.device_put(tree, jax.tree.map(sharding, tree))

  # ---------------------------------------------------------------- checkpoints
  def _restore(self) -> None:
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
        self.state)
    restored = self.ckpt.restore(target)
    if restored is None:
      log.info('no checkpoint in %s: starting from scratch', self.ckpt.directory)
      return
    step, state, extras = restored
    self.state = state
    if extras and extras.get('data') is not None:
      self.train_iter.set_state(json.dumps(extras['data']).encode())
    log.info('resumed from step %d', step)

  def save(self, force: bool = False) -> bool:
    step = int(self.state['step'])
    if not force and not self.ckpt.should_save(step):
      return False
    self._check_finite(step)
    extras = {'data': json.loads(self.train_iter.get_state()), 'step': step}
    return self.ckpt.save(step, self.state, extras, force=force)

  def _check_finite(self, step: int) -> None:
    skipped = int(optim_lib.num_skipped(self.state['opt_state']))
    if skipped > self.skipped_at_start and self.exp.train.nonfinite == 'stop':
      raise NonFiniteLossError(
          f'the loss or gradients became NaN/Inf ({skipped - self.skipped_at_start} update(s) '
          f'skipped by step {step}); stopping without saving, so the last good checkpoint '
          f'(step {self.ckpt.latest_step()}) is kept. Lower optim.lr, set optim.grad_clip_norm, '
          "or set train.nonfinite='skip' to skip such steps and go on.")

  # ---------------------------------------------------------------- data
  def _device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in batch.items()}

  # ---------------------------------------------------------------- evaluation
  def evaluate(self, split: str, num_batches: int) -> dict[str, float]:
    """Mean metrics over `num_batches` batches of `split` in order (-1: the whole split)."""
    if num_batches == 0:
      return {}
    exp = self.exp
    it = data_pipeline.make_pipeline(
        exp.data, split, batch_size=exp.train.batch_size // jax.process_count(),
        seed=exp.train.seed, shard_index=jax.process_index(),
        shard_count=jax.process_count(), tokenizer=self.tokenizer, shuffle=False, num_epochs=1)
    totals: dict[str, Any] = {}
    with jax.set_mesh(self.mesh), logical_rules(self.rules):
      for i, batch in enumerate(it):
        if 0 < num_batches <= i:
          break
        sums = self.eval_step(self.state['params'], self._device_batch(batch))
        totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
    it.close()
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    n = max(totals.get('num_tokens', 0.0), 1.0)
    out = {'loss': totals['nll_sum'] / n, 'accuracy': totals['correct_sum'] / n}
    if exp.data.task != 'classification':
      out['perplexity'] = math.exp(min(out['loss'], 50.0))
    if totals.get('num_bytes'):
      out['bits_per_byte'] = totals['nll_sum'] / math.log(2) / totals['num_bytes']
    return out

  # ---------------------------------------------------------------- the loop
  def run(self) -> dict[str, Any]:
    exp, t = self.exp, self.exp.train
    start = int(self.state['step'])
    self.skipped_at_start = int(optim_lib.num_skipped(self.state['opt_state']))
    writer = metrics_lib.MetricWriter(self.workdir, use_tensorboard=t.tensorboard)
    bar = metrics_lib.ProgressBar(t.steps, initial_step=start,
                                  keys=('loss', 'lr', 'tokens_per_s', 'mfu'),
                                  enabled=None if t.progress else False)
    tokens_per_step = t.batch_size * exp.data.seq_len
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind)
    throughput = metrics_lib.Throughput(
        tokens_per_step=tokens_per_step,
        flops_per_token=self.flops_per_token(),
        peak_flops=None if peak is None else peak * jax.device_count())
    schedule = optim_lib.schedules.make_schedule(exp.optim)
    pending: list[dict[str, jax.Array]] = []
    result: dict[str, Any] = {'start_step': start}
    if start >= t.steps:
      log.info('the run already reached train.steps=%d', t.steps)
    with ckpt_lib.PreemptionHandler() as preempt, jax.set_mesh(self.mesh), \
        logical_rules(self.rules):
      step = start
      throughput(step)
      while step < t.steps:
        batch = self._device_batch(next(self.train_iter))
        self.state, metrics = self.train_step(self.state, batch)
        pending.append(metrics)
        step += 1
        if step % t.log_every == 0 or step == t.steps or preempt.should_stop:
          scalars = self._log(step, pending, schedule, throughput, writer, bar)
          result['last_train'] = scalars
          pending = []
        if step % t.eval_every == 0 or step == t.steps:
          ev = self.evaluate(exp.data.eval_split, t.eval_batches)
          if ev:
            writer.write(step, {f'eval/{k}': v for k, v in ev.items()})
            bar.write(f'step {step} eval: {_fmt(ev)}')
            result['eval'] = ev
        if step % t.checkpoint_every == 0 or step == t.steps or preempt.should_stop:
          self.save(force=step == t.steps or preempt.should_stop)
        if preempt.should_stop:
          log.warning('received %s: saved step %d, exiting', preempt.signal_name, step)
          result['preempted'] = True
          break
    self.ckpt.wait()
    bar.close()
    if not result.get('preempted') and t.test_batches:
      result['test'] = self.evaluate('test', t.test_batches)
      writer.write(step, {f'test/{k}': v for k, v in result['test'].items()})
      print(f'test: {_fmt(result["test"])}', flush=True)
    if not result.get('preempted') and t.sample_tokens and exp.data.task == 'lm':
      result['sample'] = self.sample(t.sample_prompt, t.sample_tokens)
      print(f'--- sample (prompt {t.sample_prompt!r}) ---\n{t.sample_prompt}{result["sample"]}\n'
            '---', flush=True)
    writer.close()
    result['step'] = step
    with open(os.path.join(self.workdir, 'result.json'), 'w') as f:
      json.dump({k: v for k, v in result.items() if k != 'sample'}, f, indent=1)
    return result

  def _log(self, step, pending, schedule, throughput, writer, bar) -> dict[str, float]:
    m = jax.device_get(pending)
    scalars = {k: float(np.mean([x[k] for x in m])) for k in m[-1] if k != 'num_tokens'}
    if not all(math.isfinite(v) for k, v in scalars.items() if k in ('loss', 'grad_norm')):
      skipped_now = int(optim_lib.num_skipped(self.state['opt_state']))
      if self.exp.train.nonfinite == 'stop' or skipped_now == self.skipped_at_start:
        self._check_finite(step)
        raise NonFiniteLossError(
            f'the training loss became NaN/Inf at step {step}; stopping without saving (last '
            f'good checkpoint: step {self.ckpt.latest_step()}).')
    self._check_finite(step)
    scalars['lr'] = float(schedule(step - 1)) if callable(schedule) else float(schedule)
    scalars['skipped_steps'] = float(int(optim_lib.num_skipped(self.state['opt_state'])))
    scalars.update(throughput(step))
    if 'nll' in scalars:
      scalars['perplexity'] = math.exp(min(scalars['nll'], 50.0))
    writer.write(step, scalars)
    bar.update(step, scalars)
    return scalars

  def flops_per_token(self) -> float | None:
    m = self.exp.model
    if m.family == 'rnn_seq2seq':
      return None
    non_embed = self.num_params - m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    return metrics_lib.model_flops_per_token(non_embed, m.num_layers, m.d_model,
                                             self.exp.data.seq_len)

  # ---------------------------------------------------------------- sampling
  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.state['params'], self.rest)

  def sample(self, prompt: str, num_tokens: int, *, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None
             ) -> str:
    """Continuation of `prompt` (KV-cached decoding; train.sample_* settings by default)."""
    from jaxformer.inference import generate
    t = self.exp.train
    tok = self.tokenizer
    ids = [tok.bos_id] + np.asarray(tok.encode(prompt)).tolist()
    max_new = min(num_tokens, self.exp.model.max_length - len(ids))
    if max_new <= 0:
      raise ValueError(f'the prompt ({len(ids)} tokens) leaves no room under '
                       f'model.max_length={self.exp.model.max_length}')
    out = generate(self.model(), [ids], max_new_tokens=max_new,
                   temperature=t.sample_temperature if temperature is None else temperature,
                   top_k=t.sample_top_k if top_k is None else top_k,
                   top_p=t.sample_top_p if top_p is None else top_p,
                   stop_tokens=(tok.eos_id,), seed=t.seed if seed is None else seed)
    n = int(np.asarray(out.lengths)[0])
    return tok.decode(np.asarray(out.tokens)[0, :n].tolist())


def _fmt(d: dict[str, float]) -> str:
  return ', '.join(f'{k}={v:.4g}' for k, v in d.items())


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains per `config` in `workdir`, resuming if a checkpoint is there; returns final metrics."""
  return Trainer(config, workdir).run()
