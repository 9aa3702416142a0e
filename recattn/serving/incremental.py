"""Incremental inference: a user's state after each new event.

A trained sequence model (`models.base.SequenceRecommender`) answers "what
next?" from the state at the newest position of its window. Re-running the
whole window for every event costs a forward pass over `max_len` items;
here each block's attention core keeps what later positions need, so one
event costs one position's forward pass:

* every softmax-family variant (`dot`, `scaled_dot`, `blockwise`, `local`,
  `hstu`, `low_rank`, `additive`, `din`): the keys and values of every
  window position, per block (HSTU's cached k/v; `u` and `q` are per
  position and never needed again);
* `linear`: the running sums `S = sum phi(k) v^T` and `z = sum phi(k)` per
  block, O(1) per event whatever the window.

The new position's query attends to the cached keys through the variant's
own function (queries are right-aligned to keys, `attention.Mask`), so the
cached state is the variant's, not a re-implementation, and any block that
computes its q, k, v per position and calls the core made by
`attention.layer` gets a cache for free.

Exactness. After n <= max_len events the state equals `model.encode` over
the same n events in a `max_len`-wide, left-padded window (the evaluator's
layout), to float32 rounding. Past max_len the window drops its oldest item,
as training's truncation does; the dropped item had shaped every later key
and value, so no cache survives it: such an event re-encodes the window
(`encode_window`), which is what the model would compute anyway.

Positions. `model.positions="right"` (SASRec's original: counted back from
the newest item) moves every position at every event, so such models have
no reusable cache (`cacheable` says why) and are served by re-encoding the
window per event; `"left"` and `"none"` keep earlier positions fixed.

Every function here is pure in `(params, arrays)` with the model's graphdef
closed over, so it can be jitted and exported (`recattn.serving.export`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from recattn import attention
from recattn.attention import linear as linear_lib
from recattn.models import base


def _core_types() -> tuple[type, ...]:
  mods = tuple(v.module for v in attention.REGISTRY.values() if v.module)
  return (attention._Stateless,) + mods  # pylint: disable=protected-access


def _variant_of(core) -> str:
  """Registry name of the variant an attention core runs."""
  for name, variant in attention.REGISTRY.items():
    fn = getattr(getattr(core, "fn", None), "func", None)
    if fn is variant.fn or (variant.module and type(core) is variant.module):
      return name
  raise ValueError(f"unknown attention core {type(core).__name__}")


def _padded_normalizer(core) -> bool:
  fn = getattr(core, "fn", None)
  return (_variant_of(core) == "hstu" and
          getattr(fn, "keywords", {}).get("normalizer", "padded") == "padded")


# Variants whose candidate outputs `score_targets` computes exactly: `local`
# would count its window from each candidate's slot in the key layout, and
# `low_rank` cannot mask candidates from each other.
TARGET_VARIANTS_UNSUPPORTED = ("local", "low_rank")


def check_targets(model) -> None:
  """Raises ValueError unless `score_targets` supports `model`."""
  if model.rank_head is None:
    model.target_logits(None)  # raises: no ranking head
  for block in model.blocks:
    for _, _, core in _cores(block):
      name = _variant_of(core)
      if name in TARGET_VARIANTS_UNSUPPORTED:
        raise ValueError(
            f"model.attention={name!r} cannot score candidate lists "
            f"(model.rank_head); unsupported: "
            f"{list(TARGET_VARIANTS_UNSUPPORTED)}")


def _cores(block) -> list[tuple[object, str, object]]:
  """`(parent, attribute, core)` of every attention core inside `block`."""
  types = _core_types()
  found = []
  for path, module in nnx.iter_modules(block):
    if isinstance(module, types):
      parent = block
      for part in path[:-1]:
        parent = (parent[part] if isinstance(part, int)
                  else getattr(parent, part))
      found.append((parent, path[-1], module))
  return found


def cacheable(model: base.SequenceRecommender) -> tuple[bool, str]:
  """Whether appending an event can reuse cached state, and if not why."""
  if model.positions == "right":
    return False, ("model.positions='right' counts positions back from the "
                   "newest item, so every event moves every earlier item's "
                   "position embedding (and its keys and values); train with "
                   "model.positions='left' or 'none' for an incremental "
                   "cache")
  for block in model.blocks:
    cores = _cores(block)
    if len(cores) != 1:
      return False, (f"{type(block).__name__} has {len(cores)} attention "
                     "cores; the cache handles one per block")
  return True, ""


class _KVCore:
  """Wraps a core: records k/v over a window, or attends from new positions.

  mode "record": a full-window call; keeps k, v `[B, W, H, D]`.
  mode "append": `k`, `v` hold the window before the event; the new
  position's k/v are appended (the oldest slot, empty while the window
  fills, is dropped) and the new query attends over the whole window.
  mode "targets": `k`, `v` hold the history; the candidates' k/v follow
  it (nothing dropped) and the mask (`num_targets`) keeps candidates apart.
  """

  def __init__(self, inner, mode: str, k=None, v=None):
    self.inner, self.mode, self.k, self.v = inner, mode, k, v

  def __call__(self, q, k, v, mask, bias=None, **kwargs):
    if self.mode == "append":
      k = jnp.concatenate([self.k[:, k.shape[1]:], k], axis=1)
      v = jnp.concatenate([self.v[:, v.shape[1]:], v], axis=1)
    elif self.mode == "targets":
      width = self.k.shape[1]
      k = jnp.concatenate([self.k.astype(k.dtype), k], axis=1)
      v = jnp.concatenate([self.v.astype(v.dtype), v], axis=1)
      out, weights = self.inner(q, k, v, mask, bias, **kwargs)
      if _padded_normalizer(self.inner):
        # HSTU's "padded" normaliser divides by the key count: the window's
        # W, not the W + T keys laid out here for T candidates.
        out = out * ((width + q.shape[1]) / width)
      return out, weights
    self.k, self.v = k, v
    return self.inner(q, k, v, mask, bias, **kwargs)

  def state(self) -> dict:
    return {"k": self.k, "v": self.v}


class _LinearCore:
  """`linear`'s O(1) state: `S [B, H, F, D]`, `z [B, H, F]` over the keys."""

  def __init__(self, inner, mode: str, s=None, z=None):
    self.inner, self.mode, self.s, self.z = inner, mode, s, z
    self.feature = inner.fn.keywords.get("feature", "elu")

  def __call__(self, q, k, v, mask, bias=None, **kwargs):
    fk = linear_lib.feature_map(k, self.feature)
    if self.mode == "targets":
      # Each candidate sees the history's sums and its own key only.
      fq = linear_lib.feature_map(q, self.feature)  # [B, T, H, F]
      v32 = v.astype(jnp.float32)
      num = (jnp.einsum("blhf,bhfd->blhd", fq, self.s)
             + jnp.sum(fq * fk, -1)[..., None] * v32)
      if self.feature == "elu":
        den = (jnp.einsum("blhf,bhf->blh", fq, self.z)
               + jnp.sum(fq * fk, -1))[..., None]
        out = num / jnp.where(den > 0, den, 1.0)
      else:
        out = num / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
      return out.astype(q.dtype), None
    if self.mode == "record":
      # Keys the window's newest query sees (left padding is invalid).
      if mask.key_valid is not None:
        fk = fk * mask.key_valid[:, :, None, None]
      v32 = v.astype(jnp.float32)
      self.s = jnp.einsum("blhf,blhd->bhfd", fk, v32)
      self.z = jnp.sum(fk, axis=1)
      return self.inner(q, k, v, mask, bias, **kwargs)
    # One new position (always valid); same normaliser as linear.reference.
    self.s = self.s + jnp.einsum("blhf,blhd->bhfd", fk,
                                 v.astype(jnp.float32))
    self.z = self.z + jnp.sum(fk, axis=1)
    fq = linear_lib.feature_map(q, self.feature)  # [B, 1, H, F]
    num = jnp.einsum("blhf,bhfd->blhd", fq, self.s)
    if self.feature == "elu":
      den = jnp.einsum("blhf,bhf->blh", fq, self.z)[..., None]
      out = num / jnp.where(den > 0, den, 1.0)
    else:
      out = num / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
    return out.astype(q.dtype), None

  def state(self) -> dict:
    return {"s": self.s, "z": self.z}


