"""One analysis of one text on a trained model -> a PNG and the numbers (`python -m
jaxformer.analyze`, docs/analysis.md).

The text becomes one example of the run's task, as the data pipeline makes it:

  lm              inputs [bos] text, targets text [eos]
  classification  inputs [bos] text [eos], label = the model's prediction (or `target`)

and `method` is one of

  maps      attention_grid of every layer and head of the self-attention (maps.py)
  rollout   the rollout matrix R (rollout.py)
  saliency  ||d f / d e_t||_2 per token (attribution.py)
  ig        integrated gradients summed over the embedding, with the completeness check
  fgsm      an FGSM attack of radius eps on the task loss: per-token ||delta_t||_2, the loss
            before and after (adversarial.py)
  pgd       the same with `steps` PGD steps (random start when `random_start`)

f, for saliency and ig, is the log-probability (or logit, `score`) of `target` (default: the
model's prediction) at `position` (LM: default the last input position, i.e. the prediction of
the token after the text).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.analysis import adversarial, attribution, inputs, plots
from jaxformer.analysis import maps as maps_lib
from jaxformer.analysis import rollout as rollout_lib
from jaxformer.config import ConfigError

METHODS = ('maps', 'rollout', 'saliency', 'ig', 'fgsm', 'pgd')
TASKS = ('lm', 'classification')


def check_options(method: str, *, eps: float, steps: int) -> None:
  if method not in METHODS:
    raise ConfigError(f'--method={method!r} is invalid: allowed values are {list(METHODS)}')
  if method in ('fgsm', 'pgd') and not eps > 0:
    raise ConfigError(f'--eps={eps} is invalid: the L_inf radius must be > 0')
  if method in ('ig', 'pgd') and steps < 1:
    raise ConfigError(f'--steps={steps} is invalid: it must be >= 1')


def example(task: str, tokenizer, text: str, max_length: int) -> dict[str, np.ndarray]:
  """One example of `task` from `text` (see the module docstring), batch of 1."""
  if task not in TASKS:
    raise ConfigError(f'jaxformer.analyze reads a text as an example of data.task in '
                      f'{list(TASKS)}; this run trains data.task={task!r}')
  ids = np.asarray(tokenizer.encode(text), np.int32).tolist()
  if task == 'lm':
    x, y = [tokenizer.bos_id] + ids, ids + [tokenizer.eos_id]
  else:
    x, y = [tokenizer.bos_id] + ids + [tokenizer.eos_id], None
  if len(x) > max_length:
    raise ConfigError(f'--text is {len(x)} tokens with its special tokens, longer than '
                      f'model.max_length={max_length}; use a shorter text')
  batch = {'inputs': np.asarray([x], np.int32), 'segment_ids': np.ones((1, len(x)), np.int32)}
  if y is not None:
    batch['targets'] = np.asarray([y], np.int32)
  return batch


def token_labels(tokenizer, ids) -> list[str]:
  special = {tokenizer.bos_id: '<bos>', tokenizer.eos_id: '<eos>'}
  return [special.get(int(i)) or repr(tokenizer.decode([int(i)]))[1:-1] or f'#{int(i)}'
          for i in ids]


def analyze_text(model, task: str, tokenizer, text: str, method: str, out: str, *,
                 target: int | None = None, position: int | None = None, eps: float = 0.01,
                 steps: int = 64, baseline: str = 'pad', score: str = 'log_prob',
                 random_start: bool = False, seed: int = 0) -> dict[str, Any]:
  """Runs `method` (module docstring), writes the PNG `out` and `out` with suffix .json;
  returns the numbers written to the JSON."""
  from jaxformer.train import tasks  # pylint: disable=import-outside-toplevel
  check_options(method, eps=eps, steps=steps)
  cfg = model.cfg
  batch = example(task, tokenizer, text, cfg.max_length)
  ids = batch['inputs']
  labels = token_labels(tokenizer, ids[0])
  seg = jnp.asarray(batch['segment_ids'])
  call = lambda m: m(jnp.asarray(ids), segment_ids=seg).logits  # noqa: E731
  result: dict[str, Any] = {'method': method, 'text': text, 'tokens': labels}
  title = f'{method}: {text[:60]!r}'

  if method in ('maps', 'rollout'):
    site = nnx.jit(lambda m: maps_lib.self_attention(maps_lib.attention_maps(m, call)))(model)
    w = np.asarray(site.weights[:, 0])  # [L, N, T, T], the one example
    if method == 'maps':
      plots.attention_grid(w, site.layers, out, queries=labels, title=title)
      result.update(site=site.name, layers=list(site.layers), weights=w.tolist())
    else:
      r = np.asarray(rollout_lib.attention_rollout(site.weights))[0]
      plots.matrix(r, out, tokens=labels, title=title)
      result.update(site=site.name, layers=list(site.layers), rollout=r.tolist())
  elif method in ('saliency', 'ig'):
    logits = np.asarray(call(model))
    if logits.ndim == 3:
      position = ids.shape[1] - 1 if position is None else position
      if not -ids.shape[1] <= position < ids.shape[1]:
        raise ConfigError(f'--position={position} is invalid: the text has {ids.shape[1]} '
                          'positions')
      row = logits[0, position]
    else:
      row = logits[0]
    tgt = int(np.argmax(row)) if target is None else target
    if not 0 <= tgt < row.shape[-1]:
      raise ConfigError(f'--target={tgt} is invalid: allowed values are 0..{row.shape[-1] - 1}')
    f = attribution.score_function(model, call, jnp.asarray([tgt]), position=position,
                                   score=score)
    result.update(target=tgt, position=position, score=score)
    if method == 'saliency':
      g = jax.jit(jax.grad(f))(jnp.zeros(inputs.delta_shape(model, jnp.asarray(ids))))
      per = np.asarray(attribution.per_token(g, 'norm'))[0]
      result.update(saliency=per.tolist())
    else:
      db = attribution.baseline_delta(model, jnp.asarray(ids), baseline)
      ig = jax.jit(attribution.integrated_gradients, static_argnums=(0, 2))(f, db, steps)
      fx, fb = float(f(jnp.zeros_like(db))), float(f(db))
      per = np.asarray(attribution.per_token(ig, 'sum'))[0]
      result.update(integrated_gradients=per.tolist(), baseline=baseline, steps=steps,
                    f_input=fx, f_baseline=fb, attribution_sum=float(np.sum(per)),
                    completeness_gap=float(attribution.completeness_gap(ig, fx, fb)))
    plots.token_scores(per, out, tokens=labels, title=f'{title} -> target {tgt}')
  else:
    if task == 'classification':
      pred = int(np.argmax(np.asarray(call(model))[0]))
      batch['label'] = np.asarray([pred if target is None else target], np.int32)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    loss = inputs.scalar_function(model, lambda m: tasks.compute_loss(
        m, task, jb, cfg, tasks.LossConfig(), deterministic=True)[0])
    shape = inputs.delta_shape(model, jnp.asarray(ids))
    if method == 'fgsm':
      delta = adversarial.fgsm(loss, shape, eps)
    else:
      key = jax.random.key(seed) if random_start else None
      delta = adversarial.pgd(loss, shape, eps, steps, key=key)
    per = np.asarray(jnp.linalg.norm(delta, axis=-1))[0]
    result.update(eps=eps, clean_loss=float(loss(jnp.zeros(shape))),
                  adversarial_loss=float(loss(delta)), max_abs_delta=float(jnp.max(jnp.abs(
                      delta))), delta_norm=per.tolist())
    if method == 'pgd':
      result.update(steps=steps, random_start=random_start)
    plots.token_scores(per, out, tokens=labels,
                       title=f'{title}: loss {result["clean_loss"]:.3f} -> '
                             f'{result["adversarial_loss"]:.3f}')
  path = pathlib.Path(out).with_suffix('.json')
  path.write_text(json.dumps(result, indent=1))
  result['json'] = str(path)
  return result
