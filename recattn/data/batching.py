"""Vectorised numpy batching for leave-one-out next-item training and eval.

Leave-one-out split of each user's chronological sequence s_1..s_n:
  train: inputs s_1..s_{n-3}, targets s_2..s_{n-2} (every position predicts
         the next item; the last two items are never seen in training);
  valid: history s_1..s_{n-2}, target s_{n-1};
  test:  history s_1..s_{n-1}, target s_n.
Windows keep the last `max_len` items and are left-padded with 0. No
per-user Python loop: every array is built by index arithmetic on the
dataset's CSR layout.
"""

from collections.abc import Iterator

import numpy as np

from recattn.data.dataset import SequenceDataset

# How many trailing items of each sequence a split's history never includes
# (for valid/test the first of them is the target).
HOLDOUT = {"train": 2, "valid": 2, "test": 1}
# `config.data.train_windows` (see `train_arrays`).
TRAIN_WINDOWS = ("last", "all", "prefixes")


def _windows(items: np.ndarray, starts: np.ndarray, ends: np.ndarray,
             width: int) -> np.ndarray:
  """`[U, width]` right-aligned windows of items[starts:ends], 0-padded."""
  src = ends[:, None] - width + np.arange(width)[None, :]  # [U, W]
  valid = src >= starts[:, None]
  return np.where(valid, items[np.clip(src, 0, None)], 0).astype(np.int32)


def _bounds(ds: SequenceDataset, split: str, holdout: int | None = None):
  starts = ds.offsets[:-1]
  ends = ds.offsets[1:] - (HOLDOUT[split] if holdout is None else holdout)
  return starts, ends


def _enumerate(count: np.ndarray):
  """`(user, k)` for k in 0..count[user] - 1 of every user, in order."""
  user = np.repeat(np.arange(len(count)), count)
  return user, np.arange(len(user)) - np.repeat(np.cumsum(count) - count,
                                                count)


