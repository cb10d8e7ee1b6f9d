"""The device mesh of a run, from `config.parallel` (CATALOG J).

The mesh always has the six named axes of `rules.MESH_AXES` (size 1 where unused), so rules and
specs never depend on which ones a config happens to set. Device order comes from
`jax.experimental.mesh_utils`: on TPU it follows the physical torus, so the innermost axes
('tensor', then 'expert', ...) land on the closest chips and carry the most frequent
collectives. With `parallel.dcn_mesh` the mesh is hybrid: `create_hybrid_device_mesh` puts the
DCN factor of each axis across slices (TPU multi-slice, grouped by `slice_index`) or across
processes (GPU and CPU clusters), and the ICI factor within them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

from jaxformer.config import fail
from jaxformer.parallel.config import ParallelConfig
from jaxformer.parallel.rules import MESH_AXES


def make_mesh(cfg: ParallelConfig, devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """The mesh of `cfg` over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = cfg.mesh_shape(len(devices))
  shape = [sizes[a] for a in MESH_AXES]
  dcn = cfg.dcn_sizes()
  if math.prod(dcn.values()) > 1:
    dcn_shape = [dcn[a] for a in MESH_AXES]
    ici_shape = [s // d for s, d in zip(shape, dcn_shape)]
    # TPU multi-slice devices differ in `slice_index`; elsewhere (GPU, CPU) processes are the
    # units that the network connects.
    by_slice = len({getattr(d, 'slice_index', 0) for d in devices}) > 1
    attr = 'slice_index' if by_slice else 'process_index'
    granules = len({getattr(d, attr) for d in devices})
    if granules != math.prod(dcn_shape):
      fail('parallel.dcn_mesh', {a: s for a, s in dcn.items() if s != 1},
           f'asks for {math.prod(dcn_shape)} {"slices" if by_slice else "processes"} across '
           f'the data-center network, but the devices come from {granules}; set it to 1 for '
           'a single slice or process')
    array = mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, devices, process_is_granule=not by_slice,
        allow_split_physical_axes=True)
  elif len(devices) == 1:
    array = np.asarray(devices).reshape(shape)
  else:
    array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(array, MESH_AXES)


def single_device_mesh(device: jax.Device | None = None) -> jax.sharding.Mesh:
  """A mesh of one device with the six named axes (for restoring onto one device)."""
  device = device or jax.local_devices()[0]
  return jax.sharding.Mesh(np.asarray([device]).reshape((1,) * len(MESH_AXES)), MESH_AXES)


def describe(mesh: jax.sharding.Mesh) -> str:
  """'data=2 x fsdp=2 x tensor=2 (8 devices)': the axes of size > 1."""
  parts = [f'{a}={s}' for a, s in mesh.shape.items() if s > 1]
  return f'{" x ".join(parts) or "one device"} ({mesh.devices.size} devices)'
