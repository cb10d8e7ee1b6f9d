"""python -m jaxformer.parallel.plan --config=configs/x.py[:arg] [--num_devices=8] [--config.a.b=v]

What a config does on a mesh, without training: the mesh; every parameter's logical names,
PartitionSpec, global and per-device shape; parameter and optimizer bytes per device; and the
compiled train step's memory (XLA's memory analysis: arguments, outputs, temporaries) and its
collectives (count and bytes by kind, read from the partitioned HLO, loops counted by their trip
counts). Nothing is allocated: the step is compiled from abstract shapes.

`--num_devices=N` simulates N devices on the CPU (it must come before JAX starts a backend,
which this command guarantees), so a pod layout can be planned on a laptop.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (path[:arg]).',
                                          lock_config=True)
_NUM_DEVICES = flags.DEFINE_integer('num_devices', None,
                                    'Simulate this many CPU devices (default: the real ones).')
_COMPILE = flags.DEFINE_bool('compile', True, 'Compile the train step for memory and '
                             'collectives (off: shardings and bytes only).')
flags.mark_flags_as_required(['config'])


def simulate_devices(n: int | None) -> None:
  """Asks XLA for n CPU devices; must run before the backend starts."""
  if not n:
    return
  flags_env = os.environ.get('XLA_FLAGS', '')
  flags_env = ' '.join(f for f in flags_env.split()
                       if not f.startswith('--xla_force_host_platform_device_count'))
  os.environ['XLA_FLAGS'] = f'{flags_env} --xla_force_host_platform_device_count={n}'.strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def parameter_rows(program) -> list[dict[str, Any]]:
  """One row per parameter: path, logical names, spec, global shape, shard shape, bytes/device."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jaxformer.parallel.sharding import names_of, path_str  # pylint: disable=import-outside-toplevel
  rows = []
  params = program.abstract_state['params']
  shardings = program.param_shardings
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_var)[0]
  for (path, var), sharding in zip(leaves, jax.tree.leaves(shardings)):
    value = var.get_value()
    shard = sharding.shard_shape(value.shape)
    rows.append({'path': path_str(path), 'names': names_of(var), 'spec': sharding.spec,
                 'shape': tuple(value.shape), 'shard': tuple(shard),
                 'bytes': jax.numpy.dtype(value.dtype).itemsize * math.prod(shard)})
  return rows


def plan(config, *, compile_step: bool = True) -> dict[str, Any]:
  """The plan of an experiment config on the devices of this process (see module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxformer.parallel import hlo  # pylint: disable=import-outside-toplevel
  from jaxformer.parallel import state as state_lib  # pylint: disable=import-outside-toplevel
  from jaxformer.parallel.mesh import describe  # pylint: disable=import-outside-toplevel
  from jaxformer.train.experiment import Experiment  # pylint: disable=import-outside-toplevel
  from jaxformer.train.program import TrainProgram  # pylint: disable=import-outside-toplevel
  from jaxformer.train.trainer import make_layout  # pylint: disable=import-outside-toplevel

  exp = Experiment.from_config(config)
  layout = make_layout(exp.parallel)
  exp.check_batch(layout.batch_shards, layout.batch_axes, jax.process_count())
  program = TrainProgram(exp, layout)
  abstract = program.abstract_state
  full = {k: state_lib.bytes_per_device(abstract[k], jax.tree.map(
      lambda _: layout.replicated, program.state_shardings[k])) for k in ('params', 'opt_state')}
  out = {
      'mesh': describe(layout.mesh), 'mesh_shape': dict(layout.mesh.shape),
      'rules': {k: v for k, v in layout.rules.items() if v},
      'parameters': parameter_rows(program),
      'param_bytes': state_lib.bytes_per_device(abstract['params'],
                                                program.state_shardings['params']),
      'opt_bytes': state_lib.bytes_per_device(abstract['opt_state'],
                                              program.state_shardings['opt_state']),
      'param_bytes_unsharded': full['params'], 'opt_bytes_unsharded': full['opt_state'],
      'num_params': program.num_params,
  }
  spec = program.layout.pipeline
  if spec is not None:
    out['pipeline'] = {'stages': spec.stages, 'microbatches': spec.microbatches,
                       'repeats': spec.repeats, 'iterations': spec.iterations,
                       'bubble': spec.bubble}
  if compile_step:
    batch = synthetic_batch(exp)
    compiled = program.train_step.lower(program.target(), program.abstract_batch(batch)).compile()
    out['memory'] = hlo.memory(compiled)
    out['collectives'] = hlo.summarize(hlo.collectives(compiled, layout.mesh.devices.size))
  return out


def synthetic_batch(exp):
  """One host batch of the config's data, read from its pipeline (shapes are what matter)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxformer.data.shards import make_process_pipeline  # pylint: disable=import-outside-toplevel
  it = make_process_pipeline(exp.data, exp.data.train_split, batch_size=exp.train.batch_size,
                             seed=exp.train.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())
  batch = next(it)
  it.close()
  return batch


