"""Tests for recattn.attention.hstu (HSTU pointwise attention).

References: a float64 numpy implementation for values (its own mask logic),
a float64 jnp implementation under `jax.enable_x64` for gradients.
bf16 tolerance: |out_bf16 - out_f32| <= 3e-2 * max|out_f32|.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recattn.attention import biases
from recattn.attention import hstu as hstu_lib
from recattn.attention import relative
from recattn.attention import weights as weights_lib
from recattn.attention.hstu import hstu
from recattn.attention.masks import Mask

import attention_reference


def np_allowed(b, lq, lk, causal=True, lengths=None, window=None,
               num_targets=None):
  """Independent numpy mask, `[B, 1, Lq, Lk]` bool (left padding)."""
  key_valid = None
  if lengths is not None:
    key_valid = np.arange(lk)[None, :] >= lk - np.asarray(lengths)[:, None]
  ok = attention_reference.visible(lq, lk, causal=causal,
                                   key_valid=key_valid, window=window,
                                   num_targets=num_targets)
  return np.broadcast_to(ok[:, None], (b, 1, lq, lk)).copy()


def np_hstu(q, k, v, allowed, bias=None, alpha=None, normalizer="padded"):
  """float64 numpy HSTU; returns (out [B,Lq,H,Dv], weights [B,H,Lq,Lk])."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  if alpha is None:
    alpha = 1 / math.sqrt(q.shape[-1])
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * alpha
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  a = s / (1 + np.exp(-s))
  a = np.where(allowed, a, 0.0)
  if normalizer == "padded":
    a = a / k.shape[1]
  else:
    a = a / np.maximum(allowed.sum(-1, keepdims=True), 1)
  return np.einsum("bhqk,bkhd->bqhd", a, v), a


