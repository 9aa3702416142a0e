"""The model side of serving: per-user state, event updates, top-K.

`Engine` holds a trained model's parameters and three jitted functions
(`incremental.encode_window`, `incremental.append`, `top_k`); a user's
state is a flat dict of numpy arrays on the host, so a service can keep,
evict, snapshot and batch states without knowing the model:

  items  [W] int32    the window (left-padded, newest last), W = max_len
  times  [W] int32    their timestamps (seconds; zeros if the model has no
                      time bias)
  count  []  int64    events seen in all
  seen   [S] int32    the last S item ids (ring, newest last), excluded from
                      recommendations; S = `max_seen`
  h      [D] float32  the user state at the newest event
  b<i>.* per block    the attention cache (`incremental`), only when the
                      model is cacheable

One event costs one position's forward pass while the window fills; once it
is full (and always for `model.positions="right"` models) the event
re-encodes the window, exactly as the model sees it (see `incremental`).
Batches of users are padded to powers of two so that at most log2(max)
shapes are ever compiled.
"""

from __future__ import annotations

import json
import os
import time as time_lib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# Training code (models, checkpoints, data) is imported where a model is
# built, not here: an engine made from exported artefacts (`from_export`)
# runs with jax and numpy alone.

CACHES = ("auto", "kv", "none")


