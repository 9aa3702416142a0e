"""Tests for blockwise (flash-style) attention.

Forward outputs are checked against a float64 numpy implementation of masked
softmax attention (mask rules restated from `masks.Mask`'s docstring) and
against `scaled_dot` on the same inputs; gradients against a float64 jnp
implementation of the same formula differentiated by `jax.grad` under
`jax.enable_x64`. float32 tolerance: 2e-5 (outputs), 5e-5 (gradients).
bf16 inputs must agree with float32 on the same (bf16-rounded) inputs within
atol 3e-2 on O(1) outputs (bf16 has an 8-bit mantissa, ~4e-3 relative).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recattn.attention import biases
from recattn.attention import blockwise as blockwise_lib
from recattn.attention.blockwise import blockwise
from recattn.attention.masks import Mask
from recattn.attention.scaled_dot import scaled_dot

import attention_reference

B, H, D = 2, 3, 8


def _inputs(lq, lk, seed=0, b=B, h=H, d=D):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, lq, h, d)).astype(np.float32)
  k = rng.normal(size=(b, lk, h, d)).astype(np.float32)
  v = rng.normal(size=(b, lk, h, d)).astype(np.float32)
  return q, k, v


def _left_padding(lk, pads=(5, 0)):
  """`[B, lk]` key_valid with `pads[b]` leading padding keys."""
  valid = np.ones((len(pads), lk), bool)
  for b, p in enumerate(pads):
    valid[b, :p] = False
  return valid


def _np_allowed(lq, lk, causal, key_valid, window, num_targets):
  """`[B|1, Lq, Lk]` visibility, restated from the Mask docstring."""
  return attention_reference.visible(
      lq, lk, causal=causal, key_valid=key_valid, window=window,
      num_targets=num_targets)


def _np_attention(q, k, v, allowed, bias=None, temperature=1.0):
  """float64 masked softmax attention; rows with no visible key give 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / (
      temperature * math.sqrt(q.shape[-1]))
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  allowed = np.broadcast_to(allowed[:, None], logits.shape)
  logits = np.where(allowed, logits, -np.inf)
  row_max = np.max(logits, -1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  w = np.where(allowed, np.exp(logits - row_max), 0.0)
  den = w.sum(-1, keepdims=True)
  w = w / np.where(den > 0, den, 1.0)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def _jnp_attention(q, k, v, allowed, bias=None):
  """The same formula in jnp, differentiable (used under float64)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias
  allowed = jnp.asarray(allowed)[:, None]
  logits = jnp.where(allowed, logits, -1e30)
  w = jnp.exp(logits - jnp.max(logits, -1, keepdims=True))
  w = jnp.where(allowed, w, 0.0)
  den = w.sum(-1, keepdims=True)
  w = w / jnp.where(den > 0, den, 1.0)
  return jnp.einsum("bhqk,bkhd->bqhd", w, v)


# name -> (causal, pads or None, window, num_targets)
MASKS = {
    "causal": (True, None, None, None),
    "bidirectional": (False, None, None, None),
    "causal_padded": (True, (5, 0), None, None),
    "bidirectional_padded": (False, (0, 4), None, None),
    "window": (True, (3, 0), 4, None),
    "num_targets": (True, (2, 0), None, 3),
    "num_targets_bidirectional": (False, None, None, 2),
    "window_num_targets": (True, None, 3, 2),
}


def _mask(name, lk):
  causal, pads, window, num_targets = MASKS[name]
  key_valid = None if pads is None else _left_padding(lk, pads)
  mask = Mask(causal=causal,
              key_valid=None if key_valid is None else jnp.asarray(key_valid),
              window=window, num_targets=num_targets)
  return mask, key_valid


def _allowed(name, lq, lk):
  causal, _, window, num_targets = MASKS[name]
  _, key_valid = _mask(name, lk)
  return _np_allowed(lq, lk, causal, key_valid, window, num_targets)


SHAPES = {  # lq, lk, block_q, block_k
    "divides": (16, 16, 4, 8),
    "ragged": (13, 13, 4, 5),     # blocks don't divide L
    "lq<lk": (7, 19, 3, 4),       # queries right-aligned on the keys
    "lq>lk": (19, 11, 8, 3),      # the first queries see no causal key
    "one_block": (9, 9, 128, 128),  # blocks capped at L
}


# Every mask with two shapes, every shape with three or more masks.
@pytest.mark.parametrize("mask_name,shape", [
    ("causal", "divides"), ("causal", "lq>lk"),
    ("bidirectional", "ragged"), ("bidirectional", "lq<lk"),
    ("causal_padded", "ragged"), ("causal_padded", "lq<lk"),
    ("bidirectional_padded", "divides"), ("bidirectional_padded", "lq>lk"),
    ("window", "ragged"), ("window", "lq<lk"),
    ("num_targets", "divides"), ("num_targets", "lq>lk"),
    ("num_targets_bidirectional", "one_block"),
    ("window_num_targets", "divides"), ("window_num_targets", "one_block"),
])
def test_matches_float64_reference(mask_name, shape):
  lq, lk, block_q, block_k = SHAPES[shape]
  q, k, v = _inputs(lq, lk)
  mask, _ = _mask(mask_name, lk)
  out, weights = blockwise(q, k, v, mask, block_q=block_q, block_k=block_k)
  assert weights is None
  assert out.shape == (B, lq, H, D) and out.dtype == jnp.float32
  want = _np_attention(q, k, v, _allowed(mask_name, lq, lk))
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mask_name", ["causal", "bidirectional_padded",
                                       "window_num_targets"])
def test_matches_scaled_dot_with_bias_and_temperature(mask_name):
  lq, lk = 11, 14
  q, k, v = _inputs(lq, lk, seed=1)
  mask, _ = _mask(mask_name, lk)
  bias = np.random.default_rng(2).normal(size=(1, H, lq, lk)).astype(
      np.float32)
  got, _ = blockwise(q, k, v, mask, bias, temperature=0.7, block_q=4,
                     block_k=3)
  want, _ = scaled_dot(q, k, v, mask, bias, temperature=0.7)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  ref = _np_attention(q, k, v, _allowed(mask_name, lq, lk), bias, 0.7)
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)


def test_causality():
  l = 12
  q, k, v = _inputs(l, l, seed=3)
  mask = Mask(causal=True)
  f = jax.jit(lambda q, k, v: blockwise(q, k, v, mask, block_q=4,
                                        block_k=5)[0])
  base = f(q, k, v)
  for t in range(l - 1):
    k2, v2 = k.copy(), v.copy()
    k2[:, t + 1:] += 3.0
    v2[:, t + 1:] -= 2.0
    out = f(q, k2, v2)
    np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


@pytest.mark.parametrize("causal", [True, False])
def test_padding_invariance_and_empty_rows(causal):
  l = 10
  q, k, v = _inputs(l, l, seed=4)
  valid = _left_padding(l, (4, 1))
  mask = Mask(causal=causal, key_valid=jnp.asarray(valid))
  f = jax.jit(lambda q, k, v: blockwise(q, k, v, mask, block_q=3,
                                        block_k=4)[0])
  base = f(q, k, v)
  k2, v2 = k.copy(), v.copy()
  k2[~valid] = 100.0
  v2[~valid] = -50.0
  np.testing.assert_array_equal(f(q, k2, v2), base)
  if causal:  # queries in the left padding see no key at all -> zeros
    np.testing.assert_array_equal(base[0, :4], 0.0)
    np.testing.assert_array_equal(base[1, :1], 0.0)
    grads = jax.grad(lambda q: jnp.sum(f(q, k, v)))(q)
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(grads[0, :4], 0.0)


@pytest.mark.parametrize("mask_name,lq,lk,block_q,block_k", [
    ("causal_padded", 13, 13, 4, 5),
    ("window", 7, 19, 3, 4),
    ("num_targets_bidirectional", 12, 12, 5, 5),
    ("window_num_targets", 19, 11, 8, 3),
])
def test_gradients_match_float64_reference(mask_name, lq, lk, block_q,
                                           block_k):
  q, k, v = _inputs(lq, lk, seed=5)
  cot = np.random.default_rng(6).normal(size=(B, lq, H, D))
  mask, _ = _mask(mask_name, lk)
  allowed = _allowed(mask_name, lq, lk)

  def loss(q, k, v):
    out = blockwise(q, k, v, mask, block_q=block_q, block_k=block_k)[0]
    return jnp.sum(out * cot.astype(np.float32))

  got = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
  with jax.enable_x64(True):
    want = jax.jit(jax.grad(
        lambda q, k, v: jnp.sum(_jnp_attention(q, k, v, allowed) * cot),
        (0, 1, 2)))(*(x.astype(np.float64) for x in (q, k, v)))
    want = [np.asarray(w) for w in want]
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RelativeBias(biases.Bias):
  """A learned per-head bias on the distance q - k (clipped), as in T5."""
  table: jax.Array  # [H, 2 * max_distance + 1]
  max_distance: int = dataclasses.field(metadata=dict(static=True),
                                        default=4)

  def tile(self, q_pos, k_pos):
    rel = jnp.clip(q_pos[:, None] - k_pos[None, :], -self.max_distance,
                   self.max_distance) + self.max_distance
    return self.table[:, rel][None]  # [1, H, Tq, Tk]


def test_tiled_bias_forward_and_gradients():
  lq, lk = 10, 13
  q, k, v = _inputs(lq, lk, seed=7)
  mask, _ = _mask("causal_padded", lk)
  allowed = _allowed("causal_padded", lq, lk)
  table = np.random.default_rng(8).normal(size=(H, 9)).astype(np.float32)
  cot = np.random.default_rng(9).normal(size=(B, lq, H, D))
  dense = np.asarray(biases.dense(RelativeBias(jnp.asarray(table)), lq, lk))

  out, _ = blockwise(q, k, v, mask, RelativeBias(jnp.asarray(table)),
                     block_q=3, block_k=4)
  np.testing.assert_allclose(out, _np_attention(q, k, v, allowed, dense),
                             atol=2e-5, rtol=2e-5)

  def loss(table, q):
    out = blockwise(q, k, v, mask, RelativeBias(table), block_q=3,
                    block_k=4)[0]
    return jnp.sum(out * cot.astype(np.float32))

  got = jax.jit(jax.grad(loss, (0, 1)))(jnp.asarray(table), q)

  def ref_loss(table, q):
    bias = biases.dense(RelativeBias(table), lq, lk)
    return jnp.sum(_jnp_attention(q, k.astype(np.float64),
                                  v.astype(np.float64), allowed, bias) * cot)

  with jax.enable_x64(True):
    want = jax.jit(jax.grad(ref_loss, (0, 1)))(table.astype(np.float64),
                                      q.astype(np.float64))
    want = [np.asarray(w) for w in want]
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)
  assert np.abs(want[0]).max() > 1e-3  # the table gradient is not trivially 0


class ConstantBias(biases.Bias):
  """A Bias that is not a registered pytree: used as a constant."""

  def __init__(self, value):
    self.value = value

  def tile(self, q_pos, k_pos):
    return self.value * (q_pos[:, None] - k_pos[None, :]).astype(
        jnp.float32)[None, None]


def test_non_pytree_bias_is_a_constant():
  l = 9
  q, k, v = _inputs(l, l, seed=10)
  mask = Mask(causal=True)
  dense = np.asarray(biases.dense(ConstantBias(-0.3), l, l))
  out, _ = blockwise(q, k, v, mask, ConstantBias(-0.3), block_q=4, block_k=4)
  want = _np_attention(q, k, v, _np_allowed(l, l, True, None, None, None),
                       dense)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
  g = jax.jit(jax.grad(lambda q: jnp.sum(blockwise(
      q, k, v, mask, ConstantBias(-0.3), block_q=4, block_k=4)[0])))(q)
  assert np.all(np.isfinite(g))


def test_dense_bias_is_constant_and_its_gradient_refused():
  l = 8
  q, k, v = _inputs(l, l, seed=11)
  mask = Mask(causal=True)
  bias = np.random.default_rng(12).normal(size=(B, 1, l, l)).astype(
      np.float32)
  f = lambda q, b: jnp.sum(blockwise(q, k, v, mask, b, block_q=3,
                                     block_k=3)[0])
  g = jax.jit(jax.grad(f))(q, bias)  # w.r.t. q only: fine
  with jax.enable_x64(True):
    want = jax.jit(jax.grad(lambda q: jnp.sum(_jnp_attention(
        q, k.astype(np.float64), v.astype(np.float64),
        _np_allowed(l, l, True, None, None, None), bias))))(
            q.astype(np.float64))
  np.testing.assert_allclose(g, want, atol=5e-5, rtol=5e-5)
  with pytest.raises(ValueError, match="dense bias"):
    jax.jit(jax.grad(f, argnums=1))(q, bias)


def test_return_weights_refused():
  q, k, v = _inputs(4, 4)
  with pytest.raises(ValueError, match="never materialises.*scaled_dot"):
    blockwise(q, k, v, Mask(), return_weights=True)


def test_jit_vmap_and_no_retrace():
  l = 10
  traces = []

  @functools.partial(jax.jit, static_argnames=("block",))
  def f(q, k, v, key_valid, block):
    traces.append(1)
    mask = Mask(causal=True, key_valid=key_valid)
    return blockwise(q, k, v, mask, block_q=block, block_k=block)[0]

  outs = []
  for seed in range(3):
    q, k, v = _inputs(l, l, seed=20 + seed)
    valid = _left_padding(l, (seed, 2))
    outs.append(f(q, k, v, valid, block=4))
    want = _np_attention(q, k, v, _np_allowed(l, l, True, valid, None, None))
    np.testing.assert_allclose(outs[-1], want, atol=2e-5, rtol=2e-5)
  assert len(traces) == 1  # new data, same shapes: no retrace

  # vmap over an extra leading axis == a Python loop
  qs, ks, vs = (np.stack(x) for x in zip(*(_inputs(l, l, seed=30 + s)
                                          for s in range(3))))
  mask = Mask(causal=True, key_valid=jnp.asarray(_left_padding(l, (3, 0))))
  g = lambda q, k, v: blockwise(q, k, v, mask, block_q=4, block_k=3)[0]
  dg = jax.grad(lambda q, k, v: jnp.sum(g(q, k, v) ** 2))
  batched, dq = jax.jit(jax.vmap(lambda *a: (g(*a), dg(*a))))(qs, ks, vs)
  one = jax.jit(lambda *a: (g(*a), dg(*a)))
  for i in (0, 2):
    out_i, dq_i = one(qs[i], ks[i], vs[i])
    np.testing.assert_allclose(batched[i], out_i, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(dq[i], dq_i, atol=1e-5, rtol=1e-5)


def test_bf16_matches_float32():
  lq, lk = 24, 24
  q, k, v = _inputs(lq, lk, seed=13)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  mask, _ = _mask("causal_padded", lk)

  @jax.jit
  def out_and_dq(q, k, v):
    f = lambda q: blockwise(q, k, v, mask, block_q=8, block_k=8)[0]
    out, vjp = jax.vjp(f, q)
    return out, vjp(jnp.ones_like(out))[0]

  out16, g16 = out_and_dq(q, k, v)
  assert out16.dtype == jnp.bfloat16 and g16.dtype == jnp.bfloat16
  out32, g32 = out_and_dq(*(x.astype(jnp.float32) for x in (q, k, v)))
  np.testing.assert_allclose(out16.astype(np.float32), out32, atol=3e-2)
  np.testing.assert_allclose(g16.astype(np.float32), g32, atol=5e-2)


@pytest.mark.parametrize("mask_name", ["causal", "window", "num_targets"])
@pytest.mark.parametrize("lq,lk,block_q,block_k", [
    (16, 16, 4, 4), (13, 29, 5, 3), (29, 13, 3, 5), (40, 40, 7, 16)])
def test_skipped_tiles_are_fully_masked(mask_name, lq, lk, block_q, block_k):
  """Every tile outside the per-block loop bounds is entirely masked."""
  mask, _ = _mask(mask_name, lk)
  st = blockwise_lib._Static(
      scale=1.0, block_q=block_q, block_k=block_k, q_len=lq, k_len=lk,
      causal=mask.causal, window=mask.window, num_targets=mask.num_targets,
      bias_kind="none")
  allowed = np.zeros((st.nq * block_q, st.nk * block_k), bool)
  allowed[:lq, :lk] = _np_allowed(lq, lk, mask.causal, None, mask.window,
                                  mask.num_targets)[0]
  tiles = allowed.reshape(st.nq, block_q, st.nk, block_k).any((1, 3))
  visited_fwd = np.zeros_like(tiles)
  visited_bwd = np.zeros_like(tiles)
  for i in range(st.nq):
    lo, hi = blockwise_lib._key_range(st, i)
    visited_fwd[i, int(lo):int(hi)] = True
  for j in range(st.nk):
    lo, hi = blockwise_lib._query_range(st, j)
    visited_bwd[int(lo):int(hi), j] = True
  assert not np.any(tiles & ~visited_fwd)
  assert not np.any(tiles & ~visited_bwd)
  # all these masks are causal: some tiles must actually be skipped
  assert visited_fwd.sum() < tiles.size and visited_bwd.sum() < tiles.size


def _grad_memory(b, l, h=2, d=64, fn=None):
  """Compiled (not run) peak memory of fwd+bwd: temp + arguments + outputs."""
  fn = fn or (lambda q, k, v, m: blockwise(q, k, v, m)[0])
  spec = jax.ShapeDtypeStruct((b, l, h, d), jnp.float32)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, Mask(causal=True)))
  stats = jax.jit(jax.grad(loss, (0, 1, 2))).lower(
      spec, spec, spec).compile().memory_analysis()
  return (stats.temp_size_in_bytes + stats.argument_size_in_bytes +
          stats.output_size_in_bytes)


def test_memory_grows_linearly():
  """Fwd+bwd memory at fixed B*L = 16384 stays flat (O(L) per sequence).

  A quadratic implementation doubles here (the control below), so the bound
  1.2 separates the two; it also implies the looser mem(2L)/mem(L) <= 2.2 at
  fixed batch.
  """
  mems = [_grad_memory(16384 // l, l) for l in (1024, 2048, 4096)]
  ratios = [b / a for a, b in zip(mems, mems[1:])]
  assert all(r <= 1.2 for r in ratios), (mems, ratios)
  # Control: the quadratic reference does fail this bound.
  quad = [_grad_memory(1024 // l, l, h=1, fn=blockwise_lib.reference)
          for l in (256, 512)]
  assert quad[1] / quad[0] > 1.5, quad