def render(p: dict[str, Any]) -> str:
  from jaxformer.parallel.hlo import human  # pylint: disable=import-outside-toplevel
  lines = [f'mesh: {p["mesh"]}',
           'rules: ' + ', '.join(f'{k} -> {",".join(v)}' for k, v in p['rules'].items())]
  if 'pipeline' in p:
    q = p['pipeline']
    kind = 'GPipe' if q['repeats'] == 1 else f'circular, {q["repeats"]} repeats'
    lines.append(f'pipeline: {q["stages"]} stages, {q["microbatches"]} micro-batches ({kind}); '
                 f'{q["iterations"]} iterations, bubble (S-1)/(RM+S-1) = {q["bubble"]:.3f}')
  lines += ['', 'parameters (logical names -> PartitionSpec -> per-device shape):']
  rows = [(r['path'], str(r['names']), str(r['spec']), str(r['shape']), str(r['shard']),
           human(r['bytes'])) for r in p['parameters']]
  header = ('path', 'logical names', 'spec', 'shape', 'per device', 'bytes/device')
  widths = [max(len(x[i]) for x in rows + [header]) for i in range(6)]
  for row in [header] + rows:
    lines.append('  ' + '  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
  lines += ['', f'parameters: {p["num_params"]:,}',
            f'parameter bytes per device: {human(p["param_bytes"])} '
            f'(unsharded {human(p["param_bytes_unsharded"])})',
            f'optimizer bytes per device: {human(p["opt_bytes"])} '
            f'(unsharded {human(p["opt_bytes_unsharded"])})']
  if 'memory' in p:
    m = p['memory']
    lines += ['', 'compiled train step, per device (XLA memory analysis):',
              f'  arguments {human(m["argument"])}, outputs {human(m["output"])}, temporaries '
              f'{human(m["temp"])}, donated {human(m["alias"])}; peak ~ {human(m["peak"])}',
              '', 'collectives per step (from the partitioned HLO; loops counted by trip count):',
              f'  {"kind":<20}{"count":>7}{"buffer":>14}{"traffic/device":>17}']
    for kind, row in p['collectives'].items():
      lines.append(f'  {kind:<20}{row["count"]:>7}{human(row["buffer_bytes"]):>14}'
                   f'{human(row["traffic_bytes"]):>17}')
  return '\n'.join(lines)


def main(argv):
  del argv
  from jaxformer.cli import setup_logging  # pylint: disable=import-outside-toplevel
  setup_logging()
  print(render(plan(_CONFIG.value, compile_step=_COMPILE.value)), flush=True)


def start():
  # The device count must be set before anything touches a JAX backend (flag parsing does not).
  for arg in sys.argv[1:]:
    if arg.startswith('--num_devices='):
      simulate_devices(int(arg.split('=', 1)[1]))
  from jaxformer.cli import run  # pylint: disable=import-outside-toplevel
  run(main)


if __name__ == '__main__':
  start()
