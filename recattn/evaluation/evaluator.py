"""Batched on-device evaluation: full ranking and sampled ranking together.

For each user of a split the model encodes the history window, takes the
last state `h: [B, D]`, and ranks the held-out item
  * `full`: against every item (padding excluded; the user's earlier items
    excluded too when `filter_seen`, the target itself always kept);
  * `sampled_<strategy><N>`: against N negatives drawn once per run, none of
    which the user ever interacted with (SASRec's protocol);
  * `ranker_<strategy><N>` (models with `rank_head`): the same target and N
    negatives, scored by the ranking head, each candidate attending to the
    history and itself (`recattn.serving.incremental.score_targets`).
Per-user metrics are summed on device, batch after batch.
With several processes each builds only its devices' rows of a batch: of
the users in order, or (`process_shards`) of its own users, the processes
agreeing on the number of batches; either way the sums run over every
user once and are divided by the total number of users.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recattn import distributed
from recattn import sharding as sharding_lib
from recattn.data import batching
from recattn.evaluation import metrics as metrics_lib
from recattn.serving import incremental


def _local_scores(h, table, targets, seen, *, num_rows, filter_seen,
                  items_axis):
  """Inside `shard_map`: this shard's masked full-ranking scores.

  Args:
    h: `[b, D]` user states of this shard's rows.
    table: `[r, D]` this shard's item vectors (rows lo..lo+r-1 of the
      padded table; rows >= `num_rows` are padding).
    targets: `[b]` held-out item ids; seen: `[b, S]` the users' earlier
      items (0-padded).

  Returns `(scores [b, r], target_scores [b], ids [r])`: the padding item 0,
  padded rows and (with `filter_seen`) seen items are -inf, the target
  keeps its score. Target scores are read where the matrix holds them (the
  owning shard) and summed over `items_axis`, so ranks compare equal bits.
  """
  scores = h @ table.T  # [b, r]: only this shard's items
  b, r = scores.shape
  lo = 0 if items_axis is None else jax.lax.axis_index(items_axis) * r
  ids = lo + jnp.arange(r, dtype=jnp.int32)
  rows = jnp.arange(b)[:, None]

  def local(global_ids):  # ids owned elsewhere -> r (dropped by scatters)
    local_ids = global_ids - lo
    return jnp.where((local_ids >= 0) & (local_ids < r), local_ids, r)

  t_local = local(targets)
  owned = t_local < r
  target_scores = jnp.where(
      owned, scores[rows[:, 0], jnp.minimum(t_local, r - 1)], 0.0)
  if items_axis is not None:
    target_scores = jax.lax.psum(target_scores, items_axis)
  scores = jnp.where(((ids == 0) | (ids >= num_rows))[None], -jnp.inf,
                     scores)
  if filter_seen:
    scores = scores.at[rows, local(seen)].set(-jnp.inf, mode="drop")
    scores = scores.at[rows[:, 0], t_local].set(target_scores, mode="drop")
  return scores, target_scores, ids


def _full_ranking(h, vectors, targets, seen, *, filter_seen, mesh, rules,
                  k=0):
  """Rank of each target among all items (and, if k, the top-k ids).

  Scores `[B, V]` exist only shard by shard: `[B / data, V / model]` per
  device. Ranks are per-shard counts summed over the item axis; top-k
  gathers `k` candidates per shard (`sharding.top_k_over_shards`).
  Returns `(ranks [B], target_scores [B], top_ids [B, k] or None)`.
  """
  batch_axis, items_axis = sharding_lib.logical_to_spec(("batch", "items"),
                                                        rules)
  shards = sharding_lib.axis_size(mesh, "items", rules)
  num_rows = vectors.shape[0]  # V + 1, item 0 being padding
  pad = -num_rows % shards
  if pad:  # rows the model did not pad itself (see pad_item_rows)
    vectors = jnp.pad(vectors, ((0, pad), (0, 0)))

  def body(h, table, targets, seen):
    scores, target_scores, ids = _local_scores(
        h, table, targets, seen, num_rows=num_rows, filter_seen=filter_seen,
        items_axis=items_axis)
    higher = jnp.sum(scores >= target_scores[:, None], axis=-1)
    if items_axis is not None:
      higher = jax.lax.psum(higher, items_axis)
    ranks = higher - 1  # the target's own score is among `scores`
    if not k:
      return ranks, target_scores, None
    if items_axis is None:
      _, pos = jax.lax.top_k(scores, k)
      return ranks, target_scores, ids[pos]
    _, top = sharding_lib.top_k_over_shards(scores, ids, k, items_axis)
    return ranks, target_scores, top

  row = jax.sharding.PartitionSpec(batch_axis)
  rows2 = jax.sharding.PartitionSpec(batch_axis, None)
  items2 = jax.sharding.PartitionSpec(items_axis, None)
  # check_vma=False: psum'ed and all-gathered outputs are equal on every
  # item shard, which shard_map cannot infer for all_gather in jax 0.10.
  return jax.shard_map(
      body, mesh=mesh, in_specs=(rows2, items2, row, rows2),
      out_specs=(row, row, rows2 if k else None),
      check_vma=False)(h, vectors, targets, seen)


def _eval_batch(graphdef, params, totals, history, targets, seen, candidates,
                weights, times=None, query_times=None, *, filter_seen: bool,
                mesh, rules, k: int = 0):
  """`totals` plus this batch's weighted metric sums; with `k`, top-k ids."""
  model = nnx.merge(graphdef, params)
  ranker = getattr(model, "rank_head", None) is not None and not k
  if ranker:  # keep the keys/values: the head's candidates attend to them
    h, cache = incremental.encode_recording(model, history, times)
    h = h[:, -1]
  else:
    # Models without time-aware attention need not take `times`.
    kwargs = {} if times is None else {"times": times}
    if query_times is not None:
      kwargs["query_times"] = query_times
    h = model.encode(history, last=1, **kwargs)[:, -1]  # [B, D]
  ranks, target_scores, top = _full_ranking(
      h, model.all_item_vectors(), targets, seen, filter_seen=filter_seen,
      mesh=mesh, rules=rules, k=k)
  if k:
    return top
  full = metrics_lib.ranking_metrics(ranks)
  cand_scores = jnp.einsum("bd,bcd->bc", h, model.item_vectors(candidates))
  cand_scores = jnp.concatenate([target_scores[:, None], cand_scores], -1)
  sampled = metrics_lib.ranking_metrics(
      metrics_lib.rank_of_target(cand_scores, target_scores))
  protocols = (full, sampled)
  if ranker:  # the same target + negatives, scored target-aware by the head
    logits = incremental.score_targets(
        model, cache, history, times,
        jnp.concatenate([targets[:, None], candidates], axis=1))
    protocols += (metrics_lib.ranking_metrics(
        metrics_lib.rank_of_target(logits, logits[:, 0])),)
  return jax.tree.map(lambda t, v: t + jnp.sum(v * weights), totals,
                      protocols)


