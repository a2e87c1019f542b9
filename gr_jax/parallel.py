"""Data parallelism as sharded ``jit``: one mesh axis over all devices, the batch split along it.

The train step is written for one global batch; sharding the batch over the ``data`` axis and
replicating everything else lets XLA insert the all-reduces. Gradients, and therefore the per-class
norms Φ, α, r and β of the reweighting, are those of the global batch, and BatchNorm statistics are
computed over the global batch (synchronised BN), so 1 and N devices agree up to float rounding.
"""

from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def initialize_distributed() -> None:
  """Joins a multi-host run when launched as one (no-op on a single host)."""
  import os  # pylint: disable=g-import-not-at-top
  if any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")):
    jax.distributed.initialize()


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-d mesh over the first ``num_devices`` devices (all by default)."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices but only {len(devices)} are visible")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_batch(batch_size: int, mesh: Mesh) -> None:
  if batch_size % mesh.size:
    raise ValueError(f"batch size {batch_size} does not split over {mesh.size} devices; use a "
                     f"multiple of {mesh.size} (config.optim.batch_size)")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def shard_batch_axis(x: jax.Array, mesh: Mesh, axis: int = 0) -> jax.Array:
  """Constrains ``x`` (inside jit) to be split over devices along ``axis``."""
  spec = [None] * x.ndim
  spec[axis] = DATA_AXIS
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))
