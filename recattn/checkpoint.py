"""Orbax checkpoints: `latest` for resuming, `best` chosen on validation.

A checkpoint holds the train state pytree plus a small JSON of loop
bookkeeping (epoch, best validation score, patience). Saved at epoch ends
only, so that with the per-epoch data order and per-step RNG derived from
the seed, a resumed run replays exactly the uninterrupted one.

A checkpoint restores onto any mesh shape (e.g. saved on 8 devices,
restored on 4): arrays land on the template's shardings. The item table
and its optimizer moments are padded with zero rows to a multiple of the
`model` axis size (`SequenceRecommender.pad_item_rows`), so their saved row
count can differ from the template's; such arrays are restored at the saved
shape and then cut or zero-padded to the template's rows (exact: the
padding rows are zeros). Any other shape mismatch is refused.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

# Logical axis of the item rows (see sharding.py): the only axis whose size
# may differ between the checkpoint and the template.
ITEMS = "items"


class Checkpoints:
  """The `latest` and `best` checkpoint managers under `<workdir>/ckpt`."""

  def __init__(self, workdir: str):
    root = os.path.join(os.path.abspath(workdir), "ckpt")

    def manager(name):
      # Across processes the two managers save the same step back to back:
      # their barriers need distinct names, and saves are synchronous (two
      # managers' background saves raced on shared barriers).
      opts = ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True,
          enable_async_checkpointing=jax.process_count() == 1,
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              barrier_sync_key_prefix=name))
      # Handlers named up front, so that a fresh manager (a resumed run)
      # can read the saved arrays' shapes before restoring.
      return ocp.CheckpointManager(
          os.path.join(root, name), options=opts,
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()})

    self.latest = manager("latest")
    self.best = manager("best")

  @staticmethod
  def _save(manager, step: int, state, meta: dict) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=True)

  @staticmethod
  def _restore(manager, template, step=None):
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    saved = _saved_shapes(manager.item_metadata(step)["state"])
    target, resized = _restore_target(template, saved)
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        meta=ocp.args.JsonRestore()))
    state = out.state
    if resized:
      state = jax.tree_util.tree_map_with_path(
          lambda path, x: (_resize_rows(x, *resized[_key(path)])
                           if _key(path) in resized else x), state)
    return state, out.meta

  def save_latest(self, step: int, state, meta: dict) -> None:
    self._save(self.latest, step, state, meta)

  def save_best(self, step: int, state, meta: dict) -> None:
    self._save(self.best, step, state, meta)

  def restore_latest(self, template):
    """(state, meta) of the newest `latest` checkpoint, or None."""
    return self._restore(self.latest, template)

  def restore_best(self, template):
    """(state, meta) of the best-on-validation checkpoint, or None."""
    self.best.wait_until_finished()
    return self._restore(self.best, template)

  def close(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()
    self.latest.close()
    self.best.close()


def _key(path) -> tuple[str, ...]:
  """A tree path as strings, equal for the template and the saved metadata.

  The template reaches a Variable's array by attribute (`.value`) and an
  nnx list by int index; orbax's metadata tree uses dict keys for both.
  """
  out = []
  for entry in path:
    for attr in ("key", "idx", "name"):
      if hasattr(entry, attr):
        out.append(str(getattr(entry, attr)))
        break
    else:
      out.append(str(entry))
  return tuple(out)


def _path_str(key) -> str:
  return "/".join(key)


def _saved_shapes(metadata) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(metadata)[0]
  return {_key(path): tuple(m.shape) for path, m in leaves
          if hasattr(m, "shape")}


def _item_row_keys(template) -> set:
  """Paths of the arrays whose leading axis is the logical `items` axis.

  Read from the Variables' `out_sharding` metadata, which the optimizer
  moments share with their parameters (see `sharding.state_shardings`).
  """
  keys = set()
  is_var = lambda x: isinstance(x, nnx.Variable)
  for path, v in jax.tree_util.tree_flatten_with_path(template,
                                                      is_leaf=is_var)[0]:
    if not is_var(v):
      continue
    names = v.get_metadata().get("out_sharding") or ()
    if names and names[0] == ITEMS:
      for sub, _ in jax.tree_util.tree_flatten_with_path(v)[0]:
        keys.add(_key(path + sub))
  return keys


def _restore_target(template, saved):
  """The tree to restore into, and `{path: (rows, sharding)}` to resize.

  Leaves whose shape matches the checkpoint restore straight onto the
  template's sharding. Item-row arrays differing only in dim 0 (padding
  rows) restore at the saved shape: split like the template where the saved rows
  divide over the same devices, otherwise replicated on its mesh.
  """
  resized = {}
  item_rows = _item_row_keys(template)

  def one(path, x):
    key = _key(path)
    if key not in saved or not hasattr(x, "shape"):
      return x  # orbax itself reports a tree that does not match
    have, want = saved[key], tuple(x.shape)
    if have == want:
      return x
    if (key not in item_rows or len(have) != len(want) or
        have[1:] != want[1:]):
      raise ValueError(
          f"checkpoint array {_path_str(key)!r} has shape {have}, the "
          f"restore template {want}; only the row count of arrays over "
          f"the logical {ITEMS!r} axis (their mesh padding) may differ")
    target = getattr(x, "sharding", None)
    load = target
    if isinstance(target, NamedSharding):
      row_axes = target.spec[0] if target.spec else None
      row_axes = (row_axes,) if isinstance(row_axes, str) else row_axes or ()
      shards = int(np.prod([target.mesh.shape[a] for a in row_axes]))
      if have[0] % shards:
        load = NamedSharding(target.mesh, P())
    resized[key] = (want[0], target, _path_str(key))
    return jax.ShapeDtypeStruct(have, x.dtype, sharding=load)

  return jax.tree_util.tree_map_with_path(one, template), resized


def _resize_rows(x, rows: int, sharding, name: str):
  """`x` cut or zero-padded to `rows` rows, placed on `sharding`.

  Raises ValueError if a cut row is not zero: then the checkpoint holds a
  different catalogue, not the same one padded for another mesh.
  """
  have = x.shape[0]
  if rows < have:
    dropped = bool(jax.jit(lambda a: jnp.any(a[rows:] != 0))(x))
    if dropped:
      raise ValueError(
          f"checkpoint array {name!r} of shape {x.shape}: rows "
          f"{rows}..{have - 1} are not zero, so they are items, not "
          f"padding, but the template has {rows} rows (a different "
          "catalogue?)")
    fn = lambda a: a[:rows]
  else:
    fn = lambda a: jnp.pad(a, ((0, rows - have),) + ((0, 0),) * (a.ndim - 1))
  if sharding is None:
    return fn(x)
  return jax.jit(fn, out_shardings=sharding)(x)
