"""Relative attention biases: learned position buckets, ALiBi, time intervals.

Each bias is a small pytree (`jax.tree_util.register_dataclass`) implementing
`biases.Bias.tile(q_pos, k_pos) -> [B|1, H|1, Tq, Tk]`, so it passes through
`jax.jit`/`jax.vmap` and lets tiled variants evaluate it block by block
without building the `[Lq, Lk]` matrix. Positions are key coordinates (a
query's position is its index plus Lk - Lq, as in `masks.Mask`). Learned
tables live in the thin NNX modules at the bottom, whose `__call__` returns
the pytree bias; `combine` adds several biases (HSTU uses position + time).

  * Learned relative position buckets (T5): Raffel et al., "Exploring the
    Limits of Transfer Learning with a Unified Text-to-Text Transformer",
    JMLR 2020. The distance q - k is exact below `num_buckets // 2` and
    logarithmic up to `max_distance`; one learned scalar per (head, bucket).
  * ALiBi: Press et al., "Train Short, Test Long: Attention with Linear
    Biases Enables Input Length Extrapolation", ICLR 2022. Bias
    -m_h * (q - k) with fixed slopes m_h = 2^(-8 h / H), h = 1..H.
  * Time-interval buckets: Li et al., "Time Interval Aware Self-Attention for
    Sequential Recommendation" (TiSASRec), WSDM 2020, in the bucketing of
    Zhai et al., "Actions Speak Louder than Words: Trillion-Parameter
    Sequential Transducers for Generative Recommendations" (HSTU), ICML 2024:
    bucket = floor(ln(max(1, |t_q - t_k|)) / 0.301), clipped to
    num_buckets - 1 (about 3.3 buckets per factor e; one day is bucket 37,
    one year 57).

Cost of `tile` on a `[Tq, Tk]` tile: O(B H Tq Tk) time and memory (B = 1 for
the position biases); tables are O(H num_buckets).

Differences from generative-recommenders'
`RelativeBucketedTimeAndPositionBasedBias` (read, not copied): there the time
table has `num_buckets + 1` entries shared by all heads and the position part
is an unbucketed `[2 N - 1]` table, also shared by heads; here both tables
are per head (`[H, num_buckets]`) and the position part uses T5 buckets.
There a query's timestamp is the *next* item's (the time the prediction is
made, the last one repeated); here it is the query's own, unless
`query_timestamps` is given (`next_timestamps` builds generative-recommenders'
choice).
"""

import dataclasses
import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp

from recattn.attention.biases import Bias

# ln(dt) / 0.301 as in generative-recommenders' HSTU time bucketing (0.301 is
# log10(2), but applied to the natural log).
TIME_BUCKET_DIVISOR = 0.301


def relative_position_bucket(
    relative_position: jax.Array,
    *,
    bidirectional: bool = False,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> jax.Array:
  """T5 bucket of each relative distance `q_pos - k_pos`.

  Args:
    relative_position: int array of `q_pos - k_pos` (positive = the key lies
      in the past).
    bidirectional: if True half the buckets are for past keys and half for
      future keys; if False (causal) future keys share bucket 0 with the
      query itself.
    num_buckets: number of buckets in total.
    max_distance: distances >= this share the last bucket (of their side).

  Returns:
    int32 buckets in `[0, num_buckets)`, same shape as the input.
  """
  n = relative_position.astype(jnp.int32)
  offset = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    offset = jnp.where(n < 0, num_buckets, 0)  # future keys: upper half
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  # log-spaced buckets from max_exact up to max_distance
  log_ratio = (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
               / math.log(max_distance / max_exact))
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return offset + jnp.where(n < max_exact, n, large)


def time_interval_bucket(dt: jax.Array, num_buckets: int = 128) -> jax.Array:
  """HSTU's log bucket of a time interval in seconds.

  bucket = floor(ln(max(1, |dt|)) / 0.301), clipped to `num_buckets - 1`.

  Args:
    dt: time differences (any real or int dtype), in seconds.
    num_buckets: number of buckets.

  Returns:
    int32 buckets in `[0, num_buckets)`.
  """
  gap = jnp.maximum(jnp.abs(dt).astype(jnp.float32), 1.0)
  bucket = jnp.floor(jnp.log(gap) / TIME_BUCKET_DIVISOR).astype(jnp.int32)
  return jnp.clip(bucket, 0, num_buckets - 1)


def _lookup(table: jax.Array, buckets: jax.Array) -> jax.Array:
  """`table[H, nb]` at `buckets[..., Tq, Tk]` -> `[..., H, Tq, Tk]`."""
  out = jnp.take(table, buckets, axis=1)  # [H, ..., Tq, Tk]
  return jnp.moveaxis(out, 0, -3)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["table"],
    meta_fields=["num_buckets", "max_distance", "bidirectional"])
