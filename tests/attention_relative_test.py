"""Tests for recattn.attention.relative (position, ALiBi and time biases).

Bucket functions are checked against hand-computed values and a float64
numpy implementation; every `tile` against slices of the dense bias.
Inputs are numpy arrays: eager jax.random ops would compile per shape.
"""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recattn.attention import biases
from recattn.attention import relative
from recattn.attention.hstu import hstu
from recattn.attention.masks import Mask
from recattn.attention.scaled_dot import scaled_dot


def randn(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def np_t5_bucket(rel, bidirectional, num_buckets, max_distance):
  """float64 numpy T5 buckets of q_pos - k_pos."""
  rel = np.asarray(rel, np.int64)
  offset = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    offset = np.where(rel < 0, num_buckets, 0)
    n = np.abs(rel)
  else:
    n = np.maximum(rel, 0)
  exact = num_buckets // 2
  with np.errstate(divide="ignore"):
    large = exact + np.floor(np.log(np.maximum(n, 1) / exact)
                             / np.log(max_distance / exact)
                             * (num_buckets - exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return offset + np.where(n < exact, n, large)


def np_time_bucket(dt, num_buckets):
  dt = np.abs(np.asarray(dt, np.float64))
  b = np.floor(np.log(np.maximum(dt, 1.0)) / 0.301).astype(np.int64)
  return np.clip(b, 0, num_buckets - 1)


def positions(lq, lk):
  return np.arange(lq)[:, None] + (lk - lq), np.arange(lk)[None, :]


def test_relative_position_bucket_hand_values():
  causal = {-5: 0, 0: 0, 1: 1, 15: 15, 16: 16, 20: 17, 31: 21, 32: 21,
            63: 26, 64: 26, 100: 30, 127: 31, 128: 31, 1000: 31}
  got = relative.relative_position_bucket(jnp.array(list(causal)))
  assert got.tolist() == list(causal.values())
  # bidirectional: 16 buckets a side, 8 exact; future keys (q - k < 0)
  # get 16 + bucket(|q - k|).
  bidir = {-200: 31, -16: 26, -8: 24, -3: 19, -1: 17, 0: 0, 3: 3, 7: 7,
           8: 8, 11: 8, 16: 10, 31: 11, 32: 12, 64: 14, 127: 15, 200: 15}
  got = relative.relative_position_bucket(jnp.array(list(bidir)),
                                          bidirectional=True)
  assert got.tolist() == list(bidir.values())
  small = {0: 0, 1: 1, 2: 2, 3: 2, 5: 3, 9: 3}  # 4 buckets, max_distance 8
  got = relative.relative_position_bucket(jnp.array(list(small)),
                                          num_buckets=4, max_distance=8)
  assert got.tolist() == list(small.values())


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20),
                                                      (10, 64)])
def test_relative_position_bucket_matches_numpy(bidirectional, num_buckets,
                                                max_distance):
  rel = np.arange(-300, 301)
  got = relative.relative_position_bucket(
      jnp.asarray(rel), bidirectional=bidirectional, num_buckets=num_buckets,
      max_distance=max_distance)
  ref = np_t5_bucket(rel, bidirectional, num_buckets, max_distance)
  np.testing.assert_array_equal(got, ref)
  assert got.min() >= 0 and got.max() == num_buckets - 1


def test_time_interval_bucket_hand_values():
  # floor(ln(max(1, |dt|)) / 0.301): ln 2 / 0.301 = 2.30, ln 86400 / 0.301 =
  # 37.8, ln(365 days) / 0.301 = 57.4.
  hand = {0: 0, 1: 0, -1: 0, 2: 2, 3: 3, 10: 7, -10: 7, 100: 15, 3600: 27,
          86400: 37, 31536000: 57}
  got = relative.time_interval_bucket(jnp.array(list(hand), jnp.int32))
  assert got.tolist() == list(hand.values())
  got = relative.time_interval_bucket(jnp.array([0.5, 100.0, 1e20]),
                                      num_buckets=8)
  assert got.tolist() == [0, 7, 7]


def test_alibi_slopes_and_values():
  np.testing.assert_allclose(relative.alibi_slopes(8),
                             [2.0**-i for i in range(1, 9)])
  np.testing.assert_allclose(relative.alibi_slopes(4),
                             [2.0**-i for i in (2, 4, 6, 8)])
  np.testing.assert_allclose(relative.alibi_slopes(3),
                             [2 ** (-8 * h / 3) for h in (1, 2, 3)], rtol=1e-6)
  dense = biases.dense(relative.alibi(2), 3, 5)  # queries at 2, 3, 4
  assert dense.shape == (1, 2, 3, 5)
  assert float(dense[0, 0, 0, 0]) == -2 / 16  # slope 2^-4, distance 2
  assert float(dense[0, 1, 2, 1]) == -3 / 256  # slope 2^-8, distance 3
  assert float(dense[0, 1, 2, 4]) == 0.0
  bidir = biases.dense(relative.alibi(2, bidirectional=True), 3, 5)
  assert float(bidir[0, 0, 0, 4]) == -2 / 16  # |2 - 4|
  assert float(dense[0, 0, 0, 4]) == 2 / 16  # causal: future keys masked