# Inputs are made with numpy: eager jax.random ops would compile per shape.
def randn(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def make_inputs(b, lq, lk, h, d, dv, seed=0):
  return (randn(seed, b, lq, h, d), randn(seed + 100, b, lk, h, d),
          randn(seed + 200, b, lk, h, dv))


def lengths_for(b, lk):
  # Left padding of varied length; the first row has no padding.
  return [lk - (3 * i) % lk for i in range(b)]


def key_valid(lengths, lk):
  return np.arange(lk)[None, :] >= (lk - np.asarray(lengths))[:, None]


CASES = [  # (B, Lq, Lk, H, Dh, Dv), mask options
    ((2, 8, 8, 2, 4, 4), dict(causal=True)),
    ((3, 5, 11, 3, 8, 6), dict(causal=True)),
    ((2, 8, 8, 2, 4, 4), dict(causal=False)),
    ((3, 5, 11, 3, 8, 6), dict(causal=False)),
    ((1, 13, 13, 1, 4, 2), dict(causal=True, window=3)),
    ((3, 5, 11, 3, 8, 6), dict(causal=True, num_targets=3)),
]
NORMALIZERS = ("padded", "true")
BLOCKS = (None, 4)  # 4 divides Lk = 8 but not 11 or 13


PATHS = [(n, blk) for n in NORMALIZERS for blk in BLOCKS]


@jax.jit
def _all_paths(q, k, v, mask, bias):
  outs = [hstu(q, k, v, mask, bias, normalizer=n, block_k=blk)[0]
          for n, blk in PATHS]
  weights = {n: hstu(q, k, v, mask, bias, normalizer=n,
                     return_weights=True)[1] for n in NORMALIZERS}
  return outs, weights


def all_paths(q, k, v, mask, bias):
  """{(normalizer, block_k): out} and {normalizer: weights}, one compile."""
  outs, weights = _all_paths(q, k, v, mask, bias)
  return dict(zip(PATHS, outs)), weights


@pytest.mark.parametrize("shape,mask_kw", CASES)
def test_matches_numpy(shape, mask_kw):
  b, lq, lk, h, d, dv = shape
  q, k, v = make_inputs(b, lq, lk, h, d, dv)
  lengths = lengths_for(b, lk)
  mask = Mask(key_valid=key_valid(lengths, lk), **mask_kw)
  bias = randn(7, 1, h, lq, lk)
  allowed = np_allowed(b, lq, lk, lengths=lengths, **mask_kw)
  outs, weights = all_paths(q, k, v, mask, bias)
  for normalizer in NORMALIZERS:
    ref_out, ref_w = np_hstu(q, k, v, allowed, bias, normalizer=normalizer)
    np.testing.assert_allclose(weights[normalizer], ref_w, atol=2e-6,
                               rtol=1e-4)
    for block_k in BLOCKS:
      np.testing.assert_allclose(outs[normalizer, block_k], ref_out,
                                 atol=2e-5, rtol=1e-4)


def test_masked_weights_exactly_zero_and_empty_queries_output_zero():
  b, lq, lk, h, d = 2, 6, 6, 2, 4
  q, k, v = make_inputs(b, lq, lk, h, d, d, seed=1)
  lengths = [6, 2]  # row 1: the first 4 queries see only padding
  mask = Mask(causal=True, key_valid=key_valid(lengths, lk))
  allowed = np_allowed(b, lq, lk, lengths=lengths)
  outs, weights = all_paths(q, k, v, mask, None)
  for w in weights.values():
    assert np.all(np.asarray(w)[~np.broadcast_to(allowed, w.shape)] == 0.0)
    assert np.all(np.asarray(w)[np.broadcast_to(allowed, w.shape)] != 0.0)
  for out in outs.values():
    np.testing.assert_array_equal(out[1, :4], 0.0)
    assert np.all(np.asarray(out[1, 4:]) != 0.0)


def test_alpha_default_and_explicit():
  q, k, v = make_inputs(1, 6, 6, 2, 16, 16, seed=2)
  mask = Mask()
  allowed = np_allowed(1, 6, 6)
  out, out1 = jax.jit(lambda q, k, v: (hstu(q, k, v, mask)[0],
                                       hstu(q, k, v, mask, alpha=1.0)[0]))(
                                           q, k, v)
  np.testing.assert_allclose(out, np_hstu(q, k, v, allowed, alpha=0.25)[0],
                             atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(out1, np_hstu(q, k, v, allowed, alpha=1.0)[0],
                             atol=2e-5, rtol=1e-4)


def test_causality():
  b, l, h, d = 2, 9, 2, 4
  q, k, v = make_inputs(b, l, l, h, d, d, seed=3)
  mask = Mask(causal=True, key_valid=key_valid([9, 6], l))
  outs, _ = all_paths(q, k, v, mask, relative.alibi(h))
  for t in (2, 5, 7):
    k2, v2 = k.copy(), v.copy()
    k2[:, t + 1:] += 3.0
    v2[:, t + 1:] -= 2.0
    outs2, _ = all_paths(q, k2, v2, mask, relative.alibi(h))
    for key, out in outs.items():
      np.testing.assert_array_equal(outs2[key][:, :t + 1], out[:, :t + 1])
      assert not np.allclose(outs2[key][:, t + 1:], out[:, t + 1:])


def test_padding_invariance():
  b, l, h, d = 2, 8, 2, 4
  q, k, v = make_inputs(b, l, l, h, d, d, seed=4)
  lengths = [5, 3]
  valid = key_valid(lengths, l)
  mask = Mask(causal=False, key_valid=valid)
  bias = relative.alibi(h, bidirectional=True)
  outs, _ = all_paths(q, k, v, mask, bias)
  noise = randn(9, *k.shape) * 5
  pad = ~valid[:, :, None, None]
  outs2, _ = all_paths(q, np.where(pad, noise, k), np.where(pad, -noise, v),
                       mask, bias)
  for key, out in outs.items():
    np.testing.assert_allclose(outs2[key], out, atol=1e-6)


def test_true_normalizer_independent_of_padding_amount():
  # The same 4 items, with 0 or 3 padding slots in front: with "true" the
  # outputs agree; with "padded" they are scaled by 4 / 7.
  q, k, v = make_inputs(1, 4, 4, 2, 4, 4, seed=5)
  pad = lambda x: np.concatenate([np.zeros_like(x[:, :3]), x], axis=1)
  short, _ = all_paths(q, k, v, Mask(causal=True), None)
  long, _ = all_paths(pad(q), pad(k), pad(v),
                      Mask(causal=True, key_valid=key_valid([4], 7)), None)
  for (normalizer, block_k), out in short.items():
    scale = 1.0 if normalizer == "true" else 4 / 7
    np.testing.assert_allclose(long[normalizer, block_k][:, 3:], out * scale,
                               atol=1e-6)


def test_relative_biases_plug_in():
  b, lq, lk, h, d = 2, 5, 9, 2, 4
  q, k, v = make_inputs(b, lq, lk, h, d, d, seed=6)
  lengths = lengths_for(b, lk)
  mask = Mask(causal=True, key_valid=key_valid(lengths, lk))
  ts = np.cumsum(np.random.default_rng(1).integers(0, 5000, (b, lk)),
                 axis=1).astype(np.int32)
  bias = relative.combine(
      relative.PositionBucketBias(
          table=randn(2, h, 8), num_buckets=8,
          max_distance=16),
      relative.TimeBucketBias(
          table=randn(3, h, 16), timestamps=ts,
          num_buckets=16))
  # The dense form is checked against numpy in attention_relative_test.
  dense = jax.jit(biases.dense, static_argnums=(1, 2))(bias, lq, lk)
  assert dense.shape == (b, h, lq, lk)
  outs, _ = all_paths(q, k, v, mask, bias)
  allowed = np_allowed(b, lq, lk, lengths=lengths)
  for (normalizer, _), out in outs.items():
    ref, _ = np_hstu(q, k, v, allowed, dense, normalizer=normalizer)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


def jnp_hstu64(q, k, v, allowed, bias, alpha, normalizer):
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * alpha + bias
  a = jnp.where(allowed, jax.nn.silu(s), 0.0)
  n = (k.shape[1] if normalizer == "padded"
       else jnp.maximum(allowed.sum(-1, keepdims=True), 1))
  return jnp.einsum("bhqk,bkhd->bqhd", a / n, v)


def test_gradients_match_float64_reference():
  b, lq, lk, h, d, dv = 2, 6, 7, 2, 4, 3
  q, k, v = make_inputs(b, lq, lk, h, d, dv, seed=8)
  lengths = [7, 4]
  mask = Mask(causal=True, key_valid=key_valid(lengths, lk))
  bias = randn(4, 1, h, lq, lk)
  w = randn(5, b, lq, h, dv)
  configs = [("padded", None), ("true", 4)]

  @jax.jit
  def grads(q, k, v, bias):
    def loss(q, k, v, bias, normalizer, block_k):
      out, _ = hstu(q, k, v, mask, bias, normalizer=normalizer,
                    block_k=block_k)
      return jnp.sum(jnp.sin(out * 10) * w)
    return [jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias, *c)
            for c in configs]

  got = dict(zip(configs, grads(q, k, v, bias)))
  allowed = np_allowed(b, lq, lk, lengths=lengths)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(np.asarray(x), jnp.float64)
              for x in (q, k, v, bias, w)]

    @jax.jit
    def grads64(q, k, v, bias, w):
      def loss64(q, k, v, bias, normalizer):
        out = jnp_hstu64(q, k, v, allowed, bias, 1 / math.sqrt(d), normalizer)
        return jnp.sum(jnp.sin(out * 10) * w)
      return {n: jax.grad(loss64, argnums=(0, 1, 2, 3))(q, k, v, bias, n)
              for n in NORMALIZERS}

    ref = jax.tree.map(np.asarray, grads64(*args64))
  for (normalizer, _), g32 in got.items():
    for g, r in zip(g32, ref[normalizer]):
      assert np.abs(r).max() > 0
      np.testing.assert_allclose(g, r, atol=2e-5 * np.abs(r).max(),
                                 rtol=1e-3)