@dataclasses.dataclass(frozen=True)
class PositionBucketBias(Bias):
  """Learned T5 relative-position bias: `table[h, bucket(q - k)]`.

  Attributes:
    table: `[H, num_buckets]` learned scalars.
    num_buckets, max_distance, bidirectional: see `relative_position_bucket`.
  """

  table: jax.Array
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = False

  def tile(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    buckets = relative_position_bucket(
        q_pos[:, None] - k_pos[None, :], bidirectional=self.bidirectional,
        num_buckets=self.num_buckets, max_distance=self.max_distance)
    return _lookup(self.table, buckets)[None]  # [1, H, Tq, Tk]


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["slopes"],
    meta_fields=["bidirectional"])
@dataclasses.dataclass(frozen=True)
class ALiBiBias(Bias):
  """ALiBi: `-slopes[h] * (q - k)` (causal) or `-slopes[h] * |q - k|`.

  Attributes:
    slopes: `[H]` fixed positive slopes (see `alibi_slopes`).
    bidirectional: use the symmetric |q - k| penalty.
  """

  slopes: jax.Array
  bidirectional: bool = False

  def tile(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    dist = (q_pos[:, None] - k_pos[None, :]).astype(self.slopes.dtype)
    if self.bidirectional:
      dist = jnp.abs(dist)
    return -self.slopes[None, :, None, None] * dist[None, None]


def alibi_slopes(num_heads: int) -> jax.Array:
  """The geometric slopes `2^(-8 h / H)`, h = 1..H, as `[H]` float32.

  For H a power of two this is the paper's sequence; for other H the paper
  interleaves two power-of-two sequences instead, here the same formula is
  used for every H.
  """
  h = jnp.arange(1, num_heads + 1, dtype=jnp.float32)
  return jnp.exp2(-8.0 * h / num_heads)


def alibi(num_heads: int, bidirectional: bool = False) -> ALiBiBias:
  """The ALiBi bias for `num_heads` heads (no parameters)."""
  return ALiBiBias(slopes=alibi_slopes(num_heads), bidirectional=bidirectional)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["table", "timestamps", "query_timestamps"],
    meta_fields=["num_buckets"])
