"""Helpers shared by the benchmark scripts in experiments/ (timing, CSV)."""

from __future__ import annotations

import csv
import os
import statistics
import time

import jax


def median_seconds(fn, *inputs, repeats: int) -> float:
  """Median wall time of `repeats` calls of `fn(*inputs)` after one warm-up call (which
  compiles), each ended by `block_until_ready`."""
  jax.block_until_ready(fn(*inputs))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def is_oom(error: Exception) -> bool:
  return 'RESOURCE_EXHAUSTED' in str(error) or 'out of memory' in str(error).lower()


def write_csv(rows: list[dict], fields: tuple[str, ...], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)


def write_outputs(rows: list[dict], fields: tuple[str, ...], path: str, plot, title: str,
                  table: str) -> None:
  """The CSV at `path`, `plot(rows, png, title)` next to it (.png), and the markdown table."""
  write_csv(rows, fields, path)
  png = os.path.splitext(path)[0] + '.png'
  plot(rows, png, title)
  print(table)
  print('wrote', path, 'and', png)
