"""Tiny models shared by the analysis tests (imported by basename: tests/ has no packages)."""

import functools

import jax.numpy as jnp

from jaxformer.models import build_model, family


def tiny(name='llama', **overrides):
  """A tiny model, built once per configuration (analyses leave the parameters unchanged)."""
  return _tiny(name, repr(sorted(overrides.items())))


@functools.lru_cache(maxsize=None)
def _tiny(name, key):
  overrides = dict(eval(key))  # noqa: S307 - our own repr of literals
  kw = dict(d_model=16, num_layers=2, vocab_size=260, max_length=16, attention={'num_heads': 2},
            ffn={'hidden_dim': 32})
  kw.update(overrides)
  return build_model(family(name, **kw))


def tokens(batch=2, length=6, vocab=260):
  return (jnp.arange(batch * length).reshape(batch, length) * 7 + 3) % vocab