def _train_bounds(ds: SequenceDataset, max_len: int, windows: str,
                  holdout: int = 2):
  """`(starts, ends)` of every training window (see `train_arrays`)."""
  starts, ends = _bounds(ds, "train", holdout)
  keep = ends - starts >= 2
  starts, ends = starts[keep], ends[keep]
  if windows == "all":
    # ceil((n - 1) / L) windows per user, ending at end, end - L, ...
    user, k = _enumerate(-(-(ends - starts - 1) // max_len))
    starts, ends = starts[user], ends[user] - k * max_len
  elif windows == "prefixes":
    # One window per target, ending at start + 2, ..., end.
    user, k = _enumerate(ends - starts - 1)
    starts, ends = starts[user], starts[user] + 2 + k
  elif windows != "last":
    raise ValueError(f"config.data.train_windows={windows!r}; allowed: "
                     f"{list(TRAIN_WINDOWS)}")
  return starts, ends


def train_arrays(ds: SequenceDataset, max_len: int, windows: str = "last",
                 holdout: int = 2):
  """Returns `inputs: [R, L]`, `targets: [R, L | 1] int32`, one row per window.

  `windows="last"` keeps each user's most recent `max_len` targets (SASRec's
  and generative-recommenders' practice: longer histories lose their
  beginning); `"all"` also cuts the earlier part of long histories into
  further non-overlapping windows, so every training target is used once per
  epoch; `"prefixes"` makes one row per target, its history right-aligned
  as at evaluation, scored at the last position only (`targets` is then
  `[R, 1]`: the training regime of S3-Rec / FMLP-Rec / BSARec; a row per
  training target instead of one per user). Users with fewer than 2
  training items have no target and no row.
  `holdout`: trailing items of each sequence never trained on (2: the
  validation and test items; 1: only the test item, `data.train_on_valid`).
  """
  starts, ends = _train_bounds(ds, max_len, windows, holdout)
  inputs = _windows(ds.items, starts, ends - 1, max_len)
  if windows == "prefixes":
    return inputs, ds.items[ends - 1, None].astype(np.int32)
  targets = _windows(ds.items, starts + 1, ends, max_len)
  return inputs, targets


def _relative_times(ds: SequenceDataset) -> np.ndarray:
  if ds.timestamps is None:
    raise ValueError("this dataset has no timestamps")
  # Seconds since the dataset's first interaction fit int32 for 68 years.
  # A shard keeps the whole dataset's origin (`SequenceDataset.shard`).
  origin = ds.card.get("time_origin")
  return ds.timestamps - (ds.timestamps.min() if origin is None else origin)


def train_times(ds: SequenceDataset, max_len: int, windows: str = "last",
                holdout: int = 2, shift: int = 0):
  """`[R, L] int32` timestamps (seconds) of `train_arrays`' inputs.

  `shift=1`: of the item after each input, i.e. of its target (the query
  times of `model.time_query="next"`), aligned with the inputs.
  """
  starts, ends = _train_bounds(ds, max_len, windows, holdout)
  return _windows(_relative_times(ds), starts + shift, ends - 1 + shift,
                  max_len)


def eval_times(ds: SequenceDataset, split: str, max_len: int,
               shift: int = 0):
  """`[U, L] int32` timestamps (seconds) of `eval_arrays`' history.

  `shift=1`: of the item after each history item; at the last position
  that is the held-out item's, the time of the prediction.
  """
  starts, ends = _bounds(ds, split)
  return _windows(_relative_times(ds), starts + shift, ends + shift, max_len)


def eval_arrays(ds: SequenceDataset, split: str, max_len: int):
  """Returns `history: [U, L]`, `targets: [U]`, and history bounds `[U]`."""
  if split not in ("valid", "test"):
    raise ValueError(f"split={split!r}; allowed: 'valid', 'test'")
  starts, ends = _bounds(ds, split)
  history = _windows(ds.items, starts, ends, max_len)
  targets = ds.items[ends].astype(np.int32)
  return history, targets, starts, ends


def seen_items(items, starts, ends, width: int) -> np.ndarray:
  """`[B, width]` every item of items[starts:ends] (left-aligned, 0-padded)."""
  src = starts[:, None] + np.arange(width)[None, :]
  return np.where(src < ends[:, None], items[np.minimum(src, len(items) - 1)],
                  0).astype(np.int32)


def item_counts(ds: SequenceDataset, holdout: int = 2) -> np.ndarray:
  """`[V + 1]` interaction counts over the training part of every sequence."""
  starts, ends = _bounds(ds, "train", holdout)
  lens = np.diff(ds.offsets)
  in_train = np.arange(len(ds.items)) < np.repeat(ends, lens)
  return np.bincount(ds.items[in_train], minlength=ds.num_items + 1)


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijection of uint64 that scrambles all bits."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def keyed_uniform(seed: int, users: np.ndarray, round_: int,
                  width: int) -> np.ndarray:
  """`[len(users), width]` uniforms in [0, 1) keyed by (seed, user, draw).

  A counter-based hash, not a stream: user u's values are the same whatever
  other users are drawn with it, so negatives drawn with it do not depend
  on how users are split over processes.
  """
  golden = np.uint64(0x9E3779B97F4A7C15)
  with np.errstate(over="ignore"):
    key = _mix64(np.uint64(seed & (2**64 - 1)) + golden)
    key = _mix64((key ^ users.astype(np.uint64)[:, None]) + golden)
    counter = np.uint64(round_ * width) + np.arange(width, dtype=np.uint64)
    bits = _mix64((key ^ counter[None, :]) + golden)
  return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample_eval_negatives(ds: SequenceDataset, num: int, strategy: str,
                          seed: int, by_user: bool = False,
                          counts: np.ndarray | None = None) -> np.ndarray:
  """`[U, num]` negatives per user, none of them in the user's sequence.

  Drawn once per dataset and seed so that every evaluation of a run (and
  every run with the same seed) ranks against the same candidates.

  Args:
    ds: the users to draw for.
    num: negatives per user.
    strategy: "uniform" or "popularity" (training-part counts, +1).
    seed: the draw's seed.
    by_user: False draws every user from one numpy stream (the default;
      a user's negatives then depend on every other user of `ds`). True
      keys each user's draws by `(seed, ds.user_ids())` (`keyed_uniform`),
      so a shard of the users gets exactly the rows the whole dataset would;
      multi-process runs with `data.process_shards` use it.
    counts: `[V + 1]` item counts for "popularity"; default `item_counts
      (ds)`. A shard passes the whole dataset's (summed over processes).
  """
  rng = np.random.default_rng(seed)
  num_users, num_items = ds.num_users, ds.num_items
  if strategy == "uniform":
    probs = None
  elif strategy == "popularity":
    # +1 smoothing: items absent from training stay possible candidates.
    counts = (item_counts(ds) if counts is None else counts)
    counts = np.asarray(counts, np.float64)[1:] + 1.0
    probs = counts / counts.sum()
  else:
    raise ValueError(f"eval negative sampling {strategy!r}; allowed: "
                     "'uniform', 'popularity'")
  user_ids = ds.user_ids()
  cdf = None if probs is None else np.cumsum(probs)

  def draw(todo, round_):
    """`[len(todo), 2 * num]` candidate ids in 1..V for the rows `todo`."""
    if not by_user:
      return rng.choice(num_items, size=(len(todo), 2 * num), p=probs) + 1
    u = keyed_uniform(seed, user_ids[todo], round_, 2 * num)
    if cdf is None:
      ids = np.floor(u * num_items).astype(np.int64)
    else:  # inverse CDF
      ids = np.searchsorted(cdf, u * cdf[-1], side="right")
    return np.minimum(ids, num_items - 1) + 1

  user_of = np.repeat(np.arange(num_users), np.diff(ds.offsets))
  seen_keys = np.unique(user_of.astype(np.int64) * (num_items + 1) + ds.items)
  distinct = np.bincount(seen_keys // (num_items + 1), minlength=num_users)
  if np.any(num_items - distinct < num):
    raise ValueError(
        f"config.eval.num_negatives={num}: user "
        f"{int(user_ids[np.argmax(num_items - distinct < num)])} has only "
        f"{int(np.min(num_items - distinct))} items it never interacted with;"
        " lower eval.num_negatives")
  out = np.zeros((num_users, num), np.int32)
  filled = np.zeros(num_users, np.int64)
  todo = np.arange(num_users)
  round_ = 0
  while len(todo):
    draw_ids = draw(todo, round_)
    round_ += 1
    keys = todo[:, None].astype(np.int64) * (num_items + 1) + draw_ids
    pos = np.searchsorted(seen_keys, keys)
    ok = seen_keys[np.minimum(pos, len(seen_keys) - 1)] != keys
    # Without replacement within a user: drop repeats of earlier draws.
    order = np.argsort(keys, axis=1, kind="stable")
    sorted_keys = np.take_along_axis(keys, order, 1)
    first = np.ones_like(ok)
    first[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    unique = np.empty_like(ok)
    np.put_along_axis(unique, order, first, 1)
    ok &= unique
    if filled.any():  # later rounds: also drop items taken earlier
      taken = out[todo]
      ok &= ~(draw_ids[:, :, None] == taken[:, None, :]).any(-1)
    rank = np.cumsum(ok, axis=1) - 1 + filled[todo][:, None]
    put = ok & (rank < num)
    rows = np.broadcast_to(todo[:, None], put.shape)[put]
    out[rows, rank[put]] = draw_ids[put]
    filled[todo] += put.sum(1)
    todo = todo[filled[todo] < num]
  return out


def epoch_batches(lengths: np.ndarray, batch_size: int, epoch: int,
                  seed: int, chunk_batches: int = 0, *, shard: int = 0,
                  num_shards: int = 1,
                  num_batches: int | None = None) -> Iterator[np.ndarray]:
  """Shuffled row indices for one epoch, `[batch_size]` each.

  The order depends only on (seed, epoch), so a resumed run replays exactly
  the batches an uninterrupted one would. The last batch is padded with -1
  (rows the caller turns into all-padding examples that carry no loss).

  With `chunk_batches > 0` rows are grouped by length: the shuffled rows are
  cut into chunks of `chunk_batches * batch_size`, each chunk is sorted by
  `lengths`, and the batch order is shuffled again. Batches then hold rows of
  similar length and can be cut to a shorter window (`window_length`), which
  saves the compute spent on padding, as jagged kernels do on GPU.

  Shards (`data.process_shards`): with `num_shards > 1`, `lengths` are the
  rows of shard `shard` and each batch is that shard's `batch_size` rows of
  a global batch. Rows are shuffled by a per-shard generator (seed, epoch,
  shard), the batch order by one generator every shard shares, so the k-th
  length-sorted batches of all shards, which have similar lengths, land on
  the same step and need similar windows. `num_batches` (the same on every
  shard: the largest shard's count) pads shorter shards with batches of -1
  at the end of their row order. One shard is exactly the unsharded order.
  """
  if num_shards == 1:
    rng = order_rng = np.random.default_rng([seed, epoch])
  else:
    rng = np.random.default_rng([seed, epoch, num_shards, shard])
    order_rng = np.random.default_rng([seed, epoch, num_shards])
  n = len(lengths)
  order = rng.permutation(n)
  if chunk_batches > 0:
    chunk = np.arange(n) // (chunk_batches * batch_size)
    order = order[np.lexsort((lengths[order], chunk))]
  pad = -n % batch_size
  if num_batches is not None:
    if num_batches * batch_size < n:
      raise ValueError(f"num_batches={num_batches} of {batch_size} rows "
                       f"cannot hold {n} rows")
    pad = num_batches * batch_size - n
  batches = np.concatenate([order, np.full(pad, -1, order.dtype)]).reshape(
      -1, batch_size)
  if chunk_batches > 0:
    batches = batches[order_rng.permutation(len(batches))]
  yield from batches


def window_length(lengths: np.ndarray, max_len: int, step: int) -> int:
  """Window for a batch whose longest row has `max(lengths)` items: the next
  multiple of `step` (a handful of compiled shapes), at most `max_len`."""
  if step <= 0:
    return max_len
  longest = int(lengths.max()) if len(lengths) else 1
  return min(max_len, max(step, -(-longest // step) * step))


def take_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """`array[rows]` with rows == -1 giving all-zero (padding) rows."""
  out = array[np.maximum(rows, 0)]
  out[rows < 0] = 0
  return out