def make_biases(b, lk, h, seed=0):
  """One of each bias, with numpy float64 dense references `[B|1,H,Lq,Lk]`."""
  rng = np.random.default_rng(seed)
  ts = np.cumsum(rng.integers(0, 100000, (b, lk)), axis=1).astype(np.int32)
  qts = relative.next_timestamps(jnp.asarray(ts))
  t_pos, t_bid = randn(seed + 1, h, 12), randn(seed + 2, h, 10)
  t_time = randn(seed + 3, h, 32)

  def refs(lq):
    qp, kp = positions(lq, lk)
    rel = qp - kp
    slopes = 2.0 ** (-8 * np.arange(1, h + 1) / h)
    time = lambda tq: np.moveaxis(t_time[:, np_time_bucket(
        tq[:, qp[:, 0]][:, :, None] - ts[:, None, :], 32)], 0, 1)
    pos = t_pos[:, np_t5_bucket(rel, False, 12, 30)][None]
    return {
        "position": pos,
        "position_bidirectional": t_bid[:, np_t5_bucket(rel, True, 10, 40)][
            None],
        "alibi": -slopes[None, :, None, None] * rel,
        "alibi_bidirectional": -slopes[None, :, None, None] * np.abs(rel),
        "time": time(ts),
        "time_next": time(np.asarray(qts)),
        "sum": pos + time(ts),
    }

  objs = {
      "position": relative.PositionBucketBias(table=t_pos, num_buckets=12,
                                              max_distance=30),
      "position_bidirectional": relative.PositionBucketBias(
          table=t_bid, num_buckets=10, max_distance=40, bidirectional=True),
      "alibi": relative.alibi(h),
      "alibi_bidirectional": relative.alibi(h, bidirectional=True),
      "time": relative.TimeBucketBias(table=t_time, timestamps=ts,
                                      num_buckets=32),
      "time_next": relative.TimeBucketBias(
          table=t_time, timestamps=ts, query_timestamps=qts, num_buckets=32),
  }
  objs["sum"] = relative.combine(objs["position"], None, objs["time"])
  return objs, refs


@jax.jit
def dense_and_tiles(objs, q_pos, k_pos):
  """Dense [Lq=7, Lk=11] biases and tiles at (q_pos, k_pos), one compile."""
  return ({name: biases.dense(o, 7, 11) for name, o in objs.items()},
          {name: o.tile(q_pos, k_pos) for name, o in objs.items()})


def test_dense_matches_numpy_and_tiles_are_slices():
  b, lq, lk, h = 2, 7, 11, 3
  objs, refs = make_biases(b, lk, h)
  ref = refs(lq)
  # Arbitrary tiles, unsorted and with repeats (queries sit at key
  # positions 4..10).
  q_pos = np.array([10, 4, 7, 7, 5])
  k_pos = np.array([0, 9, 3, 10, 3, 1])
  dense, tiles = dense_and_tiles(objs, q_pos, k_pos)
  for name, r in ref.items():
    np.testing.assert_allclose(dense[name], r, rtol=1e-6, atol=1e-6,
                               err_msg=name)
    np.testing.assert_array_equal(
        tiles[name], np.asarray(dense[name])[:, :, q_pos - (lk - lq)][
            ..., k_pos], err_msg=name)
  assert dense["time"].shape == (b, h, lq, lk)
  assert dense["position"].shape == (1, h, lq, lk)
  # next_timestamps: the next item's time, the last one repeated.
  ts = np.asarray(objs["time"].timestamps)
  np.testing.assert_array_equal(objs["time_next"].query_timestamps,
                                np.concatenate([ts[:, 1:], ts[:, -1:]], 1))


def test_combine():
  a, b = relative.alibi(2), relative.alibi(2, bidirectional=True)
  assert relative.combine() is None
  assert relative.combine(None, None) is None
  assert relative.combine(None, a) is a
  s = relative.combine(a, relative.combine(b, a))
  assert isinstance(s, relative.SumBias) and len(s.parts) == 3
  with pytest.raises(TypeError, match="biases.dense"):
    relative.combine(a, jnp.zeros((1, 2, 3, 3)))


def np_softmax_attention(q, k, v, allowed, bias):
  s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) / math.sqrt(
      q.shape[-1]) + bias
  s = np.where(allowed, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v.astype(np.float64))