class Evaluator:
  """Evaluates a model's parameters on the `valid` or `test` split.

  `mesh` (default: one device) splits users over `data` and the full
  ranking's items over `model`, as `rules` say.

  `process_shards=True`: `ds` is this process's shard of the users
  (`SequenceDataset.shard`); each process fills its rows of every batch
  with its own users, the others pad, and the metrics are the same sums
  over all users as one process's (up to float summation order). Sampled
  negatives are then keyed by user id (`sample_eval_negatives(by_user=
  True)`), and `item_counts` must be the whole dataset's for "popularity".
  """

  def __init__(self, ds, split: str, *, max_len: int, batch_size: int,
               filter_seen: bool, num_negatives: int, negatives: str,
               seed: int, with_times: bool = False, time_query: str = "own",
               mesh=None,
               rules=sharding_lib.DEFAULT_RULES, process_shards: bool = False,
               item_counts: np.ndarray | None = None,
               rank_head: bool = False):
    self.split = split
    self.batch_size = batch_size
    self.sampled_name = f"sampled_{negatives}{num_negatives}"
    self.history, self.targets, self.starts, self.ends = (
        batching.eval_arrays(ds, split, max_len))
    # Item timestamps of the history, for time-aware attention biases.
    self.times = (batching.eval_times(ds, split, max_len) if with_times
                  else None)
    # model.time_query="next": each query's time is the next item's, the
    # held-out item's at the last position (the time of the prediction).
    self.query_times = (batching.eval_times(ds, split, max_len, shift=1)
                        if with_times and time_query == "next" else None)
    self.items = ds.items
    # One padded width for every batch keeps a single compiled program (the
    # same on every process: the array shapes are global).
    longest = int(np.max(self.ends - self.starts, initial=1))
    if process_shards:
      longest = int(distributed.host_allgather(longest).max())
    self.seen_width = int(-(-longest // 128) * 128)
    self.candidates = batching.sample_eval_negatives(
        ds, num_negatives, negatives, seed, by_user=process_shards,
        counts=item_counts)
    mesh = sharding_lib.make_mesh(1, 1) if mesh is None else mesh
    data = sharding_lib.axis_size(mesh, "batch", rules)
    if batch_size % data:
      raise ValueError(f"config.eval.batch_size={batch_size} must be a "
                       f"multiple of the {data} devices on the data axis")
    self.sharding = sharding_lib.batch_sharding(mesh, rules)
    self._local = distributed.local_rows(self.sharding, batch_size)
    self.process_shards = process_shards
    self.num_users = len(self.targets)  # all processes' users together
    if process_shards:
      local = self._local.stop - self._local.start
      if local * jax.process_count() != batch_size:
        raise ValueError(
            f"process_shards: process {jax.process_index()} holds batch rows "
            f"{self._local.start}:{self._local.stop} of {batch_size}; each "
            "process must hold its own 1/P of the rows (no mesh axis "
            "replicating batches may span processes)")
      counts = distributed.host_allgather(len(self.targets))
      self.num_users = int(counts.sum())
      self._num_batches = max(1, int(-(-counts.max() // local)))
    self._fn = jax.jit(
        functools.partial(_eval_batch, mesh=mesh, rules=rules),
        static_argnums=0, static_argnames=("filter_seen", "k"))
    self.filter_seen = filter_seen
    # Protocols, in `_eval_batch`'s order. "ranker_...": the sampled
    # protocol's candidates scored by the model's ranking head
    # (`model.rank_head`, target-aware: `incremental.score_targets`).
    self._protocols = ("full", self.sampled_name)
    if rank_head:
      self._protocols += (f"ranker_{negatives}{num_negatives}",)
    zeros = metrics_lib.ranking_metrics(jnp.zeros((0,), jnp.int32))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._zero_totals = jax.tree.map(
        lambda _: jax.make_array_from_callback(
            (), replicated, lambda _: np.zeros((), np.float32)),
        (zeros,) * len(self._protocols))

  def _batch_rows(self):
    """`(rows, keep)` per batch: this process's rows, -1 for padding.

    `rows` index this evaluator's users; `keep` is how many rows of the
    gathered batch (all processes' rows, or with `process_shards` this
    process's) hold users, for `top_k`.
    """
    n = len(self.targets)
    if self.process_shards:
      local = self._local.stop - self._local.start
      for k in range(self._num_batches):
        rows = np.arange(k * local, (k + 1) * local)
        yield np.where(rows < n, rows, -1), int(np.sum(rows < n))
      return
    for lo in range(0, n, self.batch_size):
      rows = np.arange(lo, lo + self.batch_size)
      rows = np.where(rows < n, rows, -1)
      yield rows[self._local], int(np.sum(rows >= 0))

  def _batches(self):
    """`(batch tuple, keep)` on the mesh (see `_batch_rows`).

    This process builds only the rows its devices hold (all of them for
    one process).
    """
    for rows, keep in self._batch_rows():
      valid = rows >= 0
      safe = np.where(valid, rows, 0)
      batch = (
          self.history[safe],
          self.targets[safe],
          batching.seen_items(self.items, self.starts[safe], self.ends[safe],
                              self.seen_width),
          self.candidates[safe],
          valid.astype(np.float32),
      )
      if self.times is not None:
        batch += (self.times[safe],)
      if self.query_times is not None:
        batch += (self.query_times[safe],)
      yield (distributed.place(batch, self.sharding, self.batch_size), keep)

  def __call__(self, graphdef, params) -> dict[str, float]:
    # Each batch adds to the previous batch's totals on device. The data
    # dependency also runs the batches' all-reduces one after another:
    # independent batches in flight at once could take every thread of
    # XLA:CPU's pool with several devices, and the all-reduce rendezvous
    # then timed out (abort after 40 s).
    sums = self._zero_totals
    for batch, _ in self._batches():
      sums = self._fn(graphdef, params, sums, *batch,
                      filter_seen=self.filter_seen)
    sums = jax.device_get(sums)  # scalars: replicated everywhere
    n = self.num_users
    result = {}
    for protocol, values in zip(self._protocols, sums):
      for k, v in values.items():
        result[f"{self.split}/{protocol}/{k}"] = float(v) / n
    return result

  def top_k(self, graphdef, params, k: int) -> np.ndarray:
    """`[users, k]` top item ids of the full ranking, best first.

    The items the full protocol ranks: no padding, seen items removed when
    `filter_seen` (the target kept), so `target in top_k` is HR@k. Taken
    with the sharded top-k: no device holds a row's scores for all items.
    With `process_shards`, the rows of this process's users.
    """
    out = []
    mine = self._local if self.process_shards else slice(None)
    for batch, n in self._batches():
      top = self._fn(graphdef, params, None, *batch,
                     filter_seen=self.filter_seen, k=k)
      out.append(np.asarray(distributed.gather(top))[mine][:n])
    return np.concatenate(out)