def test_jit_vmap_no_retrace():
  b, l, h, d, nb = 2, 8, 2, 4, 8
  traces = []

  @jax.jit
  def f(q, k, v, valid, ts, table):
    traces.append(1)
    bias = relative.TimeBucketBias(table=table, timestamps=ts, num_buckets=nb)
    return [hstu(q, k, v, Mask(key_valid=valid), bias, block_k=blk)[0]
            for blk in (None, 4)]

  def expected(q, k, v, valid, ts, table):
    dt = np.abs(np.asarray(ts)[:, :, None] - np.asarray(ts)[:, None, :])
    bucket = np.clip(np.floor(np.log(np.maximum(dt, 1)) / 0.301), 0,
                     nb - 1).astype(int)
    dense = np.moveaxis(np.asarray(table)[:, bucket], 0, 1)
    allowed = np_allowed(b, l, l, lengths=np.asarray(valid).sum(-1))
    return np_hstu(q, k, v, allowed, dense)[0]

  ts = np.cumsum(np.full((b, l), 30, np.int32), axis=1)
  table = randn(0, h, nb)
  for seed in range(3):
    q, k, v = make_inputs(b, l, l, h, d, d, seed=seed)
    args = (q, k, v, key_valid([l, l - seed - 1], l), ts * (seed + 7),
            table * (seed + 1))
    ref = expected(*args)
    for out in f(*args):
      np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)
  assert len(traces) == 1

  # vmap over an extra leading axis, mask and bias included.
  n = 3
  qs, ks, vs = make_inputs(n * b, l, l, h, d, d, seed=11)
  split = lambda x: x.reshape(n, b, *x.shape[1:])
  qs, ks, vs = split(qs), split(ks), split(vs)
  valid = np.stack([key_valid([l, l - i - 1], l) for i in range(n)])
  tss = np.stack([ts * (i + 7) for i in range(n)])
  outs = jax.vmap(f, in_axes=(0, 0, 0, 0, 0, None))(qs, ks, vs, valid, tss,
                                                     table)
  for i in range(n):
    ref = expected(qs[i], ks[i], vs[i], valid[i], tss[i], table)
    for out in outs:
      np.testing.assert_allclose(out[i], ref, atol=2e-5, rtol=1e-4)


