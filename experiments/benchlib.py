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


def add_ratios(rows: list[dict], group, is_base, ratios: dict[str, tuple[str, bool]]) -> None:
  """Compares every row with the baseline row of its group, in place.

  `group(row)` is the key rows are compared within (a length, an expert count), `is_base(row)`
  marks the baseline, and `ratios` maps each new field to (measured field, invert):
  row[field] / base[field], or base[field] / row[field] when `invert` (a speed-up from
  seconds). '' where the row or its baseline was not measured or the divisor is 0.
  """
  bases = {group(r): r for r in rows if is_base(r) and r['status'] == 'ok'}
  for r in rows:
    base = bases.get(group(r))
    for out, (field, invert) in ratios.items():
      num, den = (base, r) if invert else (r, base)
      ok = r['status'] == 'ok' and base is not None and bool(den[field])
      r[out] = num[field] / den[field] if ok else ''


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
