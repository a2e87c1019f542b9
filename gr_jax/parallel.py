"""Data parallelism as sharded ``jit``: one mesh axis over all devices, the batch split along it.

The train step is written for one global batch; sharding the batch over the ``data`` axis and
replicating everything else lets XLA insert the all-reduces. Gradients, and therefore the per-class
norms Φ, α, r and β of the reweighting, are those of the global batch, and BatchNorm statistics are
computed over the global batch (synchronised BN), so 1 and N devices agree up to float rounding.
"""

import os
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def initialize_distributed() -> None:
  """Joins a multi-host run when launched as one; a no-op on a single host.

  Either set ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` on every host, or launch under a cluster manager JAX detects by itself
  (Slurm with several tasks, Open MPI). See docs/multi_host.md.
  """
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
    if missing:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not: set "
                       "JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host (docs/multi_host.md)")
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]))
  elif int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()


def check_num_devices(num_devices: int | None) -> None:
  """ValueError naming the fix unless ``config.num_devices`` is None (all devices) or at most the
  devices visible; on the CPU the fix is a forced host device count, elsewhere a smaller number."""
  if num_devices is None:
    return
  if not isinstance(num_devices, (int, np.integer)) or isinstance(num_devices, bool) \
      or num_devices < 1:
    raise ValueError(f"config.num_devices={num_devices!r}: use None (all visible devices) or a "
                     "positive integer")
  devices = jax.devices()
  if num_devices <= len(devices):
    return
  platform = devices[0].platform
  message = (f"config.num_devices={num_devices}, but {len(devices)} {platform} "
             f"device{'s are' if len(devices) > 1 else ' is'} visible")
  if platform == "cpu":
    raise ValueError(f"{message}: to split the CPU into {num_devices} devices, start with "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} (added to "
                     "any XLA_FLAGS already set), or leave config.num_devices unset (None) for all "
                     "devices")
  raise ValueError(f"{message} ({', '.join(str(d) for d in devices)}): use at most "
                   f"{len(devices)}, or leave config.num_devices unset (None) for all of them")


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-d mesh over the first ``num_devices`` devices (all by default)."""
  devices = jax.devices()
  if num_devices is not None:
    check_num_devices(num_devices)
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


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a possibly sharded array as NumPy, also when its shards span several hosts."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
