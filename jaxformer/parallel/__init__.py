"""Parallelism: one config on any device mesh (CATALOG J).

  config.py       `ParallelConfig`: the `config.parallel` section (layout, preset, mesh,
                  dcn_mesh, rules, pipeline)
  rules.py        logical axis names, the activation layouts, presets -> rule tables
  mesh.py         the named device mesh (ICI x DCN), device order from mesh_utils
  sharding.py     `Layout` (mesh + rules): specs and shardings by logical name, `constrain`,
                  `shard_kernel` (custom kernels under shard_map)
  pipeline.py     pipeline parallelism over the 'stage' axis: GPipe and circular schedules
                  (used by models/stack.py as a layer-loop strategy)
  ring.py         ring attention over the 'context' axis: block schedule, zig-zag relayout,
                  the ring forward and backward (used by attention/context.py)
  state.py        model and optimizer state created directly in its sharding
  distributed.py  multi-host: jax.distributed, the primary process, barriers, stopping together
  hlo.py          memory and collectives read from a compiled program
  plan.py         `python -m jaxformer.parallel.plan`: what a config does on a mesh, without training

Models only name logical axes; everything that knows about devices lives here.
"""
