"""Multi-process runs: `jax.distributed` set-up and per-process batches.

One process per host (GPU node, TPU VM worker; or several on one machine
for tests). Every process runs the same program on the same data order
(same seed) but builds and places only the batch rows its own devices
hold: `local_rows` says which, `place` assembles the global `jax.Array`
from each process's part. With one process both are the identity and
`place` is `jax.device_put`.

Host reads need fully replicated arrays (the trainer pins losses to a
replicated sharding; evaluation sums are scalars) or `gather`.

With `data.process_shards` each process instead holds its own users
(`SequenceDataset.shard`); the few numbers the processes must agree on
(steps per epoch, each step's window, item counts) go through
`host_allgather`.
"""

import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

ENV_AUTO = "RECATTN_DISTRIBUTED"


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               auto: bool = False) -> bool:
  """Starts `jax.distributed` when asked; a no-op for one process.

  Must run before anything touches devices (`jax.devices()`, arrays).

  Args:
    coordinator_address: `host:port` of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: this process's index, 0..num_processes-1.
    auto: let JAX detect the three from the cluster environment (SLURM,
      Cloud TPU, Open MPI, Kubernetes...). Also switched on by the
      environment variable `RECATTN_DISTRIBUTED=1`.

  Returns True when `jax.distributed` was initialised.
  """
  explicit = (coordinator_address, num_processes, process_id)
  auto = auto or os.environ.get(ENV_AUTO, "") not in ("", "0")
  if not auto and all(v is None for v in explicit):
    return False
  if not auto and None in explicit:
    raise ValueError(
        "--coordinator_address, --num_processes and --process_id go "
        f"together (got {explicit}); or pass --distributed=auto / "
        f"{ENV_AUTO}=1 to detect them from the cluster environment")
  if not auto and num_processes == 1:
    return False
  # Cross-process collectives on CPU (tests, CPU clusters); gloo is jax
  # 0.10's default, set explicitly so a changed default cannot silently
  # leave CPU processes without collectives. Ignored on GPU/TPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local of %d devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  """True on the process that writes run records (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches `name`; a no-op for one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def local_rows(sharding, batch_size: int) -> slice:
  """The rows of a `[batch_size, ...]` batch this process's devices hold.

  Read from `sharding.addressable_devices_indices_map`, not assumed: with
  the default device order a `data`-sharded batch gives process p rows
  `[p * B / P, (p + 1) * B / P)`; replicated axes give every process all.

  Raises:
    ValueError if this process's rows are not one contiguous range (a mesh
    whose device order interleaves processes along `data`).
  """
  indices = sharding.addressable_devices_indices_map((batch_size,))
  spans = sorted({idx[0].indices(batch_size)[:2] for idx in indices.values()})
  if not spans:
    return slice(0, 0)
  lo, hi = spans[0]
  for start, stop in spans[1:]:
    if start > hi:
      raise ValueError(
          f"process {jax.process_index()} holds batch rows {spans}, not one "
          "contiguous range; build the mesh from jax.devices() in order")
    hi = max(hi, stop)
  return slice(lo, hi)


def place(local_batch, sharding, batch_size: int):
  """Global batch arrays from this process's rows (see `local_rows`).

  Args:
    local_batch: pytree of numpy arrays, leading axis the rows
      `local_rows(sharding, batch_size)` of the global batch.
    sharding: the batch sharding (leading axis split).
    batch_size: global number of rows.
  """
  if jax.process_count() == 1:
    return jax.device_put(local_batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(
          sharding, np.asarray(x), (batch_size,) + np.shape(x)[1:]),
      local_batch)


def gather(x):
  """Host numpy value of a (possibly process-spanning) array pytree."""
  if jax.process_count() == 1:
    return jax.device_get(x)
  return multihost_utils.process_allgather(x, tiled=True)


def host_allgather(x) -> np.ndarray:
  """`[P, ...]`: every process's host value `x` (same shape and dtype).

  For the small numbers processes must agree on (row counts, per-step
  windows, item counts); with one process it is `x[None]` and needs no
  devices.
  """
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  if x.dtype.itemsize == 8:
    # Without jax_enable_x64 JAX would cut int64 / float64 to 32 bits (unix
    # seconds, large counts): send the bits as pairs of uint32.
    bits = np.ascontiguousarray(x).reshape(-1).view(np.uint32)
    out = np.asarray(multihost_utils.process_allgather(bits, tiled=False))
    return np.ascontiguousarray(out).view(x.dtype).reshape((-1,) + x.shape)
  return np.asarray(multihost_utils.process_allgather(x, tiled=False))
