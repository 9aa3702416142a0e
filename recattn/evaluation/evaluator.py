"""Batched on-device evaluation: full ranking and sampled ranking together.

For each user of a split the model encodes the history window, takes the
last state `h: [B, D]`, and ranks the held-out item
  * `full`: against every item (padding excluded; the user's earlier items
    excluded too when `filter_seen`, the target itself always kept);
  * `sampled_<strategy><N>`: against N negatives drawn once per run, none of
    which the user ever interacted with (SASRec's protocol).
Per-user metrics are summed on device; the host only adds batch sums.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recattn.data import batching
from recattn.evaluation import metrics as metrics_lib


def _eval_batch(graphdef, params, history, targets, seen, candidates,
                weights, times=None, *, filter_seen: bool):
  model = nnx.merge(graphdef, params)
  # Models without time-aware attention need not take `times`.
  kwargs = {} if times is None else {"times": times}
  h = model.encode(history, **kwargs)[:, -1]  # [B, D]
  scores = h @ model.all_item_vectors().T  # [B, V + 1]
  rows = jnp.arange(scores.shape[0])[:, None]
  target_scores = scores[rows[:, 0], targets]
  scores = scores.at[:, 0].set(-jnp.inf)
  if filter_seen:
    scores = scores.at[rows, seen].set(-jnp.inf)
    scores = scores.at[rows[:, 0], targets].set(target_scores)
  full = metrics_lib.ranking_metrics(
      metrics_lib.rank_of_target(scores, target_scores))
  cand_scores = jnp.einsum("bd,bcd->bc", h, model.item_vectors(candidates))
  cand_scores = jnp.concatenate([target_scores[:, None], cand_scores], -1)
  sampled = metrics_lib.ranking_metrics(
      metrics_lib.rank_of_target(cand_scores, target_scores))
  total = lambda m: {k: jnp.sum(v * weights) for k, v in m.items()}
  return total(full), total(sampled)


class Evaluator:
  """Evaluates a model's parameters on the `valid` or `test` split."""

  def __init__(self, ds, split: str, *, max_len: int, batch_size: int,
               filter_seen: bool, num_negatives: int, negatives: str,
               seed: int, with_times: bool = False, sharding=None):
    self.split = split
    self.batch_size = batch_size
    self.sampled_name = f"sampled_{negatives}{num_negatives}"
    self.history, self.targets, self.starts, self.ends = (
        batching.eval_arrays(ds, split, max_len))
    # Item timestamps of the history, for time-aware attention biases.
    self.times = (batching.eval_times(ds, split, max_len) if with_times
                  else None)
    self.items = ds.items
    # One padded width for every batch keeps a single compiled program.
    self.seen_width = int(-(-np.max(self.ends - self.starts) // 128) * 128)
    self.candidates = batching.sample_eval_negatives(
        ds, num_negatives, negatives, seed)
    self.sharding = sharding
    self._fn = jax.jit(_eval_batch, static_argnums=0,
                       static_argnames="filter_seen")
    self.filter_seen = filter_seen

  def __call__(self, graphdef, params) -> dict[str, float]:
    n = len(self.targets)
    sums = None
    for lo in range(0, n, self.batch_size):
      rows = np.arange(lo, lo + self.batch_size)
      rows = np.where(rows < n, rows, -1)
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
      if self.sharding is not None:
        batch = jax.device_put(batch, self.sharding)
      out = self._fn(graphdef, params, *batch, filter_seen=self.filter_seen)
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    full, sampled = jax.device_get(sums)
    result = {}
    for protocol, values in (("full", full), (self.sampled_name, sampled)):
      for k, v in values.items():
        result[f"{self.split}/{protocol}/{k}"] = float(v) / n
    return result
