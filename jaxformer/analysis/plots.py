"""Heat-map PNGs of attention maps, rollout and per-token attributions (matplotlib, Agg).

  attention_grid   one panel per (layer, head): rows are layers, columns heads; query tokens
                   down, key tokens across
  matrix           one [T, S] matrix (rollout), tokens on both axes
  token_scores     one bar per token (saliency, integrated gradients, the size of an attack)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _label_axes(ax, rows: Sequence[str], cols: Sequence[str], size: int) -> None:
  ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=size)
  ax.set_yticks(range(len(rows)), rows, fontsize=size)


def attention_grid(weights: np.ndarray, layers: Sequence[int], path: str, *,
                   queries: Sequence[str], keys: Sequence[str] | None = None,
                   title: str = '') -> None:
  """weights [L, N, T, S] (one batch row) -> a grid of L x N heat maps saved at `path`."""
  plt = _pyplot()
  w = np.asarray(weights)
  num_layers, heads = w.shape[:2]
  keys = queries if keys is None else keys
  cell = max(2.0, 0.25 * max(w.shape[-2:]))
  fig, axes = plt.subplots(num_layers, heads, figsize=(cell * heads, cell * num_layers),
                           squeeze=False)
  size = max(4, min(8, int(80 / max(w.shape[-2:]))))
  for i in range(num_layers):
    for n in range(heads):
      ax = axes[i, n]
      ax.imshow(w[i, n], cmap='viridis', vmin=0.0, vmax=1.0, aspect='auto')
      _label_axes(ax, queries, keys, size)
      ax.set_title(f'layer {layers[i]} head {n}', fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def matrix(m: np.ndarray, path: str, *, tokens: Sequence[str], title: str = '') -> None:
  """m [T, S] -> one heat map (rows: output positions, columns: input tokens)."""
  plt = _pyplot()
  m = np.asarray(m)
  cell = max(4.0, 0.3 * m.shape[0])
  fig, ax = plt.subplots(figsize=(cell + 1, cell))
  im = ax.imshow(m, cmap='viridis', aspect='auto')
  _label_axes(ax, tokens, tokens, max(4, min(9, int(120 / m.shape[0]))))
  fig.colorbar(im, ax=ax)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def token_scores(scores: np.ndarray, path: str, *, tokens: Sequence[str],
                 title: str = '') -> None:
  """scores [T] -> a bar chart over the tokens (signed values diverge from 0)."""
  plt = _pyplot()
  s = np.asarray(scores)
  fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(s)), 3))
  ax.bar(range(len(s)), s, color=np.where(s >= 0, 'tab:red', 'tab:blue'))
  ax.set_xticks(range(len(s)), tokens, rotation=90, fontsize=max(5, min(9, int(150 / len(s)))))
  ax.axhline(0.0, color='black', linewidth=0.5)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