def _wrap(model, mode: str, cache: dict | None, kv_only: bool = False):
  """Swaps every block's core for a caching one; returns the wrappers.

  `kv_only`: record keys and values for `linear` too (training's candidate
  pass sums them over each row's own history, `_linear_sums`).
  """
  wrappers = []
  for i, block in enumerate(model.blocks):
    (parent, name, core), = _cores(block)
    mine = {} if cache is None else {
        key.split(".", 1)[1]: value for key, value in cache.items()
        if key.startswith(f"b{i}.")}
    linear = _variant_of(core) == "linear" and not kv_only
    wrapper = (_LinearCore if linear else _KVCore)(core, mode, **mine)
    setattr(parent, name, wrapper)
    wrappers.append((parent, name, wrapper))
  return wrappers


def _unwrap(wrappers) -> None:
  for parent, name, wrapper in wrappers:
    setattr(parent, name, wrapper.inner)


def _collect(wrappers) -> dict:
  return {f"b{i}.{key}": value for i, (_, _, w) in enumerate(wrappers)
          for key, value in w.state().items()}


def cache_spec(model, window: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """`{name: (shape without batch, dtype)}` of one user's cache."""
  items = jnp.zeros((1, window), jnp.int32)
  times = jnp.zeros((1, window), jnp.int32)

  def run(model):
    return encode_window(model, items, times)[1]

  shapes = jax.eval_shape(run, model)
  return {k: (tuple(v.shape[1:]), str(v.dtype)) for k, v in shapes.items()}


def encode_window(model, items: jax.Array, times: jax.Array | None):
  """Full forward over windows; returns `(h [B, D], cache)`.

  Args:
    model: the (merged) model; its attention cores are swapped for
      recording ones for the call (and put back after it).
    items: `[B, W]` left-padded item ids (W = max_len).
    times: `[B, W]` int32 seconds aligned with `items`, or None.
  """
  wrappers = _wrap(model, "record", None)
  try:
    h = model.encode(items, times=_times_or_none(model, times))
  finally:
    _unwrap(wrappers)
  return h[:, -1], _collect(wrappers)


def _times_or_none(model, times):
  return times if base.uses_time(model.rel_bias) else None


def append(model, cache: dict, items: jax.Array, times: jax.Array | None,
           item: jax.Array, time: jax.Array | None):
  """One new event per user on a window that is not full.

  Args:
    model: the (merged) model; its cores are swapped for the call.
    cache: `encode_window`'s or `append`'s cache for `items`.
    items: `[B, W]` the window BEFORE the event (its first slot is empty).
    times: `[B, W]` int32 or None.
    item: `[B]` new item ids (> 0).
    time: `[B]` int32 new timestamps, or None.

  Returns:
    `(h [B, D], cache, items, times)` after the event.
  """
  width = items.shape[1]
  items = jnp.concatenate([items[:, 1:], item[:, None]], axis=1)
  if times is not None:
    times = jnp.concatenate([times[:, 1:], time[:, None]], axis=1)
  valid = items > 0
  if model.positions == "left":
    pos = jnp.sum(valid, axis=1, keepdims=True) - 1
  else:  # "none" (or "right", never cached: see `cacheable`)
    pos = jnp.full((items.shape[0], 1), width - 1)
  x = model.embed_at(item[:, None], pos)
  mask = attention.Mask(causal=True, key_valid=valid)
  bias = model.attention_bias(_times_or_none(model, times))
  wrappers = _wrap(model, "append", cache)
  try:
    for block in model.blocks:
      x, _ = block(x, mask, bias, rngs=None)
  finally:
    _unwrap(wrappers)
  h = model.output(x)[:, 0]
  return h, _collect(wrappers), items, times


def encode_recording(model, items: jax.Array, times: jax.Array | None, *,
                     rngs=None):
  """`model.encode` that also returns every block's keys and values.

  For training's candidate pass: `(h [B, W, D], cache)`, the cache holding
  k/v for every variant (`linear` too), so that `score_targets(..., cut=)`
  can take each row's history up to its own cut. The model's cores are
  restored afterwards.
  """
  wrappers = _wrap(model, "record", None, kv_only=True)
  try:
    h = model.encode(items, times=_times_or_none(model, times), rngs=rngs)
  finally:
    _unwrap(wrappers)
  return h, _collect(wrappers)


def _linear_sums(model, cache: dict, visible: jax.Array) -> dict:
  """`linear` blocks' cached k/v -> the sums S, z over `visible` keys."""
  out = dict(cache)
  for i, block in enumerate(model.blocks):
    (_, _, core), = _cores(block)
    if _variant_of(core) != "linear" or f"b{i}.k" not in cache:
      continue
    feature = core.fn.keywords.get("feature", "elu")
    fk = linear_lib.feature_map(out.pop(f"b{i}.k"), feature)
    fk = fk * visible[:, :, None, None]
    v32 = out.pop(f"b{i}.v").astype(jnp.float32)
    out[f"b{i}.s"] = jnp.einsum("blhf,blhd->bhfd", fk, v32)
    out[f"b{i}.z"] = jnp.sum(fk, axis=1)
  return out


def score_targets(model, cache: dict, items: jax.Array,
                  times: jax.Array | None, candidates: jax.Array, *,
                  cut: jax.Array | None = None, rngs=None) -> jax.Array:
  """Target-aware logits `[B, T]` of T candidates per user, in one pass.

  M-FALCON's layout (generative-recommenders' HSTU): the candidates follow
  the history as T extra tokens that all take the slot after the history
  (position, timestamp of the newest history item); each sees the history
  and itself, never another candidate (`attention.Mask(num_targets=T)`).
  Attending to the cached keys and values, T candidates cost T positions'
  forward pass, and each gets exactly the logit it would get scored alone
  after the same history. The model's ranking head
  (`config.model.rank_head`) maps a candidate's output to its logit.

  Args:
    model: the (merged) model, with a rank head; its cores are swapped
      for the call.
    cache: `encode_window`'s / `append`'s cache for `items`, or
      `encode_recording`'s (keys and values for every variant).
    items: `[B, W]` the windows the cache was made from.
    times: `[B, W]` int32, or None.
    candidates: `[B, T]` item ids (> 0).
    cut: `[B]` int, optional: each row's history is `items[:, :cut + 1]`
      (training scores the next item of a random position; the keys of a
      causal window's prefix are the prefix's own, with `positions` left or
      none). None: the whole window.
    rngs: dropout rngs (training), or None.
  """
  check_targets(model)
  b, w = items.shape
  t = candidates.shape[1]
  visible = items > 0
  if cut is not None:
    visible = visible & (jnp.arange(w)[None] <= cut[:, None])
  # The slot after the history; a full window's candidates share the last
  # slot with its newest item (the position table has W rows).
  slot = jnp.minimum(jnp.sum(visible, axis=1), w - 1)
  x = model.embed_at(candidates, jnp.broadcast_to(slot[:, None], (b, t)))
  x = model.dropout(x, rngs=rngs, deterministic=rngs is None)
  mask = attention.Mask(
      causal=True, num_targets=t,
      key_valid=jnp.concatenate([visible, jnp.ones((b, t), bool)], axis=1))
  bias = None
  if base.uses_time(model.rel_bias):
    last = w - 1 if cut is None else cut
    now = jnp.take_along_axis(
        times, jnp.broadcast_to(jnp.asarray(last), (b,))[:, None], axis=1)
    bias = model.attention_bias(jnp.concatenate(
        [times, jnp.broadcast_to(now, (b, t))], axis=1))
  wrappers = _wrap(model, "targets", _linear_sums(model, cache, visible))
  try:
    for block in model.blocks:
      x, _ = block(x, mask, bias, rngs=rngs)
  finally:
    _unwrap(wrappers)
  return model.target_logits(x)