def test_bf16_close_to_f32():
  # Same shapes as test_causality, so the float32 program is reused.
  b, l, h, d = 2, 9, 2, 4
  q, k, v = make_inputs(b, l, l, h, d, d, seed=12)
  mask = Mask(causal=True, key_valid=key_valid([9, 6], l))
  bias = relative.alibi(h)
  ref, _ = all_paths(q, k, v, mask, bias)
  out, _ = all_paths(*[x.astype(jnp.bfloat16) for x in (q, k, v)], mask, bias)
  for key, r in ref.items():
    assert out[key].dtype == jnp.bfloat16
    err = np.abs(np.asarray(out[key], np.float32) - np.asarray(r)).max()
    # bf16 keeps 8 bits of mantissa (relative step 2^-8 = 4e-3); about 1e-2
    # relative to the largest output is seen, 3e-2 leaves margin.
    assert err <= 3e-2 * np.abs(np.asarray(r)).max(), (key, err)


def test_errors(monkeypatch):
  q, k, v = make_inputs(1, 4, 4, 1, 4, 4)
  with pytest.raises(ValueError, match="normalizer"):
    hstu(q, k, v, Mask(), normalizer="softmax")
  with pytest.raises(ValueError, match="block_k"):
    hstu(q, k, v, Mask(), block_k=0)
  monkeypatch.setattr(weights_lib, "MAX_WEIGHT_ELEMENTS", 8)
  with pytest.raises(ValueError, match="return_weights"):
    hstu(q, k, v, Mask(), return_weights=True)
  # Without weights the same call is fine.
  assert hstu(q, k, v, Mask())[1] is None
  assert hstu_lib.NORMALIZERS == ("padded", "true")