@pytest.mark.parametrize("name", ["position", "alibi", "time", "sum"])
def test_plugs_into_scaled_dot_and_hstu(name):
  b, l, h, d = 2, 11, 3, 4
  objs, refs = make_biases(b, l, h, seed=5)
  bias, ref_bias = objs[name], refs(l)[name]
  q, k, v = (randn(s, b, l, h, d) for s in (10, 11, 12))
  allowed = positions(l, l)[1] <= positions(l, l)[0]

  @jax.jit
  def run(q, k, v, bias):
    mask = Mask(causal=True)
    return (scaled_dot(q, k, v, mask, biases.dense(bias, l, l))[0],
            hstu(q, k, v, mask, bias)[0],
            hstu(q, k, v, mask, bias, block_k=4)[0])

  sdp, hs, hs_blk = run(q, k, v, bias)
  np.testing.assert_allclose(
      sdp, np_softmax_attention(q, k, v, allowed, ref_bias), atol=2e-5,
      rtol=1e-4)
  s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) / 2 + ref_bias
  a = np.where(allowed, s / (1 + np.exp(-s)), 0) / l
  ref = np.einsum("bhqk,bkhd->bqhd", a, v.astype(np.float64))
  np.testing.assert_allclose(hs, ref, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(hs_blk, ref, atol=2e-5, rtol=1e-4)


class BiasedAttention(nnx.Module):
  """Position + time biases around hstu, as the HSTU block will use them."""

  def __init__(self, h, *, rngs):
    self.pos = relative.RelativePositionBias(h, num_buckets=8,
                                             max_distance=16, rngs=rngs)
    self.time = relative.TimeIntervalBias(h, num_buckets=16, rngs=rngs)

  def __call__(self, q, k, v, ts, block_k=None):
    bias = relative.combine(self.pos(), self.time(ts))
    return hstu(q, k, v, Mask(causal=True), bias, block_k=block_k)[0]


def test_modules_gradients_reach_tables():
  b, l, h, d = 2, 9, 2, 4
  model = BiasedAttention(h, rngs=nnx.Rngs(0))
  assert model.pos.table.shape == (h, 8)
  assert model.time.table.shape == (h, 16)
  ts = np.cumsum(np.random.default_rng(0).integers(0, 400, (b, l)),
                 axis=1).astype(np.int32)
  q, k, v = (randn(s, b, l, h, d) for s in (20, 21, 22))

  @nnx.jit
  def grads(model, q, k, v, ts):
    loss = lambda m, blk: jnp.sum(m(q, k, v, ts, blk) ** 2)
    return (nnx.grad(lambda m: loss(m, None))(model),
            nnx.grad(lambda m: loss(m, 3))(model))

  g_dense, g_blk = grads(model, q, k, v, ts)
  qp, kp = positions(l, l)
  causal = kp <= qp
  used_pos = np.unique(np_t5_bucket((qp - kp)[causal], False, 8, 16))
  dt = ts[:, :, None] - ts[:, None, :]
  used_time = np.unique(np_time_bucket(dt[:, causal], 16))
  for g, used, n in ((g_dense.pos.table, used_pos, 8),
                     (g_dense.time.table, used_time, 16)):
    g = np.asarray(g[...])
    assert np.all(np.abs(g[:, used]) > 0)
    unused = np.setdiff1d(np.arange(n), used)
    assert unused.size and np.all(g[:, unused] == 0)
  # The tiled path gives the same table gradients.
  for a, c in zip(jax.tree.leaves(g_dense), jax.tree.leaves(g_blk)):
    np.testing.assert_allclose(a, c, atol=1e-6, rtol=1e-5)


def test_jit_vmap_no_retrace():
  b, l, h = 2, 9, 2
  traces = []

  @jax.jit
  def f(bias):
    traces.append(1)
    return biases.dense(bias, l, l)

  objs, refs = make_biases(b, l, h, seed=1)
  for seed in range(3):
    objs2, refs2 = make_biases(b, l, h, seed=seed)
    np.testing.assert_allclose(f(objs2["sum"]), refs2(l)["sum"], atol=1e-6)
  assert len(traces) == 1

  # nnx.jit: new parameter values do not retrace.
  model = relative.RelativePositionBias(h, num_buckets=8, max_distance=16,
                                        rngs=nnx.Rngs(0))
  traces.clear()

  @nnx.jit
  def g(model):
    traces.append(1)
    return biases.dense(model(), l, l)

  first = g(model)
  model.table[...] = model.table[...] + 1.0
  np.testing.assert_allclose(g(model), first + 1.0, atol=1e-6)
  assert len(traces) == 1

  # vmap over stacked bias objects (a leading axis on every leaf).
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[make_biases(b, l, h, seed=s)[0]["sum"]
                           for s in range(3)])
  q_pos, k_pos = jnp.arange(4, 9), jnp.arange(l)
  tiles = jax.vmap(lambda o: o.tile(q_pos, k_pos))(stacked)
  for s in range(3):
    np.testing.assert_allclose(tiles[s], make_biases(b, l, h, seed=s)[1](l)[
        "sum"][:, :, 4:], atol=1e-6)


def test_module_errors():
  with pytest.raises(ValueError, match="num_buckets"):
    relative.RelativePositionBias(2, num_buckets=2, bidirectional=True,
                                  rngs=nnx.Rngs(0))
