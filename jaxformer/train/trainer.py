"""`train_and_evaluate(config, workdir)`: the one training loop every experiment uses.

Order of work, so that bad input fails before anything is compiled: validate the config, check
the workdir is writable, build the device mesh and check the batch splits over it, open this
process's data shards (a missing dataset fails here), lay out the model and optimizer abstractly
(every mesh axis must divide the dimensions it shards), then restore the latest good checkpoint
straight into its shardings (refusing an incompatible one) or initialise in place, write the run
records, and only then compile the steps (`jaxformer.train.program.TrainProgram`).

A sequence-length curriculum (`train.curriculum`, jaxformer/data/curriculum.py) changes the
batch's shape at each stage: the jitted step compiles once per stage shape, when the stage
starts, with the same shardings. `seq_len` and `batch_size` are logged with every step's metrics.

The loop syncs with the host only every `train.log_every` steps (metrics, non-finite check,
progress bar), at evaluation and at checkpoints. SIGTERM / SIGINT finish the current step, save
a checkpoint and exit cleanly (in a multi-host job every process agrees on that step); a run
killed outright resumes from its last checkpoint with the data iterator, step and RNG exactly
where they were. In a multi-host job process 0 writes the records and metrics and prints.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer import compile_cache
from jaxformer.compress import ptq
from jaxformer.data.curriculum import CurriculumIterator, make_curriculum_pipeline
from jaxformer.data.shards import make_process_pipeline
from jaxformer.parallel import distributed
from jaxformer.parallel.mesh import make_mesh
from jaxformer.parallel.sharding import Layout
from jaxformer.train import checkpoint as ckpt_lib
from jaxformer.train import metrics as metrics_lib
from jaxformer.train import optimizer as optim_lib
from jaxformer.train import param_plan
from jaxformer.train.experiment import Experiment
from jaxformer.train.program import NOT_SAVED, TrainProgram
from jaxformer.config import ConfigError
from jaxformer.train.workdir import (WorkdirLock, as_path, prepare_workdir, save_config,
                                     save_param_summary, write_text)

log = logging.getLogger('jaxformer')


def make_layout(cfg, devices=None) -> Layout:
  """The layout of a `ParallelConfig` over `devices` (default: every device of the job)."""
  return Layout(make_mesh(cfg, devices), cfg.logical_rules())


class StepProfiler:
  """Writes a `jax.profiler` trace of `train.profile_steps` steps into `<workdir>/profile`
  (TensorBoard's profile plugin or XProf opens it). Tracing starts at step
  `train.profile_start` (default: two steps after the run starts or resumes, so that
  compilation is not in the trace) and stops once those steps have finished on the device."""

  def __init__(self, workdir, t, start: int):
    self.count = t.profile_steps
    self.first = t.profile_start if t.profile_start > 0 else start + 2
    self.directory = str(workdir / 'profile')
    self.active = False

  def before(self, step: int) -> None:
    if self.count and step == self.first:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step >= self.first + self.count:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      log.info('wrote a profile of %d step(s) from step %d to %s', self.count, self.first,
               self.directory)


class NonFiniteLossError(FloatingPointError):
  """Raised when the loss or the gradients became NaN/Inf and train.nonfinite == 'stop'."""


class Trainer:
  """Holds everything a run needs; `run()` trains, evaluates, checkpoints and samples.

  A training Trainer holds the run folder's lock (`workdir.WorkdirLock`) from its start until
  `run()` returns or `close()` is called, and writes its records only once the folder is known
  to fit the config (an incompatible checkpoint is refused before anything is written).
  `mode='eval'` (the eval and generate commands) reads only: it restores the parameters of the
  newest readable checkpoint (skipping, never moving, unreadable ones), no data-iterator state
  and no training step, and refuses a folder without checkpoints. `devices` restricts the mesh
  to some of this process's devices (notebooks, tests); by default it spans the whole job.
  """

  def __init__(self, config, workdir, *, mode: str = 'train', devices=None):
    if mode not in ('train', 'eval'):
      raise ValueError(f"mode={mode!r} is invalid: allowed values are ['eval', 'train']")
    self.mode = mode
    self.exp = Experiment.from_config(config)
    self.cache_dir = compile_cache.enable(self.exp.train.compilation_cache)
    self.lock = None
    if mode == 'train':
      self.workdir = prepare_workdir(workdir)
      if distributed.is_primary():
        self.lock = WorkdirLock(self.workdir).acquire()
    else:
      self.workdir = as_path(workdir)
    try:
      self._setup(devices)
    except BaseException:
      self.close()
      raise

  def _setup(self, devices) -> None:
    exp, mode = self.exp, self.mode
    self.layout = make_layout(exp.parallel, devices)
    exp.check_batch(self.layout.batch_shards, self.layout.batch_axes, jax.process_count())
    self.mesh = self.layout.mesh
    t = exp.train
    self.curriculum = exp.curriculum()
    if t.curriculum:
      self.train_iter = make_curriculum_pipeline(
          exp.data, self.curriculum, exp.data.train_split, seed=t.seed,
          process_index=jax.process_index(), process_count=jax.process_count())
    else:
      self.train_iter = make_process_pipeline(
          exp.data, exp.data.train_split, batch_size=t.batch_size, seed=t.seed,
          process_index=jax.process_index(), process_count=jax.process_count())
    self.tokenizer = self.train_iter.tokenizer
    if self.tokenizer is not None and self.tokenizer.vocab_size > exp.model.vocab_size:
      raise ConfigError(
          f'model.vocab_size={exp.model.vocab_size} is smaller than the tokenizer vocabulary '
          f'({self.tokenizer.vocab_size} ids for data.tokenizer={exp.data.tokenizer!r}); set '
          f'model.vocab_size >= {self.tokenizer.vocab_size}')
    if mode == 'train' and t.sample_tokens and exp.data.task == 'lm':
      self.sample_room(t.sample_prompt, t.sample_tokens, 'train.sample_tokens')
    regular = None
    if self.tokenizer is not None and getattr(self.tokenizer, 'char_level', False):
      ids = self.tokenizer.regular_ids
      regular = (ids.start, ids.stop)
    self.ckpt = ckpt_lib.Checkpointer(self.workdir, keep=t.keep_checkpoints,
                                      async_save=t.async_checkpoint,
                                      save_interval_steps=t.checkpoint_every,
                                      read_only=mode == 'eval')
    if mode == 'eval' and not self.ckpt.all_steps():
      raise ckpt_lib.CheckpointError(
          f'no checkpoint in {self.ckpt.directory}: nothing to evaluate or sample; train first '
          f'(python -m jaxformer.train --workdir={self.workdir} ...)')
    # A post-training-quantized run folder (python -m jaxformer.compress quantize) is read only.
    if mode == 'train':
      ptq.refuse_training(self.workdir, exp.model)
    self.quantized = ptq.read_record(self.workdir)
    # The init_from source is read when a fresh start needs it, or when the frozen parameters
    # (never checkpointed) come from it.
    ft = exp.finetune
    initial, fresh = None, ()
    if ft.init_from and (ft.method != 'full' or not self.ckpt.all_steps()):
      initial, fresh = self._load_initial(ft.init_from)
    # Shapes, shardings and the mesh's fit to every parameter are known here, before anything
    # is allocated or compiled.
    self.program = TrainProgram(exp, self.layout, regular_ids=regular, fresh=fresh)
    self.graphdef = self.program.graphdef
    self.num_params = self.program.num_params
    self.tx = self.program.tx
    if ft.method != 'full' and mode == 'train':
      log.info(param_plan.describe(self.program.plan, self.program.abstract_state['params'],
                                   self.num_params))
    self._restore_or_init(initial)
    if mode == 'train' and distributed.is_primary():
      save_config(self.workdir, exp.to_dict())
      save_param_summary(self.workdir, self.program.abstract_model_params)

  def close(self) -> None:
    """Waits for checkpoint writes and releases the run folder (idempotent)."""
    ckpt = getattr(self, 'ckpt', None)
    if ckpt is not None and not getattr(self, '_closed', False):
      ckpt.close()
    if self.cache_dir is not None and not getattr(self, '_closed', False):
      log.info('compilation cache %s: %d hits, %d misses in this process', self.cache_dir,
               compile_cache.STATS.hits, compile_cache.STATS.misses)
    self._closed = True
    if self.lock is not None:
      self.lock.release()
      self.lock = None

  @property
  def rest(self):
    return self.program.rest

  @property
  def train_step(self):
    return self.program.train_step

  @property
  def eval_step(self):
    return self.program.eval_step

  # ---------------------------------------------------------------- checkpoints
  def _load_initial(self, source: str):
    """(the model's parameters from finetune.init_from laid out on the mesh, the paths the
    source lacks)."""
    from jaxformer.finetune import init_from  # pylint: disable=import-outside-toplevel
    from jaxformer.parallel import state as state_lib  # pylint: disable=import-outside-toplevel
    exp = self.exp
    abstract = nnx.state(state_lib.abstract_model(exp.model, exp.train.seed), nnx.Param)
    abstract = state_lib.abstract_with(abstract, self.layout.state_shardings(abstract))
    params, fresh = init_from.load_initial_params(source, exp.model, abstract, self.layout,
                                                  seed=exp.train.seed)
    log.info('initialised from %s', source)
    return params, fresh

  def _restore_or_init(self, initial=None) -> None:
    """Restores the newest good checkpoint straight into its shardings, or initialises (from
    `initial`, the finetune.init_from parameters, when given)."""
    if self.quantized is not None:  # codes and scales, dequantized once (compress/ptq.py)
      self.state = ptq.restore(self.ckpt, self.program, self.quantized)
      return
    data = self.train_iter if self.mode == 'train' else None
    restored = self.ckpt.restore(self.program.target(), data=data,
                                 read_only=self.mode == 'eval')
    if restored is None:
      if self.mode == 'train':
        log.info('no checkpoint in %s: starting %s', self.ckpt.directory,
                 f'from {self.exp.finetune.init_from}' if initial is not None else 'from scratch')
      self.state = self.program.init_state(initial)
      return
    step, self.state, extras = restored
    frozen = self.program.frozen(initial)
    if frozen is not None:
      self.state['frozen'] = frozen
    if self.mode == 'train':
      self.state = self.program.with_teacher(self.state)
    if isinstance(data, CurriculumIterator):
      self._restore_curriculum(step, data, extras)
    elif data is not None and not self.ckpt.data_restored and extras.get('data') is not None:
      # Checkpoints written before data shards kept one process's state in the extras.
      if len(data.shards) != 1 or data.num_shards != 1:
        raise ckpt_lib.DataStateError(
            f'checkpoint step {step} keeps the data position of one data shard only (an older '
            'format); resume it with one process and data.num_shards=1')
      data.shards[0].set_state(json.dumps(extras['data']).encode())
    log.info('resumed from step %d', step)

  def _restore_curriculum(self, step: int, data: CurriculumIterator, extras) -> None:
    if self.ckpt.data_restored:
      if data.step != step:
        raise ckpt_lib.DataStateError(
            f'checkpoint step {step} holds the data position of step {data.step}; it cannot '
            'resume a sequence-length curriculum')
      return
    if extras.get('data') is not None:
      raise ckpt_lib.DataStateError(
          f'checkpoint step {step} keeps its data position in an older format, which a '
          'sequence-length curriculum (train.curriculum) cannot resume; resume it without one')
    log.warning('checkpoint step %d has no data position: the curriculum goes on at step %d '
                "with its stage's pipeline from the start of the data", step, step)
    data.seek(step)

  def save(self, force: bool = False) -> bool:
    step = int(self.state['step'])
    if not force and not self.ckpt.should_save(step):
      return False
    self._check_finite(step)
    # The frozen parameters are not saved: they are rebuilt from finetune.init_from (and the
    # teacher from compress.distill.teacher).
    saved = {k: v for k, v in self.state.items() if k not in NOT_SAVED}
    return self.ckpt.save(step, saved, {'step': step}, data=self.train_iter, force=force)

  def _check_finite(self, step: int) -> None:
    skipped = int(optim_lib.num_skipped(self.state['opt_state']))
    if skipped > self.skipped_at_start and self.exp.train.nonfinite == 'stop':
      raise NonFiniteLossError(
          f'the loss or gradients became NaN/Inf ({skipped - self.skipped_at_start} update(s) '
          f'skipped by step {step}); stopping without saving, so {self._last_good()}. Lower '
          "optim.lr, set optim.grad_clip_norm, or set train.nonfinite='skip' to skip such "
          'steps and go on.')

  def _last_good(self) -> str:
    step = self.ckpt.latest_step()
    if step is None:
      return 'nothing is saved (no checkpoint was written yet in this run folder)'
    return f'the last good checkpoint (step {step}) is kept'

  # ---------------------------------------------------------------- data
  def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of the batch -> global arrays split over the batch axes."""
    sharding = self.program.batch_sharding
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

  # ---------------------------------------------------------------- evaluation
  def split_pipeline(self, split: str):
    """This process's batches of `split` in order, one epoch (host arrays; `device_batch`
    makes them global)."""
    exp = self.exp
    return make_process_pipeline(
        exp.data, split, batch_size=exp.train.batch_size, seed=exp.train.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        tokenizer=self.tokenizer, shuffle=False, num_epochs=1)

  def evaluate(self, split: str, num_batches: int, *, counts: bool = False
               ) -> dict[str, float]:
    """Mean metrics over `num_batches` batches of `split` in order (-1: the whole split).

    With `counts`, also how much was read: 'batches', 'tokens' (targets that count) and
    'whole_split' (whether every batch of the split was read)."""
    if num_batches == 0:
      return {}
    exp = self.exp
    it = self.split_pipeline(split)
    totals: dict[str, Any] = {}
    read, whole = 0, True
    for batch in it:
      if 0 < num_batches <= read:
        whole = False
        break
      sums = self.eval_step(self.program.model_view(self.state), self.device_batch(batch))
      totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
      read += 1
    it.close()
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    n = max(totals.get('num_tokens', 0.0), 1.0)
    out = {'loss': totals['nll_sum'] / n, 'accuracy': totals['correct_sum'] / n}
    if exp.data.task != 'classification':
      out['perplexity'] = math.exp(min(out['loss'], 50.0))
    if totals.get('num_bytes'):
      out['bits_per_byte'] = totals['nll_sum'] / math.log(2) / totals['num_bytes']
    if 'rtd_tokens' in totals:  # ELECTRA: loss / accuracy above are the generator's MLM
      r = max(totals['rtd_tokens'], 1.0)
      out.update(rtd_loss=totals['rtd_loss_sum'] / r, rtd_accuracy=totals['rtd_correct_sum'] / r)
    if counts:
      out.update(batches=read, tokens=int(totals.get('num_tokens', 0)), whole_split=whole)
    return out

  # ---------------------------------------------------------------- the loop
  def run(self) -> dict[str, Any]:
    """Trains to train.steps, then evaluates the test split and samples; releases the run
    folder when it returns or fails. A run that already reached train.steps does nothing more
    and returns its recorded result."""
    try:
      return self._run()
    finally:
      self.close()

  def _finished(self, start: int) -> dict[str, Any]:
    path = self.workdir / 'result.json'
    result = json.loads(path.read_text()) if path.exists() else {'step': start}
    if distributed.is_primary():
      log.info('the run already reached train.steps=%d: nothing more to do (recorded results '
               'in %s; python -m jaxformer.eval --workdir=%s evaluates again)',
               self.exp.train.steps, path, self.workdir)
      if result.get('test'):
        print(f'test: {_fmt(result["test"])} (recorded)', flush=True)
    return result

  def _run(self) -> dict[str, Any]:
    exp, t = self.exp, self.exp.train
    start = int(self.state['step'])
    if start >= t.steps:
      return self._finished(start)
    self.skipped_at_start = int(optim_lib.num_skipped(self.state['opt_state']))
    # Lines past the restored step were logged by a run that did not save them: they go.
    writer = metrics_lib.MetricWriter(self.workdir, use_tensorboard=t.tensorboard,
                                      resume_step=start)
    primary = distributed.is_primary()
    bar = metrics_lib.ProgressBar(t.steps, initial_step=start,
                                  keys=('loss', 'lr', 'tokens_per_s', 'mfu'),
                                  enabled=None if t.progress and primary else False,
                                  silent=not primary)
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind)
    throughput = metrics_lib.Throughput(
        work=self.work, peak_flops=None if peak is None else peak * jax.device_count())
    schedule = optim_lib.schedules.make_schedule(exp.optim)
    pending: list[dict[str, jax.Array]] = []
    result: dict[str, Any] = {'start_step': start}
    profiler = StepProfiler(self.workdir, t, start)
    with distributed.StopAgreement() as stop:
      step = start
      throughput(step)
      while step < t.steps:
        profiler.before(step)
        batch = self.device_batch(next(self.train_iter))
        self.state, metrics = self.train_step(self.state, batch)
        pending.append(metrics)
        step += 1
        profiler.after(step, self.state)
        stopping = stop.should_stop(step)
        if step % t.log_every == 0 or step == t.steps or stopping:
          scalars = self._log(step, pending, schedule, throughput, writer, bar)
          result['last_train'] = scalars
          pending = []
        if step % t.eval_every == 0 or step == t.steps:
          ev = self.evaluate(exp.data.eval_split, t.eval_batches)
          if ev:
            writer.write(step, {f'eval/{k}': v for k, v in ev.items()})
            bar.write(f'step {step} eval: {_fmt(ev)}')
            result['eval'] = ev
        if step % t.checkpoint_every == 0 or step == t.steps or stopping:
          self.save(force=step == t.steps or stopping)
        if stopping:
          self.ckpt.wait()
          log.warning('received %s: saved step %d, exiting', stop.signal_name, step)
          result['preempted'] = True
          break
    profiler.close()
    self.ckpt.wait()
    bar.close()
    if not result.get('preempted') and t.test_batches:
      result['test'] = self.evaluate('test', t.test_batches)
      writer.write(step, {f'test/{k}': v for k, v in result['test'].items()})
      if primary:
        print(f'test: {_fmt(result["test"])}', flush=True)
    if not result.get('preempted') and t.sample_tokens and exp.data.task == 'lm':
      # Every process takes part (the model is sharded over all of them); one prints.
      result['sample'] = self.sample(t.sample_prompt, t.sample_tokens)
      if primary:
        print(f'--- sample (prompt {t.sample_prompt!r}) ---\n{t.sample_prompt}'
              f'{result["sample"]}\n---', flush=True)
    writer.close()
    result['step'] = step
    if primary:
      write_text(self.workdir / 'result.json',
                 json.dumps({k: v for k, v in result.items() if k != 'sample'}, indent=1))
    return result

  def _log(self, step, pending, schedule, throughput, writer, bar) -> dict[str, float]:
    m = jax.device_get(pending)
    scalars = {k: float(np.mean([x[k] for x in m])) for k in m[-1] if k != 'num_tokens'}
    if not all(math.isfinite(v) for k, v in scalars.items() if k in ('loss', 'grad_norm')):
      skipped_now = int(optim_lib.num_skipped(self.state['opt_state']))
      if self.exp.train.nonfinite == 'stop' or skipped_now == self.skipped_at_start:
        self._check_finite(step)
        raise NonFiniteLossError(
            f'the training loss became NaN/Inf at step {step}; stopping without saving, so '
            f'{self._last_good()}.')
    self._check_finite(step)
    scalars['lr'] = float(schedule(step - 1)) if callable(schedule) else float(schedule)
    stage = self.curriculum.at(step - 1)  # the shape of the last logged step's batch
    scalars['seq_len'], scalars['batch_size'] = float(stage.seq_len), float(stage.batch_size)
    scalars['skipped_steps'] = float(int(optim_lib.num_skipped(self.state['opt_state'])))
    scalars.update(throughput(step))
    if 'nll' in scalars:
      scalars['perplexity'] = math.exp(min(scalars['nll'], 50.0))
    writer.write(step, scalars)
    bar.update(step, scalars)
    return scalars

  def flops_per_token(self, seq_len: int | None = None) -> float | None:
    """Training FLOPs per token of rows of `seq_len` (default data.seq_len); None for models
    the estimate does not cover."""
    m = self.exp.model
    if not m.family_spec.transformer_flops:
      return None
    non_embed = self.num_params - m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    return metrics_lib.model_flops_per_token(non_embed, m.num_layers, m.d_model,
                                             seq_len or self.exp.data.seq_len)

  def work(self, step: int) -> tuple[int, float | None]:
    """(token positions, model FLOPs) of the first `step` steps, stage by stage."""
    stages = self.curriculum.stages
    tokens, flops = 0, 0.0
    for stage, end in zip(stages, [s.start for s in stages[1:]] + [step]):
      n = stage.tokens * max(0, min(end, step) - stage.start)
      per = self.flops_per_token(stage.seq_len)
      tokens += n
      flops = None if per is None or flops is None else flops + n * per
    return tokens, flops

  # ---------------------------------------------------------------- sampling
  def model_params(self):
    """The model's full parameters (LoRA merged into its base, a quantized base dequantized)."""
    return self.program.full_params(self.program.model_view(self.state))

  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.model_params(), self.rest)

  def sample_room(self, prompt: str, num_tokens: int, field: str) -> list[int]:
    """The prompt's ids; raises ConfigError naming `field` unless `num_tokens` new tokens fit
    under model.max_length after them (nothing is cut silently)."""
    ids = [self.tokenizer.bos_id] + np.asarray(self.tokenizer.encode(prompt)).tolist()
    room = self.exp.model.max_length - len(ids)
    if num_tokens <= 0:
      raise ConfigError(f'{field}={num_tokens} is invalid: the number of new tokens must be '
                        'positive')
    if num_tokens > room:
      raise ConfigError(
          f'{field}={num_tokens} is invalid: the prompt takes {len(ids)} of the '
          f'model.max_length={self.exp.model.max_length} positions, so at most {room} new '
          f'tokens fit; ask for at most {room} (or use a shorter prompt)' if room > 0 else
          f'the prompt ({len(ids)} tokens) leaves no room under model.max_length='
          f'{self.exp.model.max_length}; use a shorter prompt')
    return ids

  def sample(self, prompt: str, num_tokens: int, *, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             field: str = 'train.sample_tokens') -> str:
    """Continuation of `prompt` (KV-cached decoding; train.sample_* settings by default)."""
    from jaxformer.inference import generate
    t = self.exp.train
    tok = self.tokenizer
    ids = self.sample_room(prompt, num_tokens, field)
    out = generate(self.model(), [ids], max_new_tokens=num_tokens,
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
