"""What a compiled program costs: memory and collectives read from XLA, not assumed.

`collectives(compiled)` parses the optimized, partitioned HLO: every all-reduce, all-gather,
reduce-scatter, all-to-all and collective-permute (synchronous or `-start`), its buffer size and
its group size, and how often it runs per call: an op inside a `while` body (the scanned layer
stack, gradient accumulation) counts `known_trip_count` times, nested loops multiply.

Two byte counts per op:
  buffer   the size of the whole buffer the collective is about: the operand of an all-reduce,
           the gathered output of an all-gather, the input of a reduce-scatter;
  traffic  what one device sends over its links with ring algorithms on a group of n:
           all-reduce 2 (n - 1) / n x buffer, all-gather and reduce-scatter (n - 1) / n x
           buffer, all-to-all (n - 1) / n x buffer, collective-permute the buffer.

`memory(compiled)` is XLA's own accounting per device (`compiled.memory_analysis()`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_OP = re.compile(r'=\s*(?P<shape>\(.*?\)|[a-z0-9]+\[[^\]]*\](?:\{[^}]*\})?)\s+'
                 r'(?P<kind>' + '|'.join(KINDS) + r')(?P<start>-start)?\(')
_ARRAY = re.compile(r'([a-z]+[0-9]*)\[([0-9,]*)\]')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$')
_WHILE_BODY = re.compile(r'\bwhile\(.*?\bbody=%?([\w.\-]+)')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r'\b(?:to_apply|calls|body|condition|branch_computations=\{[^}]*|'
                    r'true_computation|false_computation)=%?([\w.\-]+)')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
                'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8,
                'f64': 8, 'c64': 8, 'c128': 16}


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  buffer_bytes: int
  group_size: int
  count: int  # executions per call of the program

  @property
  def traffic_bytes(self) -> float:
    n = max(self.group_size, 1)
    factor = {'all-reduce': 2 * (n - 1) / n, 'collective-permute': 1.0}.get(
        self.kind, (n - 1) / n)
    return factor * self.buffer_bytes


def _bytes(shape_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    size = _DTYPE_BYTES.get(dtype)
    if size is None:
      continue
    total += size * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _group_size(line: str, num_devices: int) -> int:
  """The number of devices per replica group in any of XLA's three spellings."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    axes = re.findall(r"'([^']+)'", m.group(2))
    return math.prod(int(sizes[a]) for a in axes) if axes else 1
  m = re.search(r'replica_groups=\[([\d,]+)\]<=', line)
  if m:
    return int(m.group(1).split(',')[-1])
  m = re.search(r'replica_groups=\{(\{[\d,]*\})', line)
  if m:
    return len([x for x in m.group(1).strip('{}').split(',') if x])
  m = re.search(r'source_target_pairs=', line)
  if m:
    return 2
  return num_devices


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  comps: dict[str, list[str]] = {}
  entry, current = '', None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
      comps[current] = []
      if line.startswith('ENTRY'):
        entry = current
    elif current is not None:
      if line.strip() == '}':
        current = None
      else:
        comps[current].append(line)
  return comps, entry


def _multipliers(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
  """How many times each computation runs per call of the entry computation."""
  mult = collections.defaultdict(int)
  mult[entry] = 1
  order = [entry]
  seen = {entry}
  while order:
    name = order.pop()
    for line in comps.get(name, []):
      trips = 1
      body = _WHILE_BODY.search(line)
      if body:
        trip = _TRIP.search(line)
        trips = int(trip.group(1)) if trip else 1
      for callee in _CALLS.findall(line):
        callee = callee.split(',')[0].lstrip('%')
        times = trips if body and callee == body.group(1) else 1
        mult[callee] += mult[name] * times
        if callee not in seen:
          seen.add(callee)
          order.append(callee)
  return mult


def collectives(compiled_or_text, num_devices: int = 1) -> list[Collective]:
  """Every collective of a compiled program (`jax.stages.Compiled` or its HLO text)."""
  text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
  comps, entry = _computations(text)
  mult = _multipliers(comps, entry)
  out = []
  for name, lines in comps.items():
    times = mult.get(name, 0)
    if not times:
      continue
    for line in lines:
      m = _OP.search(line)
      if not m:
        continue
      out.append(Collective(kind=m.group('kind'), buffer_bytes=_bytes(m.group('shape')),
                            group_size=_group_size(line, num_devices), count=times))
  return out


def summarize(ops: list[Collective]) -> dict[str, dict[str, float]]:
  """kind -> {'count', 'buffer_bytes', 'traffic_bytes'} per call (every kind present)."""
  table = {k: {'count': 0, 'buffer_bytes': 0.0, 'traffic_bytes': 0.0} for k in KINDS}
  for op in ops:
    row = table[op.kind]
    row['count'] += op.count
    row['buffer_bytes'] += op.count * op.buffer_bytes
    row['traffic_bytes'] += op.count * op.traffic_bytes
  return table


def memory(compiled) -> dict[str, int]:
  """Per-device bytes from XLA: arguments, outputs, temporaries, aliased (donated) buffers, and
  the peak estimate arguments + outputs + temporaries - aliased."""
  stats = compiled.memory_analysis()
  out = {name: int(getattr(stats, f'{name}_size_in_bytes', 0) or 0)
         for name in ('argument', 'output', 'temp', 'alias', 'generated_code')}
  out['peak'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


def human(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if abs(n) < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.2f} {unit}'
    n /= 1024
  raise AssertionError('unreachable')