def _bucket(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


SCORINGS = ("exact", "int8")
MAX_CANDIDATES = 1024  # per user and `Engine.score` call
_INT8_BLOCK = 128  # rows per block of the int8 table (and of block_top_k)


def scoring_table(vectors: jax.Array, scoring: str = "exact") -> dict:
  """The arrays `top_k` scans: `{"vectors"}` plus an int8 copy for "int8".

  "int8" keeps the item rows as int8 with one scale for the whole table
  (symmetric, max-abs), in `_INT8_BLOCK`-row blocks (zero rows pad the
  last): the catalogue scan then reads a quarter of the bytes (at 10^6
  items x 64 dims, 64 MB instead of 256 MB per query, which bounds a CPU's
  latency). One scale ranks items like the int8 dot product itself, so the
  scan needs no per-row multiply; the best candidates are then re-scored
  exactly in float32.
  """
  if scoring not in SCORINGS:
    raise ValueError(f"scoring={scoring!r}: allowed values are "
                     f"{list(SCORINGS)}")
  table = {"vectors": vectors}
  if scoring == "int8":
    scale = jnp.max(jnp.abs(vectors)) / 127.0
    q = jnp.round(vectors / jnp.where(scale > 0, scale, 1.0))
    pad = -q.shape[0] % _INT8_BLOCK
    table["q"] = jnp.pad(q, ((0, pad), (0, 0))).astype(jnp.int8)
    table["scale"] = scale
  return table


def _exclude(scores, seen):
  scores = scores.at[:, 0].set(-jnp.inf)
  rows = jnp.arange(scores.shape[0])[:, None]
  return scores.at[rows, seen].set(-jnp.inf)


def block_top_k(scores: jax.Array, k: int, block: int = 128):
  """`jax.lax.top_k(scores, k)` over `[B, V]`, faster for k << V.

  The k best scores lie in the k blocks (of `block` items) with the highest
  maxima: a score outside them has k block maxima, k distinct scores, at
  least as high. So the block maxima pick k blocks and an exact top-k runs
  over their k * block scores only. Values equal `lax.top_k`'s; among
  tied scores the ids may differ. On this project's CPU it cuts the top-256
  of 10^6 scores from 1.5 ms to 0.7 ms
  (experiments/007_serving/scan_parts.py).
  """
  b, v = scores.shape
  n = -(-v // block)
  if n <= k:
    return jax.lax.top_k(scores, k)
  x = jnp.pad(scores, ((0, 0), (0, n * block - v)),
              constant_values=-jnp.inf).reshape(b, n, block)
  _, blocks = jax.lax.top_k(jnp.max(x, axis=2), k)  # [B, k]
  cand = jnp.take_along_axis(x, blocks[:, :, None], axis=1)
  values, pos = jax.lax.top_k(cand.reshape(b, k * block), k)
  ids = jnp.take_along_axis(blocks, pos // block, axis=1) * block + pos % block
  # Padding slots can only be picked as -inf fillers: keep ids in range.
  return values, jnp.minimum(ids, v - 1)


def top_k(table: dict, h: jax.Array, seen: jax.Array, k: int):
  """Best `k` items for user states `h [B, D]`, `seen [B, S]` excluded.

  Scores are inner products with the output item vectors
  `table["vectors"] [V+1, D]` (row 0, padding, is never returned). With an
  int8 copy (`scoring_table(..., "int8")`) the catalogue is scanned in int8
  (unscaled: one scale ranks alike) and the best `max(2k, 128)` candidates
  are re-scored in float32: returned
  scores are exact, and so is the list unless the int8 rounding pushed one
  of the true top k below that many candidates (`experiments/007_serving`
  measures the recall). Returns `(ids [B, k] int32, scores [B, k])`.
  """
  if "q" not in table:
    scores, ids = block_top_k(_exclude(h @ table["vectors"].T, seen), k)
    return ids.astype(jnp.int32), scores
  rows = table["vectors"].shape[0]
  rough = h @ table["q"].astype(h.dtype).T  # [B, rows + padding]
  rough = rough.at[:, rows:].set(-jnp.inf)
  n = min(max(2 * k, 128), rows)
  rough, cand = block_top_k(_exclude(rough, seen), n, _INT8_BLOCK)
  cand = jnp.minimum(cand, rows - 1)  # -inf fillers may name padding rows
  exact = jnp.einsum("bd,bnd->bn", h, table["vectors"][cand])
  exact = jnp.where(jnp.isfinite(rough), exact, -jnp.inf)
  scores, pick = jax.lax.top_k(exact, k)
  return jnp.take_along_axis(cand, pick, 1).astype(jnp.int32), scores


def state_spec(max_len: int, dim: int, max_seen: int) -> dict:
  """`{name: (shape, dtype)}` of a user's state without the cache."""
  return {"items": ((max_len,), "int32"), "times": ((max_len,), "int32"),
          "count": ((), "int64"), "seen": ((max_seen,), "int32"),
          "h": ((dim,), "float32")}


def restore_model(workdir: str, which: str = "best"):
  """`(model, config, dataset)` of a trained run's `best` or `latest` ckpt."""
  # pylint: disable=g-import-not-at-top
  import ml_collections
  from flax import nnx
  from recattn import checkpoint as checkpoint_lib
  from recattn import models
  from recattn import optim
  from recattn.data import loading as data_lib
  # pylint: enable=g-import-not-at-top
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.model.get("time_query", "own") != "own":
    raise ValueError(
        f"{workdir}/config.json: model.time_query="
        f"{config.model.time_query!r} measures attention from the time of "
        "the next event, which the serving engine does not take; serve a "
        "model trained with time_query 'own'")
  ds = data_lib.load(config.data)
  model = models.create_for_data(config, ds, seed=config.seed)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.make_optimizer(config.optimizer, 1)
  template = {"params": params, "opt_state": tx.init(params),
              "step": jnp.zeros((), jnp.int32)}
  ckpts = checkpoint_lib.Checkpoints(workdir)
  try:
    restored = (ckpts.restore_best(template) if which == "best"
                else ckpts.restore_latest(template))
  finally:
    ckpts.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir}/ckpt/{which}: no checkpoint to serve")
  # The parameters validation selected: their average with ema_decay > 0.
  return nnx.merge(graphdef, optim.averaged_params(restored[0])), config, ds


class Engine:
  """Per-user states and recommendations from one trained model.

  Built by `from_model` (in process), `from_workdir` (a trained run) or
  `from_export` (artefacts of `recattn.serving.export`, no model code).

  Attributes:
    max_len: window W.
    num_items: item ids 1..num_items (0 = padding).
    original_item_ids: `[num_items]`; internal id i is original id
      `original_item_ids[i - 1]`.
    cached: whether events update a cache (else they re-encode the window).
  """

  def __init__(self, *, encode_fn: Callable, append_fn: Callable,
               top_k_fn: Callable, params, table, spec: dict,
               cache_keys: tuple[str, ...], max_len: int, cached: bool,
               why_not_cached: str, uses_time: bool,
               original_item_ids: np.ndarray, popular: np.ndarray,
               info: dict, score_fn: Callable | None = None,
               why_no_score: str = "the model has no ranking head"):
    self.encode_fn, self.append_fn, self.top_k_fn = (encode_fn, append_fn,
                                                     top_k_fn)
    # `incremental.score_targets` (params, cache, items, times, candidates)
    # -> logits, for models with a ranking head; else None and why not.
    self.score_fn = score_fn
    self.why_no_score = "" if score_fn is not None else why_no_score
    self.params, self.table = params, table
    self.scoring = "int8" if "q" in table else "exact"
    self.spec = {k: (tuple(shape), str(dtype)) for k, (shape, dtype) in
                 spec.items()}
    self.cache_keys = tuple(cache_keys)
    self.max_len = max_len
    self.num_items = int(table["vectors"].shape[0]) - 1
    self.dim = int(table["vectors"].shape[1])
    self.max_seen = self.spec["seen"][0][0]
    self.cached, self.why_not_cached = cached, why_not_cached
    self.uses_time = uses_time
    self.original_item_ids = np.asarray(original_item_ids, np.int64)
    if len(self.original_item_ids) != self.num_items:
      raise ValueError(f"{len(self.original_item_ids)} original ids for "
                       f"{self.num_items} items")
    # Cold start (no event yet): most popular items first.
    self.popular = np.asarray(popular, np.int32)
    self.info = dict(info)
    self._model = None  # set by from_model, for `full_forward`

  @classmethod
  def from_model(cls, model, *, max_len: int, original_item_ids: np.ndarray,
                 cache: str = "auto", max_seen: int = 1024,
                 scoring: str = "exact", popular: np.ndarray | None = None,
                 info: dict | None = None) -> "Engine":
    """An engine around an in-process model (jitted functions)."""
    # pylint: disable=g-import-not-at-top
    from flax import nnx
    from recattn.models import base
    from recattn.serving import incremental
    # pylint: enable=g-import-not-at-top
    if cache not in CACHES:
      raise ValueError(f"cache={cache!r}: allowed values are {list(CACHES)}")
    ok, why = incremental.cacheable(model)
    if cache == "kv" and not ok:
      raise ValueError(f"cache='kv' is impossible for this model: {why}")
    cached = ok and cache != "none"
    graphdef, params = nnx.split(model)
    table = scoring_table(model.all_item_vectors(), scoring)

    def encode_fn(params, items, times):
      return incremental.encode_window(nnx.merge(graphdef, params), items,
                                       times)

    def append_fn(params, cache, items, times, item, time):
      return incremental.append(nnx.merge(graphdef, params), cache, items,
                                times, item, time)

    spec = state_spec(max_len, model.dim, max_seen)
    cache_spec = incremental.cache_spec(model, max_len) if cached else {}
    spec.update(cache_spec)
    engine = cls(
        encode_fn=jax.jit(encode_fn), append_fn=jax.jit(append_fn),
        # A closure per engine: its compiled shapes are its own (a jit of
        # the module-level function would share them across engines).
        top_k_fn=jax.jit(lambda *a: top_k(*a), static_argnums=3),
        params=params,
        table=table, spec=spec, cache_keys=tuple(cache_spec),
        max_len=max_len, cached=cached,
        why_not_cached="" if cached else (why or "cache='none'"),
        uses_time=base.uses_time(model.rel_bias),
        original_item_ids=original_item_ids,
        popular=(np.arange(1, model.num_items + 1) if popular is None
                 else popular), info=info or {})
    engine._model = (graphdef, params)
    uses_time = engine.uses_time
    try:
      incremental.check_targets(model)
      if not ok:
        raise ValueError(why)
    except ValueError as e:
      engine.why_no_score = str(e)
    else:
      def score_fn(params, cache, items, times, candidates):
        return incremental.score_targets(nnx.merge(graphdef, params), cache,
                                         items, times, candidates)
      engine.score_fn = jax.jit(score_fn)
      engine.why_no_score = ""

    def full_fn(params, items, times):
      model = nnx.merge(graphdef, params)
      return model.encode(items, times=times if uses_time else None,
                          last=1)[:, -1]

    engine._full_fn = jax.jit(full_fn)
    return engine

  @classmethod
  def from_workdir(cls, workdir: str, *, which: str = "best",
                   cache: str = "auto", max_seen: int = 1024,
                   scoring: str = "exact") -> "Engine":
    """Loads a trained run (`python -m recattn.main ... --workdir=...`)."""
    # pylint: disable=g-import-not-at-top
    from recattn import reporting
    from recattn.data import batching
    from recattn.data import dataset as dataset_lib
    from recattn.data import loading as data_lib
    # pylint: enable=g-import-not-at-top
    model, config, ds = restore_model(workdir, which)
    holdout = config.data.get("stream_holdout", 0.0)
    if holdout:  # popularity as the model was trained: without the replay
      ds, _ = dataset_lib.time_split(ds, holdout)
    counts = batching.item_counts(ds)
    popular = np.argsort(-counts[1:], kind="stable") + 1
    info = {"workdir": os.path.abspath(workdir), "checkpoint": which,
            "model": config.model.name, "attention": config.model.attention,
            "data": config.data.name,
            "commit": reporting.environment().get("commit")}
    return cls.from_model(
        model, max_len=config.data.max_len,
        original_item_ids=data_lib.original_item_ids(config.data),
        cache=cache, max_seen=max_seen, scoring=scoring, popular=popular,
        info=info)

  @classmethod
  def from_export(cls, directory: str) -> "Engine":
    """Loads `recattn.serving.export.export`'s artefacts (jax + numpy)."""
    from recattn.serving import export as export_lib  # pylint: disable=g-import-not-at-top
    return export_lib.load(directory, cls)

  def describe(self) -> dict[str, Any]:
    """JSON-able facts for health checks and benchmark records."""
    return {**self.info, "max_len": self.max_len,
            "num_items": self.num_items, "dim": self.dim,
            "cached": self.cached, "why_not_cached": self.why_not_cached,
            "uses_time": self.uses_time, "max_seen": self.max_seen,
            "scoring": self.scoring,
            "candidate_scoring": self.score_fn is not None,
            "why_no_candidate_scoring": self.why_no_score,
            "state_bytes": self.state_bytes()}

  def state_bytes(self) -> int:
    """Bytes of one user's state."""
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
               for shape, dtype in self.spec.values())

  def new_state(self) -> dict[str, np.ndarray]:
    """A user with no event yet."""
    return {k: np.zeros(shape, dtype) for k, (shape, dtype) in
            self.spec.items()}

  def _stack(self, states, keys, n: int):
    out = {}
    for key in keys:
      x = np.stack([s[key] for s in states])
      out[key] = np.concatenate(
          [x, np.zeros((n - len(states),) + x.shape[1:], x.dtype)])
    return out

  def observe(self, states, items, times=None) -> list[dict]:
    """Appends one event per user; returns new states (inputs untouched).

    Args:
      states: list of states (`new_state()` or earlier results).
      items: `[n]` internal item ids in 1..num_items.
      times: `[n]` unix seconds, or None (then: now, if the model uses
        time).
    """
    n = len(states)
    items = np.asarray(items, np.int32).reshape(n)
    if np.any((items < 1) | (items > self.num_items)):
      raise ValueError(f"item ids must be in 1..{self.num_items}")
    if times is None:
      times = np.full(n, int(time_lib.time()), np.int64)
    times = np.asarray(times, np.int64).reshape(n)
    if np.any((times < 0) | (times > np.iinfo(np.int32).max)):
      raise ValueError("timestamps must be unix seconds in 0..2**31-1 "
                       "(the model's int32 time features)")
    times = times.astype(np.int32)
    full = np.array([s["items"][0] > 0 for s in states], bool)
    out = [dict(s) for s in states]
    step = np.flatnonzero(~full) if self.cached else np.array([], int)
    redo = np.flatnonzero(full) if self.cached else np.arange(n)
    if len(step):
      self._append([states[i] for i in step], items[step], times[step],
                    [out[i] for i in step])
    if len(redo):
      self._reencode([states[i] for i in redo], items[redo], times[redo],
                     [out[i] for i in redo])
    for s, item in zip(out, items):
      s["seen"] = np.concatenate([s["seen"][1:], [item]]).astype(np.int32)
      s["count"] = np.asarray(s["count"] + 1, np.int64)
    return out

  def _append(self, states, items, times, out):
    m = _bucket(len(states))
    batch = self._stack(states, ("items", "times") + self.cache_keys, m)
    cache = {k: batch[k] for k in self.cache_keys}
    pad = m - len(states)
    item = np.concatenate([items, np.ones(pad, np.int32)])
    time = np.concatenate([times, np.zeros(pad, np.int32)])
    h, cache, w_items, w_times = self.append_fn(
        self.params, cache, batch["items"], batch["times"], item, time)
    self._scatter(out, h, cache, w_items, w_times)

  def _reencode(self, states, items, times, out):
    m = _bucket(len(states))
    batch = self._stack(states, ("items", "times"), m)
    pad = m - len(states)
    item = np.concatenate([items, np.ones(pad, np.int32)])
    time = np.concatenate([times, np.zeros(pad, np.int32)])
    w_items = np.concatenate([batch["items"][:, 1:], item[:, None]], 1)
    w_times = np.concatenate([batch["times"][:, 1:], time[:, None]], 1)
    h, cache = self.encode_fn(self.params, w_items, w_times)
    self._scatter(out, h, cache, w_items, w_times)

  def _scatter(self, out, h, cache, w_items, w_times):
    h, cache, w_items, w_times = jax.device_get((h, cache, w_items, w_times))
    # Copies, not views: a view would keep the whole batch's arrays alive
    # for as long as any one of its users is held.
    for i, s in enumerate(out):
      s["items"] = np.array(w_items[i], np.int32)
      s["times"] = np.array(w_times[i], np.int32)
      s["h"] = np.array(h[i], np.float32)
      for k in self.cache_keys:
        s[k] = np.array(cache[k][i])

  def recommend(self, states, k: int, exclude_seen: bool = True):
    """`(ids [n, k], scores [n, k])`, internal ids, best first.

    Users without events get the most popular items (scores NaN).
    """
    n = len(states)
    if not 1 <= k <= self.num_items:
      raise ValueError(f"k={k}: must be in 1..{self.num_items}")
    m = _bucket(n)
    batch = self._stack(states, ("h", "seen", "count"), m)
    seen = batch["seen"] if exclude_seen else np.zeros_like(batch["seen"])
    kk = min(max(_bucket(k), 16), self.num_items)
    ids, scores = jax.device_get(self.top_k_fn(self.table, batch["h"], seen,
                                               kk))
    ids, scores = np.array(ids[:n, :k]), np.array(scores[:n, :k])
    for i in np.flatnonzero(batch["count"][:n] == 0):
      ids[i] = self.popular[:k]
      scores[i] = np.nan
    return ids, scores

  def score(self, states, candidates) -> list[np.ndarray]:
    """Target-aware logits of each user's candidate list (M-FALCON).

    Each candidate is scored by the model's ranking head after the user's
    history, seeing the history and itself but no other candidate
    (`incremental.score_targets`): the same logit it would get alone, for
    all of a user's candidates in one pass over the cached keys.

    Args:
      states: list of user states.
      candidates: one sequence of internal item ids (1..num_items) per
        user, at most `MAX_CANDIDATES` each.

    Returns:
      One float32 array of logits per user, in the candidates' order.
    """
    if self.score_fn is None:
      raise ValueError(f"this engine cannot score candidate lists: "
                       f"{self.why_no_score}")
    n = len(states)
    lists = [np.asarray(c, np.int64).reshape(-1) for c in candidates]
    if len(lists) != n:
      raise ValueError(f"{len(lists)} candidate lists for {n} users")
    for c in lists:
      if not 1 <= len(c) <= MAX_CANDIDATES:
        raise ValueError(f"each user needs 1..{MAX_CANDIDATES} candidates, "
                         f"got {len(c)}")
      if np.any((c < 1) | (c > self.num_items)):
        raise ValueError(f"item ids must be in 1..{self.num_items}")
    m = _bucket(n)
    width = max(16, _bucket(max(len(c) for c in lists)))
    cand = np.ones((m, width), np.int32)
    for i, c in enumerate(lists):
      cand[i, :len(c)] = c
    batch = self._stack(states, ("items", "times") + self.cache_keys, m)
    if self.cached:
      cache = {k: batch[k] for k in self.cache_keys}
    else:  # states hold no cache: make it from the windows
      _, cache = self.encode_fn(self.params, batch["items"], batch["times"])
    logits = np.asarray(jax.device_get(self.score_fn(
        self.params, cache, batch["items"], batch["times"], cand)))
    return [np.array(logits[i, :len(c)], np.float32)
            for i, c in enumerate(lists)]

  def warmup(self, max_batch: int, k: int = 10) -> float:
    """Compiles every batch shape up to `max_batch` users; returns seconds.

    A service calls this before taking requests, so that no request waits
    for a compilation (batches are padded to powers of two: log2(max_batch)
    + 1 shapes per function).
    """
    t0 = time_lib.time()
    m = 1
    while True:
      fresh = [self.new_state() for _ in range(m)]
      full = [dict(s, items=np.ones_like(s["items"])) for s in fresh]
      for states in ((fresh, full) if self.cached else (fresh,)):
        self.observe(states, np.ones(m, np.int32), np.zeros(m, np.int64))
      warm = self.observe(fresh, np.ones(m, np.int32))
      self.recommend(warm, k)
      if self.score_fn is not None:  # the smallest candidate width
        self.score(warm, [[1]] * m)
      if m >= max_batch:
        break
      m *= 2
    return time_lib.time() - t0

  def _windows(self, item_lists, time_lists, rows: int):
    """`[rows, W]` left-padded windows (items, int32 times) of the lists."""
    w = self.max_len
    items = np.zeros((rows, w), np.int32)
    times = np.zeros((rows, w), np.int32)
    for row, seq in enumerate(item_lists):
      seq = np.asarray(seq, np.int32)[-w:]
      items[row, w - len(seq):] = seq
      if time_lists is not None:
        t = np.asarray(time_lists[row], np.int64)[-w:]
        times[row, w - len(t):] = t.astype(np.int32)
    return items, times

  def start(self, item_lists, time_lists=None) -> list[dict]:
    """States after whole histories, in one window encode per user.

    Equal to observing each history's events one by one (the state after
    n events depends only on the last `max_len` of them), at the cost of
    one forward pass. Empty histories give `new_state()`.
    """
    out = [self.new_state() for _ in item_lists]
    todo = [i for i, seq in enumerate(item_lists) if len(seq)]
    for lo in range(0, len(todo), 256):
      part = todo[lo:lo + 256]
      items, times = self._windows(
          [item_lists[i] for i in part],
          None if time_lists is None else [time_lists[i] for i in part],
          _bucket(len(part)))
      h, cache = self.encode_fn(self.params, items, times)
      states = [out[i] for i in part]
      self._scatter(states, h, cache, items, times)
      for state, i in zip(states, part):
        seq = np.asarray(item_lists[i], np.int32)[-self.max_seen:]
        state["seen"][self.max_seen - len(seq):] = seq
        state["count"] = np.asarray(len(item_lists[i]), np.int64)
    return out

  def full_forward(self, item_lists, time_lists=None) -> np.ndarray:
    """Reference: `h [n, D]` from `model.encode` over each user's last
    `max_len` events (what a user's state must equal after those events)."""
    if self._model is None:
      raise ValueError("full_forward needs the model (Engine.from_model)")
    items, times = self._windows(item_lists, time_lists, len(item_lists))
    return np.asarray(self._full_fn(self.params, items, times))
