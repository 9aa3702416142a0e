"""Seeded synthetic sequences with planted, learnable sequential structure.

Each next item is drawn from one of three mechanisms:

* Markov (p=0.6): one of `num_successors` fixed successors of the previous
  item, so a model that reads the last item can predict the next one far
  better than popularity can.
* Repeat (p=0.2): an item seen earlier in the same sequence (not the previous
  one), i.e. long-range structure that needs attention over the history.
* Noise (p=0.2): an item from a Zipf popularity distribution, P(rank r) ~
  r^-zipf over a seeded random assignment of ranks to items, which also starts
  every sequence. Successors are uniform over items, which flattens the
  popularity of the whole dataset: its rank-frequency slope is still close to
  a power law but shallower, about -0.7 for zipf=0.8 and -1.0 for zipf=1.2
  over ranks 1..V/100 (3*10^6 interactions, 10^5 items).

Timestamps strictly increase within a user.

Scale: one random stream, drawn position by position over all users (the
order fixes the dataset, so it never changes; datasets prepared before the
`zipf` field existed are reproduced bit for bit). Noise items are drawn by
inverse CDF (a binary search in a cumulative table), not `rng.choice(p=...)`,
which rebuilt the [V] table on every call; both give identical items. Memory is
a few [V] tables ([V] float64 CDF, [V+1, 4] int32 successors), the [max_len, U]
int32 item matrix and the [N] int64 outputs; timestamps are made
`users_per_chunk` users at a time, which does not change the result. 10^7
interactions over 10^6 or 10^7 items take seconds
(experiments/005_synthetic_scale).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from recattn.data.dataset import DataError
from recattn.data.parsing import RawInteractions

_P_MARKOV = 0.6
_P_REPEAT = 0.2
_NUM_SUCCESSORS = 4
_MIN_LEN = 3
_START_TIME = 1_600_000_000  # 2020-09-13, unix seconds.
_DEFAULT_ZIPF = 0.8
# Item ids are stored as int32 downstream (`SequenceDataset.items`).
_MAX_ITEMS = np.iinfo(np.int32).max - 1
_USERS_PER_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True)
class SyntheticParams:
  """Size, popularity skew and seed of a synthetic dataset (its identity).

  Attributes:
    num_users: U users, ids 1..U.
    num_items: V items, ids 1..V.
    mean_len: Mean sequence length (>= 3); lengths are 3 + Poisson.
    seed: Seed of the one random stream that makes everything.
    zipf: Exponent s of item popularity, P(rank r) ~ r^-s; 0 is uniform.
  """

  num_users: int = 1000
  num_items: int = 500
  mean_len: float = 30.0
  seed: int = 0
  zipf: float = _DEFAULT_ZIPF

  def config_name(self) -> str:
    """E.g. "n1000_v500_l30_s0"; "_z1p2" is added when zipf != 0.8."""
    mean = f"{self.mean_len:g}".replace(".", "p")
    name = f"n{self.num_users}_v{self.num_items}_l{mean}_s{self.seed}"
    # Names from before the field existed stay valid for the default.
    if self.zipf != _DEFAULT_ZIPF:
      name += "_z" + f"{self.zipf:g}".replace(".", "p")
    return name

  def validate(self) -> None:
    for field, value, low, high in (
        ("synthetic_num_users", self.num_users, 1, math.inf),
        ("synthetic_num_items", self.num_items, 2, _MAX_ITEMS),
        ("synthetic_mean_len", self.mean_len, _MIN_LEN, math.inf),
        ("synthetic_zipf", self.zipf, 0, math.inf)):
      if not low <= value <= high:
        allowed = (f"a number >= {low}" if high == math.inf
                   else f"a number in [{low}, {high}]")
        raise DataError(f"data.{field}={value!r}; allowed: {allowed}")


def popularity_cdf(num_items: int, zipf: float,
                   rng: np.random.Generator) -> np.ndarray:
  """Returns the [V] float64 CDF of item popularity, cdf[-1] == 1.

  Item i (0-based) has probability ~ rank(i)^-zipf for a random permutation of
  ranks drawn from `rng`. Built in place in one [V] buffer; the arithmetic is
  exactly what `rng.choice(V, p=...)` did before, so draws are unchanged.
  """
  table = np.arange(1, num_items + 1, dtype=np.float64)
  np.power(table, zipf, out=table)
  np.divide(1.0, table, out=table)
  table /= table.sum()
  rng.shuffle(table)
  np.cumsum(table, out=table)
  table /= table[-1]
  return table


def draw_items(cdf: np.ndarray, uniform: np.ndarray) -> np.ndarray:
  """Maps [n] uniforms in [0, 1) to [n] int32 items in 1..V by inverse CDF."""
  # Sorted keys make successive binary searches touch nearby entries of a
  # 10^7-entry table, so they stay in cache: ~5x faster than random keys.
  order = np.argsort(uniform)
  items = np.empty(uniform.shape, np.int32)
  items[order] = cdf.searchsorted(uniform[order], side="right") + 1
  return items


def generate(params: SyntheticParams, *,
             users_per_chunk: int = _USERS_PER_CHUNK) -> RawInteractions:
  """Generates users 1..U with items in 1..V, in chronological order.

  Args:
    params: The dataset's identity.
    users_per_chunk: Users whose timestamps are made at once (memory only;
      the result does not depend on it).

  Returns:
    [N] int64 users, items and timestamps, user by user, each user's
    interactions in time order; N = sum of lengths, about U * mean_len.
  """
  params.validate()
  rng = np.random.default_rng(params.seed)
  num_users, num_items = params.num_users, params.num_items
  # Mean exactly `mean_len`, never shorter than leave-one-out needs.
  lengths = _MIN_LEN + rng.poisson(params.mean_len - _MIN_LEN, num_users)
  max_len = int(lengths.max())

  cdf = popularity_cdf(num_items, params.zipf, rng)
  successors = rng.integers(1, num_items + 1, (num_items + 1, _NUM_SUCCESSORS),
                            dtype=np.int32)

  # Position-major, so that each step reads and writes one contiguous row.
  seqs = np.zeros((max_len, num_users), np.int32)  # [max_len, U]
  seqs[0] = draw_items(cdf, rng.random(num_users))
  for t in range(1, max_len):
    # Every draw is made for every user, in this order, so that the stream
    # (and hence the dataset) is the same as when all were used.
    mechanism = rng.random(num_users)
    pick = rng.integers(0, _NUM_SUCCESSORS, num_users)
    back = rng.random(num_users)
    uniform = rng.random(num_users)
    step = seqs[t]
    step[:] = successors[seqs[t - 1], pick]
    # Repeats reach back past the previous item, so they are not Markov.
    repeat = np.flatnonzero(mechanism >= _P_MARKOV)
    step[repeat] = seqs[(back[repeat] * max(t - 1, 1)).astype(np.int64),
                        repeat]
    noise = np.flatnonzero(mechanism >= _P_MARKOV + _P_REPEAT)
    step[noise] = draw_items(cdf, uniform[noise])
  del cdf, successors

  offsets = np.zeros(num_users + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  items = np.empty(offsets[-1], np.int64)
  times = np.empty(offsets[-1], np.int64)
  positions = np.arange(max_len)
  for start in range(0, num_users, users_per_chunk):
    stop = min(start + users_per_chunk, num_users)
    span = slice(offsets[start], offsets[stop])
    valid = positions[None, :] < lengths[start:stop, None]
    items[span] = seqs[:, start:stop].T[valid]
    # Chunks continue one stream: the values of one [U, max_len] draw.
    gaps = rng.integers(60, 86_400, (stop - start, max_len))
    times[span] = np.cumsum(gaps, axis=1)[valid]
  del seqs
  starts = _START_TIME + rng.integers(0, 365 * 86_400, num_users)
  for start in range(0, num_users, users_per_chunk):
    stop = min(start + users_per_chunk, num_users)
    times[offsets[start]:offsets[stop]] += np.repeat(starts[start:stop],
                                                     lengths[start:stop])
  return RawInteractions(
      users=np.repeat(np.arange(1, num_users + 1), lengths),
      items=items,
      timestamps=times,
  )
