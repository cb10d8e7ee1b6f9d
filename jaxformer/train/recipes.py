"""Recipes the shipped configs share (`configs/*.py`), so a config states only what is its own.

Each returns a plain dict for one section of `default_config(model=..., data=..., optim=...,
train=..., parallel=...)`; keyword arguments add or override fields of that section. The `arg`
of `--config=file.py:arg` is parsed by `jaxformer.config.parse_config_arg`.

    data = stdlib_bytes('lm', seq_len=256)
    optim = warmup_adamw(lr=1e-3, steps=2000, b2=0.95, weight_decay=0.1, end_lr_ratio=0.1)
    train = cadence(batch=16, steps=2000, **lm_sample(size))
"""

from __future__ import annotations

from typing import Any


def stdlib_bytes(task: str, seq_len: int, *, extra_ids: int = 0, **fields) -> dict[str, Any]:
  """The offline python_stdlib corpus read byte-level (256 bytes + pad, bos, eos, mask)."""
  return dict(name='python_stdlib', task=task, tokenizer='byte', extra_ids=extra_ids,
              seq_len=seq_len, **fields)


def warmup_adamw(lr: float, steps: int, *, b2: float, weight_decay: float,
                 schedule: str = 'warmup_cosine', grad_clip_norm: float = 1.0,
                 **fields) -> dict[str, Any]:
  """AdamW with a linear warmup over the first 5% of `steps`, then `schedule`."""
  return dict(optimizer='adamw', lr=lr, b2=b2, weight_decay=weight_decay, schedule=schedule,
              warmup_steps=max(1, steps // 20), grad_clip_norm=grad_clip_norm, **fields)


def cadence(batch: int, steps: int, *, logs: int = 100, evals: int = 10,
            checkpoints: int | None = None, eval_batches: int = 16, test_batches: int = 16,
            **fields) -> dict[str, Any]:
  """The `train` section: `logs` log lines, `evals` evaluations and `checkpoints` (default:
  as many as evaluations) checkpoints over the run, at least every 1 / 2 / 2 steps."""
  return dict(batch_size=batch, steps=steps, log_every=max(1, steps // logs),
              eval_every=max(2, steps // evals), eval_batches=eval_batches,
              checkpoint_every=max(2, steps // (checkpoints or evals)),
              test_batches=test_batches, **fields)


def lm_sample(size: str) -> dict[str, Any]:
  """A 200-byte code sample after training from a `def ` prompt; none for the tiny preset."""
  return dict(sample_prompt='def ', sample_tokens=0 if size == 'tiny' else 200)


def zero3_over_host(on: bool) -> dict[str, Any]:
  """The `parallel` section: FSDP (ZeRO-3) over every device of the host when `on`."""
  return dict(preset='fsdp', mesh={'fsdp': -1}) if on else {}
