"""Device mesh and placements: batches split over `data`, state replicated.

jit over a `Mesh` (no pmap) from day one, so the same step runs on one CPU,
8 simulated devices or a GPU host. Item-table sharding over a `model` axis
arrives with the scale-out work.
"""

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


def make_mesh(num_data: int = -1) -> jax.sharding.Mesh:
  """A 1-D mesh over `data`; -1 uses every device."""
  n = jax.device_count() if num_data == -1 else num_data
  if n < 1 or n > jax.device_count():
    raise ValueError(f"mesh.data={num_data}: allowed -1 or 1.."
                     f"{jax.device_count()} (the devices present)")
  # Auto axes: XLA propagates shardings through the model, so the model code
  # needs no sharding annotations of its own.
  return jax.make_mesh((n,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