@dataclasses.dataclass(frozen=True)
class TimeBucketBias(Bias):
  """Learned time-interval bias: `table[h, time_bucket(t_q - t_k)]`.

  Attributes:
    table: `[H, num_buckets]` learned scalars.
    timestamps: `[B, Lk]` timestamps of the keys in seconds, indexed by key
      position. Integer timestamps are subtracted exactly; float32 epoch
      seconds (~1.7e9) lose ~100 s of resolution, so pass ints or offsets.
    query_timestamps: `[B, Lk]` timestamps of the queries, indexed by the
      query's key-coordinate position; None uses `timestamps` (self-attention
      on the same items).
    num_buckets: number of buckets (see `time_interval_bucket`).
  """

  table: jax.Array
  timestamps: jax.Array
  query_timestamps: jax.Array | None = None
  num_buckets: int = 128

  def tile(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    length = self.timestamps.shape[1]
    qts = (self.timestamps if self.query_timestamps is None
           else self.query_timestamps)
    # Padded tiles may run past the last key; those entries are masked.
    t_q = jnp.take(qts, jnp.clip(q_pos, 0, length - 1), axis=1)  # [B, Tq]
    t_k = jnp.take(self.timestamps, jnp.clip(k_pos, 0, length - 1), axis=1)
    dt = t_q[:, :, None] - t_k[:, None, :]  # [B, Tq, Tk]
    buckets = time_interval_bucket(dt, self.num_buckets)
    return _lookup(self.table, buckets)  # [B, H, Tq, Tk]


def next_timestamps(timestamps: jax.Array) -> jax.Array:
  """`[B, L]` -> timestamps of the next item, the last one repeated.

  Used as `query_timestamps`, this reproduces generative-recommenders'
  HSTU, which buckets ts(next item) - ts(key): the interval between each key
  and the moment the prediction is made.
  """
  return jnp.concatenate([timestamps[:, 1:], timestamps[:, -1:]], axis=1)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["parts"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SumBias(Bias):
  """The sum of several `Bias` objects (broadcast to `[B|1, H|1, Tq, Tk]`).

  Attributes:
    parts: tuple of `Bias` objects.
  """

  parts: tuple[Bias, ...]

  def tile(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    total = self.parts[0].tile(q_pos, k_pos)
    for part in self.parts[1:]:
      total = total + part.tile(q_pos, k_pos)
    return total


def combine(*parts):
  """Sums biases, skipping None: a `SumBias`, the single bias, or None.

  Args:
    *parts: `Bias` objects or None. Dense arrays can be summed directly with
      `+`; mixing them with `Bias` objects would need the sequence lengths,
      so it raises TypeError (convert with `biases.dense` first).
  """
  parts = [p for p in parts if p is not None]
  if not parts:
    return None
  for p in parts:
    if not isinstance(p, Bias):
      raise TypeError(f"combine() takes Bias objects or None, got {type(p)}; "
                      "turn Bias objects into arrays with biases.dense(...) "
                      "and add dense arrays with +")
  if len(parts) == 1:
    return parts[0]
  flat = []
  for p in parts:
    flat.extend(p.parts if isinstance(p, SumBias) else (p,))
  return SumBias(parts=tuple(flat))


class RelativePositionBias(nnx.Module):
  """Owns the `[H, num_buckets]` table of a T5 relative-position bias.

  `module()` returns a `PositionBucketBias` for any attention variant.
  """

  def __init__(self, num_heads: int, num_buckets: int = 32,
               max_distance: int = 128, bidirectional: bool = False, *,
               rngs: nnx.Rngs, init_std: float = 0.02):
    if num_buckets < (4 if bidirectional else 2):
      raise ValueError(f"RelativePositionBias: num_buckets={num_buckets} is "
                       "too small")
    self.num_buckets = num_buckets
    self.max_distance = max_distance
    self.bidirectional = bidirectional
    self.table = nnx.Param(
        init_std * jax.random.normal(rngs.params(), (num_heads, num_buckets)))

  def __call__(self) -> PositionBucketBias:
    return PositionBucketBias(
        table=self.table[...], num_buckets=self.num_buckets,
        max_distance=self.max_distance, bidirectional=self.bidirectional)


class TimeIntervalBias(nnx.Module):
  """Owns the `[H, num_buckets]` table of a time-interval bias.

  `module(timestamps)` returns a `TimeBucketBias` for timestamps `[B, L]`.
  """

  def __init__(self, num_heads: int, num_buckets: int = 128, *,
               rngs: nnx.Rngs, init_std: float = 0.02):
    self.num_buckets = num_buckets
    self.table = nnx.Param(
        init_std * jax.random.normal(rngs.params(), (num_heads, num_buckets)))

  def __call__(self, timestamps: jax.Array,
               query_timestamps: jax.Array | None = None) -> TimeBucketBias:
    """Args: `timestamps` `[B, Lk]` seconds; optional `query_timestamps`."""
    return TimeBucketBias(
        table=self.table[...], timestamps=timestamps,
        query_timestamps=query_timestamps, num_buckets=self.num_buckets)
