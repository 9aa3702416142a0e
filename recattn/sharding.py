"""Device mesh, logical axis rules, placements and the sharded top-k.

A 2-D mesh `("data", "model")` (jit over a `Mesh`, no pmap): batches are
split over `data`, the item-embedding table (and its optimizer moments) by
rows over `model`. Parameters name *logical* axes in their metadata
(`nnx.with_partitioning(init, ("items", None))`); `config.mesh.rules` maps
logical axes to mesh axes, e.g. `(("batch", "data"), ("items", "model"))`.

Scores over the whole catalogue are never gathered: `top_k_over_shards`
(inside `jax.shard_map`) takes each shard's local top-k, all-gathers only
those `k * model` candidates per row and takes the final top-k.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "model")
DEFAULT_RULES = (("batch", "data"), ("items", "model"))


def make_mesh(data: int = -1, model: int = 1) -> jax.sharding.Mesh:
  """A `(data, model)` mesh; one of the two sizes may be -1 (the rest).

  The mesh may use fewer devices than are present (e.g. `data=1` for a
  single-device run on a multi-device host), never more.

  Raises:
    ValueError naming `config.mesh.data` / `config.mesh.model`, their values
    and the device count when the mesh cannot be built from the devices.
  """
  n = jax.device_count()
  fields = (f"config.mesh.data={data}, config.mesh.model={model} "
            f"({n} devices present)")
  if data == -1 and model == -1:
    raise ValueError(f"{fields}: at most one of the two may be -1")
  for value in (data, model):
    if not isinstance(value, int) or (value < 1 and value != -1):
      raise ValueError(f"{fields}: each must be -1 or a positive integer")
  if data == -1 or model == -1:
    fixed = model if data == -1 else data
    if n % fixed:
      raise ValueError(f"{fields}: -1 takes the remaining devices, but "
                       f"{fixed} does not divide {n}")
    data, model = (n // fixed, model) if data == -1 else (data, n // fixed)
  if data * model > n:
    raise ValueError(f"{fields}: data * model = {data * model} devices "
                     f"needed; allowed products are 1..{n}")
  # Auto axes: XLA propagates the parameter and batch shardings through the
  # model, so model code needs no sharding annotations of its own.
  return jax.make_mesh((data, model), AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:data * model])


def logical_to_spec(names, rules=DEFAULT_RULES) -> P:
  """`PartitionSpec` for logical axis names, e.g. `("items", None)`.

  None (or a name the rules map to None) means replicated along that axis.
  """
  table = dict(rules)
  spec = []
  for name in names:
    if name is None:
      spec.append(None)
    elif name not in table:
      raise ValueError(f"logical axis {name!r} has no rule in "
                       f"config.mesh.rules={tuple(rules)!r}")
    else:
      if table[name] not in AXES + (None,):
        raise ValueError(f"config.mesh.rules maps {name!r} to "
                         f"{table[name]!r}; mesh axes are {AXES}")
      spec.append(table[name])
  return P(*spec)


def batch_sharding(mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) axis split as the `batch` rule says (over `data`)."""
  return NamedSharding(mesh, logical_to_spec(("batch",), rules))


def axis_size(mesh, logical: str, rules=DEFAULT_RULES) -> int:
  """Number of shards the `logical` axis is split into (1: replicated)."""
  axis = logical_to_spec((logical,), rules)[0]
  return 1 if axis is None else mesh.shape[axis]


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(tree, mesh, rules=DEFAULT_RULES):
  """`NamedSharding`s for a tree of `nnx.Variable`s and plain arrays.

  Variables follow their logical `out_sharding` metadata through `rules`;
  optax moments built by `tx.init(params)` keep the parameters' metadata,
  so they follow the same rules. Everything else is replicated.
  """

  def one(x):
    if isinstance(x, nnx.Variable):
      names = x.get_metadata().get("out_sharding")
      spec = logical_to_spec(names, rules) if names else P()
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P()) if hasattr(x, "shape") else None

  return jax.tree.map(one, tree,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def top_k_over_shards(local_scores, local_ids, k: int, axis: str = "model"):
  """Inside `shard_map`: the top-k over `axis` from each shard's candidates.

  Args:
    local_scores: `[B, n]` this shard's scores.
    local_ids: `[n]` or `[B, n]` their global ids.
    k: how many to keep; must be <= n * (size of `axis`).

  Returns `(values [B, k], ids [B, k])`, identical to `lax.top_k` on the
  gathered scores (ties broken towards the lower id, as `lax.top_k` does,
  provided ids increase with the shard index and within a shard).
  """
  kk = min(k, local_scores.shape[-1])
  values, pos = jax.lax.top_k(local_scores, kk)
  ids = jnp.take_along_axis(
      jnp.broadcast_to(local_ids, local_scores.shape), pos, axis=-1)
  # [B, kk * shards], ordered by shard then local rank: only candidates move.
  values = jax.lax.all_gather(values, axis, axis=1, tiled=True)
  ids = jax.lax.all_gather(ids, axis, axis=1, tiled=True)
  values, pos = jax.lax.top_k(values, k)
  return values, jnp.take_along_axis(ids, pos, axis=-1)


def sharded_top_k(scores: jax.Array, k: int, mesh, rules=DEFAULT_RULES):
  """`lax.top_k(scores, k)` for `scores: [B, V]` sharded `(batch, items)`.

  Each `model` shard ranks its own columns; only `k` candidates per shard
  and row are gathered. A V that does not divide over `model` is padded
  with -inf columns (never chosen while k <= V). B must divide over `data`.
  """
  num_items = scores.shape[1]
  if k > num_items:
    raise ValueError(f"k={k} exceeds the {num_items} scored items")
  spec = logical_to_spec(("batch", "items"), rules)
  shards = 1 if spec[1] is None else mesh.shape[spec[1]]
  pad = -num_items % shards
  if pad:
    scores = jnp.pad(scores, ((0, 0), (0, pad)), constant_values=-jnp.inf)
  width = scores.shape[1] // shards

  def local(s):
    lo = 0 if spec[1] is None else jax.lax.axis_index(spec[1]) * width
    ids = lo + jnp.arange(width, dtype=jnp.int32)
    if spec[1] is None:
      values, pos = jax.lax.top_k(s, k)
      return values, jnp.take_along_axis(
          jnp.broadcast_to(ids, s.shape), pos, axis=-1)
    return top_k_over_shards(s, ids, k, spec[1])

  out = P(spec[0])
  # all_gather's result is equal on every `model` shard, but shard_map's
  # replication check cannot infer that (jax 0.10 has no public
  # all_gather_invariant), hence check_vma=False.
  return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=(out, out),
                       check_vma=False)(scores)
