"""local, linear and low_rank attention against float64 numpy references.

Gradients are checked against the variants' own dense `reference` forms run
in float64 (`jax.enable_x64`); those dense forms are in turn checked against
the numpy references below. bf16 inputs must match float32 within 3e-2 (max
abs difference on O(1) outputs; bf16 keeps 8 mantissa bits, ~4e-3 relative
per rounding, and the inputs themselves are rounded).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recattn.attention import biases
from recattn.attention import linear as linear_lib
from recattn.attention import low_rank as low_rank_lib
from recattn.attention import weights as weights_lib
from recattn.attention.local import local
from recattn.attention.masks import Mask
from recattn.attention.scaled_dot import reference as dense_softmax

import attention_reference

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- numpy refs


def np_visible(b, lq, lk, *, causal=True, key_valid=None, window=None,
               num_targets=None):
  """[B, Lq, Lk] bool, written from the Mask docstring, not from its code."""
  vis = attention_reference.visible(lq, lk, causal=causal,
                                    key_valid=key_valid, window=window,
                                    num_targets=num_targets)
  return np.broadcast_to(vis, (b, lq, lk)).copy()


def np_softmax_attention(q, k, v, vis, scale, bias=None):
  """Masked softmax attention; returns (out [B,Lq,H,D], w [B,H,Lq,Lk])."""
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if bias is not None:
    logits = logits + bias
  vis = vis[:, None]
  logits = np.where(vis, logits, -np.inf)
  m = np.max(logits, axis=-1, keepdims=True)
  e = np.where(vis, np.exp(logits - np.where(np.isfinite(m), m, 0)), 0)
  z = e.sum(-1, keepdims=True)
  w = np.where(z > 0, e / np.where(z > 0, z, 1), 0)
  return np.einsum("bhqk,bkhd->bqhd", w, v), w


def np_linear(q, k, v, vis, feature):
  """Linear attention, the O(L^2) way: explicit kernel matrix."""
  def elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))
  if feature == "elu":
    fq, fk = elu(q) + 1, elu(k) + 1
  else:
    fq, fk = elu(q), elu(k)
    fq = fq / np.sqrt((fq**2).sum(-1, keepdims=True) + 1e-12)
    fk = fk / np.sqrt((fk**2).sum(-1, keepdims=True) + 1e-12)
  a = np.einsum("bqhf,bkhf->bhqk", fq, fk) * vis[:, None]
  if feature == "elu":
    z = a.sum(-1, keepdims=True)
    w = a / np.where(z > 0, z, 1)
  else:
    w = a / np.sqrt(q.shape[-1])
  return np.einsum("bhqk,bkhd->bqhd", w, v), w


def np_low_rank(q, k, v, vis, pool, value_pool, scale):
  """LightSANs, one query at a time: pool its visible items, then attend."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  out = np.zeros((b, lq, h, d))
  w_items = np.zeros((b, h, lq, lk))
  for bi in range(b):
    for hi in range(h):
      for i in range(lq):
        seen = np.flatnonzero(vis[bi, i])
        if not seen.size:
          continue

        def pool_weights(x, p):
          s = x[bi, seen, hi] @ p[hi]  # [n, r]
          e = np.exp(s - s.max(0))
          return e / e.sum(0)  # softmax over the visible items

        wk = pool_weights(k, pool)
        wv = wk if value_pool is None else pool_weights(v, value_pool)
        latent_k = wk.T @ k[bi, seen, hi]  # [r, d]
        latent_v = wv.T @ v[bi, seen, hi]
        logits = latent_k @ q[bi, i, hi] * scale
        a = np.exp(logits - logits.max())
        a /= a.sum()
        out[bi, i, hi] = a @ latent_v
        w_items[bi, hi, i, seen] = wv @ a
  return out, w_items


# ----------------------------------------------------------------- fixtures


def _inputs(b, lq, lk, h, d, pad=2, dtype=np.float32):
  q, k, v = (RNG.normal(size=s).astype(dtype)
             for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))
  key_valid = np.ones((b, lk), bool)
  key_valid[0, :pad] = False  # left padding in the first row
  if b > 1:
    key_valid[-1, :1] = False
  return q, k, v, key_valid


def _np_weights_of(name, q, k, v, vis, opts):
  """numpy (out, weights) for the variant `name` with options `opts`."""
  d = q.shape[-1]
  if name == "local":
    return np_softmax_attention(q, k, v, vis, 1 / np.sqrt(d))
  if name == "linear":
    return np_linear(q, k, v, vis, opts["feature"])
  vp = opts.get("value_pool")
  return np_low_rank(q, k, v, vis, np.asarray(opts["pool"], np.float64),
                     None if vp is None else np.asarray(vp, np.float64),
                     1 / np.sqrt(d))


def _variant(name, h=2, d=4, r=3, **opts):
  """(fn, opts) for a variant with random parameters where needed."""
  if name == "local":
    return local, {"window": 3, **opts}
  if name == "linear":
    return linear_lib.linear, {"feature": "elu", "chunk": 4, **opts}
  pool = jnp.asarray(RNG.normal(size=(h, d, r)) / np.sqrt(d), jnp.float32)
  return low_rank_lib.low_rank, {"pool": pool, "chunk": 4, **opts}


CAUSAL_VARIANTS = [
    ("local", {}),
    ("linear", {"feature": "elu"}),
    ("linear", {"feature": "l2"}),
    ("low_rank", {}),
    ("low_rank", {"separate": True}),
]


def _jit(fn, **opts):
  """`fn` with fixed options under jax.jit: one compile instead of many
  eager op dispatches (the suite runs on a small shared CPU)."""
  return jax.jit(lambda q, k, v, mask, bias=None: fn(q, k, v, mask, bias,
                                                      **opts))


def _make(name, opts, h, d):
  opts = dict(opts)
  separate = opts.pop("separate", False)
  fn, full = _variant(name, h=h, d=d, **opts)
  if separate:
    full["value_pool"] = jnp.asarray(RNG.normal(size=full["pool"].shape),
                                     jnp.float32)
  return _jit(fn, **full), full


# ------------------------------------------------------ agreement with numpy

SHAPES = [  # B, Lq, Lk, H, Dh
    (2, 11, 11, 3, 4),
    (2, 4, 13, 2, 4),  # Lq < Lk (right-aligned queries)
    (1, 16, 16, 1, 8),
    (2, 9, 6, 2, 4),  # Lq > Lk: the first queries see nothing
]


@pytest.mark.parametrize("shape,window,padded", [
    (SHAPES[0], 1, True), (SHAPES[0], 3, True), (SHAPES[1], 3, True),
    (SHAPES[2], 5, False), (SHAPES[3], 2, True), (SHAPES[2], 40, True),
    (SHAPES[1], 4, False)])
def test_local_matches_numpy(shape, window, padded):
  b, lq, lk, h, d = shape
  q, k, v, kv = _inputs(b, lq, lk, h, d)
  if not padded:
    kv[:] = True
  mask = Mask(key_valid=jnp.asarray(kv) if padded else None)
  out, w = _jit(local, window=window)(q, k, v, mask)
  vis = np_visible(b, lq, lk, key_valid=kv, window=window)
  want, _ = np_softmax_attention(*(x.astype(np.float64) for x in (q, k, v)),
                                 vis, 1 / np.sqrt(d))
  assert w is None
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)


class _Distance(biases.Bias):
  """-slope_h * (q - k): an ALiBi-style tiled bias."""

  def __init__(self, slopes):
    self.slopes = jnp.asarray(slopes)

  def tile(self, q_pos, k_pos):
    dist = (q_pos[:, None] - k_pos[None, :]).astype(jnp.float32)
    return -self.slopes[None, :, None, None] * dist[None, None]


@pytest.mark.parametrize("dense_bias", [False, True])
def test_local_bias_num_targets_and_temperature(dense_bias):
  b, l, h, d, w, t = 2, 12, 2, 4, 4, 3
  q, k, v, kv = _inputs(b, l, l, h, d)
  slopes = np.array([0.5, 0.25])
  pos = np.arange(l)
  bias_np = -slopes[None, :, None, None] * (pos[:, None] - pos[None, :])
  bias_np = np.broadcast_to(bias_np, (1, h, l, l))
  bias = jnp.asarray(bias_np, jnp.float32) if dense_bias else _Distance(slopes)
  mask = Mask(key_valid=jnp.asarray(kv), num_targets=t)
  out, _ = jax.jit(lambda q, k, v, mask: local(
      q, k, v, mask, bias, window=w, temperature=2.0))(q, k, v, mask)
  vis = np_visible(b, l, l, key_valid=kv, window=w, num_targets=t)
  want, _ = np_softmax_attention(*(x.astype(np.float64) for x in (q, k, v)),
                                 vis, 1 / (2.0 * np.sqrt(d)), bias_np)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)


def test_local_window_sources():
  q, k, v, kv = _inputs(1, 8, 8, 1, 4)
  mask = Mask(key_valid=jnp.asarray(kv))
  by_mask, _ = local(q, k, v, dataclasses.replace(mask, window=3))
  by_arg, _ = local(q, k, v, mask, window=3)
  tighter, _ = local(q, k, v, dataclasses.replace(mask, window=5), window=3)
  np.testing.assert_array_equal(by_mask, by_arg)
  np.testing.assert_array_equal(tighter, by_arg)
  with pytest.raises(ValueError, match="local: set a window"):
    local(q, k, v, mask)
  with pytest.raises(ValueError, match="causal"):
    local(q, k, v, Mask(causal=False), window=3)


@pytest.mark.parametrize("shape,feature,causal,chunk", [
    (SHAPES[0], "elu", True, 4), (SHAPES[1], "elu", True, 3),
    (SHAPES[2], "elu", True, 64), (SHAPES[3], "elu", True, 1),
    (SHAPES[0], "l2", True, 4), (SHAPES[1], "l2", True, 64),
    (SHAPES[3], "l2", True, 4), (SHAPES[0], "elu", False, 4),
    (SHAPES[1], "l2", False, 4),
    (SHAPES[1], "elu", True, 64)])  # Lq <= chunk < Lk: one dense tile
def test_linear_matches_numpy(shape, feature, causal, chunk):
  b, lq, lk, h, d = shape
  q, k, v, kv = _inputs(b, lq, lk, h, d)
  out, _ = _jit(linear_lib.linear, feature=feature, chunk=chunk)(
      q, k, v, Mask(causal=causal, key_valid=jnp.asarray(kv)))
  vis = np_visible(b, lq, lk, causal=causal, key_valid=kv)
  want, _ = np_linear(*(x.astype(np.float64) for x in (q, k, v)), vis,
                      feature)
  np.testing.assert_allclose(out, want, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("shape,causal,separate,chunk", [
    (SHAPES[0], True, False, 4), (SHAPES[1], True, False, 3),
    (SHAPES[2], True, False, 64), (SHAPES[3], True, False, 1),
    (SHAPES[0], True, True, 4), (SHAPES[3], True, True, 4),
    (SHAPES[0], False, False, 4), (SHAPES[1], False, True, 4),
    # 2 Lq <= chunk: the few queries' own poolings instead of prefix sums
    (SHAPES[1], True, False, 8), (SHAPES[1], True, True, 8)])
def test_low_rank_matches_numpy(shape, causal, separate, chunk):
  b, lq, lk, h, d = shape
  q, k, v, kv = _inputs(b, lq, lk, h, d)
  pool = RNG.normal(size=(h, d, 3))
  vpool = RNG.normal(size=(h, d, 3)) if separate else None
  out, _ = _jit(
      low_rank_lib.low_rank, pool=jnp.asarray(pool, jnp.float32),
      value_pool=None if vpool is None else jnp.asarray(vpool, jnp.float32),
      chunk=chunk, temperature=0.5)(
          q, k, v, Mask(causal=causal, key_valid=jnp.asarray(kv)))
  vis = np_visible(b, lq, lk, causal=causal, key_valid=kv)
  want, _ = np_low_rank(*(x.astype(np.float64) for x in (q, k, v)), vis,
                        pool, vpool, 1 / (0.5 * np.sqrt(d)))
  np.testing.assert_allclose(out, want, atol=3e-5, rtol=1e-4)


def test_low_rank_causal_is_stable_for_large_scores():
  """Scores in the hundreds: the running max keeps every exponent <= 0."""
  b, l, h, d = 1, 12, 1, 4
  q, k, v, kv = _inputs(b, l, l, h, d, pad=0)
  k = k * 30.0
  pool = RNG.normal(size=(h, d, 2)) * 10.0
  out, _ = _jit(low_rank_lib.low_rank, pool=jnp.asarray(pool, jnp.float32),
                chunk=4)(q, k, v, Mask())
  want, _ = np_low_rank(*(x.astype(np.float64) for x in (q, k, v)),
                        np_visible(b, l, l), pool, None, 1 / np.sqrt(d))
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("separate", [False, True])
def test_low_rank_matmul_and_pairs_forms_agree(separate):
  """The chunk-max matmul form equals the per-query pairs form, with grads."""
  b, l, h, d, r = 2, 13, 2, 4, 3
  q, k, v, kv = _inputs(b, l, l, h, d)
  pool = jnp.asarray(RNG.normal(size=(h, d, r)), jnp.float32)
  vpool = (jnp.asarray(RNG.normal(size=(h, d, r)), jnp.float32)
           if separate else None)

  def run(form):
    def loss(q, k, v, p, vp):
      out = low_rank_lib._causal(q, k, v, jnp.asarray(kv), p, vp, 0.5, 4,
                                 form=form)
      return (out ** 2).sum(), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4),
                                         has_aux=True)(q, k, v, pool, vpool)
    return out, grads

  (out_m, grads_m), (out_p, grads_p) = run("matmul"), run("pairs")
  np.testing.assert_allclose(out_m, out_p, atol=1e-5, rtol=1e-5)
  for gm, gp in zip(jax.tree.leaves(grads_m), jax.tree.leaves(grads_p)):
    np.testing.assert_allclose(gm, gp, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scores,pad,ok", [
    ([0.0, 1.0, -2.0, 3.0, 0.5, 2.0], 0, True),  # narrow: the cheap test
    ([100.0, -100.0, -50.0, 0.0, -90.0, 20.0], 0, True),  # wide, no gap
    ([0.0, 1.0, 100.0, 3.0, 0.5, 2.0], 0, False),  # 99 below its chunk's
    ([-100.0, 0.0, 100.0, 3.0, 0.5, 2.0], 1, False),  # max, after padding
    ([-100.0, 0.0, 0.0, 0.0, 0.0, 0.0], 1, True),  # the low item is padding
])
def test_low_rank_guard_measures_gaps_not_spread(scores, pad, ok):
  """A wide score range alone does not force the pairs form; a query whose
  prefix max sits > `_MAX_GAP` below its chunk's max does."""
  s = jnp.asarray(scores, jnp.float32).reshape(1, 2, 3, 1, 1)  # chunks of 3
  valid = (jnp.arange(6) >= pad).reshape(1, 2, 3)
  assert bool(jax.jit(low_rank_lib._forms_ok)(s, None, valid)) == ok


def test_low_rank_large_gap_takes_the_pairs_form():
  """A later item outscoring a query's prefix by e^60 in one chunk: the
  matmul form underflows there, the default path notices and stays exact,
  gradients included."""
  b, l, h, d = 1, 12, 1, 4
  q, k, v, _ = _inputs(b, l, l, h, d, pad=0)
  k = k * 30.0
  pool = jnp.asarray(RNG.normal(size=(h, d, 2)) * 10.0, jnp.float32)
  s = low_rank_lib._scores(k, pool).reshape(1, 3, 4, h, 2)
  assert not low_rank_lib._forms_ok(s, None, jnp.ones((1, 3, 4), bool))
  want, _ = np_low_rank(*(x.astype(np.float64) for x in (q, k, v)),
                        np_visible(b, l, l), np.asarray(pool, np.float64),
                        None, 0.5)
  bad = low_rank_lib._causal(q, k, v, None, pool, None, 0.5, 4,
                             form="matmul")
  assert not np.allclose(bad, want, atol=1e-3)  # the guard is needed

  def loss(fn):
    return lambda q, k, v: (fn(q, k, v) ** 2).sum()

  auto = lambda q, k, v: low_rank_lib._causal(q, k, v, None, pool, None, 0.5, 4)
  ref = lambda q, k, v: low_rank_lib.reference(q, k, v, Mask(), pool=pool,
                                               scale=0.5)[0]
  np.testing.assert_allclose(jax.jit(auto)(q, k, v), want, atol=1e-4,
                             rtol=1e-4)
  for ga, gr in zip(jax.jit(jax.grad(loss(auto), argnums=(0, 1, 2)))(q, k, v),
                    jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(ga, gr, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------ weights


_FNS = {"local": local, "linear": linear_lib.linear,
        "low_rank": low_rank_lib.low_rank}


@pytest.mark.parametrize("name,opts,lq", [
    (n, o, lq) for (n, o), lq in zip(CAUSAL_VARIANTS, (10, 6, 10, 6, 10))])
def test_return_weights(name, opts, lq):
  b, lk, h, d = 2, 10, 2, 4
  q, k, v, kv = _inputs(b, lq, lk, h, d)
  fn, full = _make(name, opts, h, d)
  mask = Mask(key_valid=jnp.asarray(kv))
  out, w = _jit(_FNS[name], return_weights=True, **full)(q, k, v, mask)
  fast, _ = fn(q, k, v, mask)
  window = full.get("window")
  vis = np_visible(b, lq, lk, key_valid=kv, window=window)
  want_out, want_w = _np_weights_of(
      name, *(x.astype(np.float64) for x in (q, k, v)), vis, full)
  assert w.shape == (b, h, lq, lk)
  np.testing.assert_allclose(w, want_w, atol=2e-5)
  np.testing.assert_allclose(out, want_out, atol=3e-5)
  np.testing.assert_allclose(fast, out, atol=3e-5)
  assert not np.any(np.asarray(w)[~np.broadcast_to(vis[:, None], w.shape)])


def test_return_weights_refuses_when_too_big(monkeypatch):
  monkeypatch.setattr(weights_lib, "MAX_WEIGHT_ELEMENTS", 50)
  q, k, v, kv = _inputs(1, 8, 8, 1, 4)
  for name, opts in CAUSAL_VARIANTS:
    _, full = _make(name, opts, 1, 4)
    with pytest.raises(ValueError, match="return_weights"):
      _FNS[name](q, k, v, Mask(), return_weights=True, **full)


# ------------------------------------------------ causality and padding


@pytest.mark.parametrize("name,opts", CAUSAL_VARIANTS)
def test_causality(name, opts):
  b, l, h, d = 2, 11, 2, 4
  q, k, v, kv = _inputs(b, l, l, h, d)
  fn, full = _make(name, opts, h, d)
  mask = Mask(key_valid=jnp.asarray(kv))
  base = np.asarray(fn(q, k, v, mask)[0])
  for t in (3, 6, 9):
    k2, v2 = k.copy(), v.copy()
    k2[:, t + 1:] += RNG.normal(size=k2[:, t + 1:].shape).astype(np.float32)
    v2[:, t + 1:] += RNG.normal(size=v2[:, t + 1:].shape).astype(np.float32)
    got = np.asarray(fn(q, k2, v2, mask)[0])
    np.testing.assert_allclose(got[:, :t + 1], base[:, :t + 1], atol=1e-6)
    assert np.abs(got[:, t + 1:] - base[:, t + 1:]).max() > 1e-3


PAD_VARIANTS = CAUSAL_VARIANTS + [
    ("linear", {"feature": "elu", "causal": False}),
    ("linear", {"feature": "l2", "causal": False}),
    ("low_rank", {"causal": False}),
]


@pytest.mark.parametrize("name,opts", PAD_VARIANTS)
def test_padding_invariance_and_empty_rows(name, opts):
  b, l, h, d = 2, 10, 2, 4
  opts = dict(opts)
  causal = opts.pop("causal", True)
  q, k, v, kv = _inputs(b, l, l, h, d, pad=4)
  kv[1] = False  # a row with no valid key at all
  fn, full = _make(name, opts, h, d)
  mask = Mask(causal=causal, key_valid=jnp.asarray(kv))
  base = np.asarray(fn(q, k, v, mask)[0])
  k2, v2 = k.copy(), v.copy()
  k2[~kv] = 100 * RNG.normal(size=k2[~kv].shape)
  v2[~kv] = 100 * RNG.normal(size=v2[~kv].shape)
  got = np.asarray(fn(q, k2, v2, mask)[0])
  np.testing.assert_allclose(got, base, atol=1e-6)
  np.testing.assert_array_equal(base[1], 0.0)  # nothing visible: zeros
  if causal:
    np.testing.assert_array_equal(base[0, :4], 0.0)


# -------------------------------------------------------------- gradients


def _dense_reference(name, full):
  """The variant's dense form, differentiable and dtype-generic."""
  if name == "local":
    def ref(q, k, v, mask):
      return dense_softmax(q, k, v, dataclasses.replace(
          mask, window=full["window"]), scale=1 / np.sqrt(q.shape[-1]))[0]
  elif name == "linear":
    def ref(q, k, v, mask):
      return linear_lib.reference(q, k, v, mask, feature=full["feature"])[0]
  else:
    def ref(q, k, v, mask):
      return low_rank_lib.reference(
          q, k, v, mask, pool=full["pool"].astype(q.dtype),
          value_pool=(None if full.get("value_pool") is None
                      else full["value_pool"].astype(q.dtype)),
          scale=1 / np.sqrt(q.shape[-1]))[0]
  return ref


@pytest.mark.parametrize("name,opts,lq", [
    (n, o, lq) for (n, o), lq in zip(CAUSAL_VARIANTS, (9, 5, 9, 5, 9))])
def test_gradients_match_float64_reference(name, opts, lq):
  b, lk, h, d = 2, 9, 2, 4
  q, k, v, kv = _inputs(b, lq, lk, h, d)
  fn, full = _make(name, opts, h, d)
  cot = RNG.normal(size=(b, lq, h, d))
  mask = Mask(key_valid=jnp.asarray(kv))

  def loss(f, dtype):
    return lambda q, k, v: jnp.sum(f(q, k, v, mask) * cot.astype(dtype))

  got = jax.jit(jax.grad(loss(lambda *a: fn(*a)[0], np.float32),
                         argnums=(0, 1, 2)))(q, k, v)
  with jax.enable_x64(True):
    ref = _dense_reference(name, full)
    want = jax.jit(jax.grad(loss(ref, np.float64), argnums=(0, 1, 2)))(
        *(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
    want = [np.asarray(w) for w in want]
  for g, w_ in zip(got, want):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g, w_, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------- jit, vmap, bf16


@pytest.mark.parametrize("name,opts", CAUSAL_VARIANTS)
def test_jit_vmap_and_no_retrace(name, opts):
  b, l, h, d = 2, 8, 2, 4
  _, full = _make(name, opts, h, d)
  fn = _FNS[name]
  traces = []

  @jax.jit
  def run(q, k, v, kv):
    traces.append(1)
    return fn(q, k, v, Mask(key_valid=kv), **full)[0]

  # vmap over an extra leading axis == looping over it with the jitted fn,
  # which traces once for all the different data.
  stack = [_inputs(b, l, l, h, d, pad=p) for p in (1, 3)]
  batched = [np.stack(xs) for xs in zip(*stack)]
  got = jax.jit(jax.vmap(
      lambda *a: fn(*a[:3], Mask(key_valid=a[3]), **full)[0]))(*batched)
  for i, (q_, k_, v_, kv_) in enumerate(stack):
    np.testing.assert_allclose(got[i], run(q_, k_, v_, kv_), atol=1e-5)
  run(*_inputs(b, l, l, h, d, pad=0))
  assert len(traces) == 1


@pytest.mark.parametrize("name,opts", CAUSAL_VARIANTS)
def test_bf16_close_to_float32(name, opts):
  b, l, h, d = 2, 12, 2, 8
  q, k, v, kv = _inputs(b, l, l, h, d)
  fn, full = _make(name, opts, h, d)
  mask = Mask(key_valid=jnp.asarray(kv))
  f32 = fn(q, k, v, mask)[0]
  bf16 = fn(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), mask)[0]
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), f32, atol=3e-2)


# ----------------------------------------------------- unsupported options


@pytest.mark.parametrize("name,opts", [("linear", {"feature": "elu"}),
                                       ("linear", {"feature": "l2"}),
                                       ("low_rank", {})])
def test_unsupported_options_raise(name, opts):
  q, k, v, _ = _inputs(1, 6, 6, 2, 4)
  _, full = _make(name, opts, 2, 4)
  fn = functools.partial(_FNS[name], **full)
  with pytest.raises(ValueError, match=f"{name}.*bias"):
    fn(q, k, v, Mask(), jnp.zeros((1, 1, 6, 6)))
  with pytest.raises(ValueError, match=f"{name}.*window"):
    fn(q, k, v, Mask(window=3))
  with pytest.raises(ValueError, match=f"{name}.*num_targets"):
    fn(q, k, v, Mask(num_targets=2))


def test_bad_arguments_raise():
  q, k, v, _ = _inputs(1, 6, 6, 2, 4)
  with pytest.raises(ValueError, match="feature"):
    linear_lib.linear(q, k, v, Mask(), feature="relu")
  with pytest.raises(ValueError, match="pool has shape"):
    low_rank_lib.low_rank(q, k, v, Mask(), pool=jnp.ones((2, 3, 4)))


# ------------------------------------------------------------ NNX module


def test_low_rank_pool_module():
  h, d, r = 4, 16, 8
  mod = low_rank_lib.LowRankPool(h, d, r, rngs=nnx.Rngs(0))
  pool = np.asarray(mod.pool[...])
  assert pool.shape == (h, d, r) and mod.value_pool is None
  assert 0.8 / np.sqrt(d) < pool.std() < 1.2 / np.sqrt(d)
  q, k, v, kv = _inputs(2, 7, 7, h, d)
  mask = Mask(key_valid=jnp.asarray(kv))
  got = jax.jit(lambda q, k, v, mask: mod(q, k, v, mask)[0])(q, k, v, mask)
  want = _jit(low_rank_lib.low_rank, pool=mod.pool[...])(q, k, v, mask)[0]
  np.testing.assert_array_equal(got, want)
  both = low_rank_lib.LowRankPool(h, d, r, separate_value_pool=True,
                                  rngs=nnx.Rngs(1))
  assert both.value_pool[...].shape == (h, d, r)
  assert len(jax.tree.leaves(nnx.state(both, nnx.Param))) == 2


# ----------------------------------------------------------------- memory

_FAST = {"xla_backend_optimization_level": 0,
         "xla_llvm_disable_expensive_passes": True}


def _train_memory(fn, length, h=2, d=16):
  """Bytes XLA plans for grad of a loss through `fn` (compiled, not run)."""
  def loss(q, k, v, kv):
    return jnp.sum(fn(q, k, v, Mask(key_valid=kv))[0] ** 2)

  x = jax.ShapeDtypeStruct((1, length, h, d), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, length), jnp.bool_)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
      x, x, x, kv).compile(compiler_options=_FAST)
  m = compiled.memory_analysis()
  return (m.temp_size_in_bytes + m.argument_size_in_bytes
          + m.output_size_in_bytes)


MEMORY_VARIANTS = {
    "local": functools.partial(local, window=32),
    "linear": functools.partial(linear_lib.linear, chunk=32),
    "low_rank": functools.partial(low_rank_lib.low_rank,
                                  pool=jnp.ones((2, 16, 4)), chunk=32),
}


@pytest.mark.parametrize("name", sorted(MEMORY_VARIANTS))
def test_training_memory_is_linear_in_length(name):
  """Doubling L at fixed B must at most ~double memory (quadratic: x4)."""
  mem = [_train_memory(MEMORY_VARIANTS[name], n) for n in (1024, 2048, 4096)]
  for small, big in zip(mem, mem[1:]):
    assert big / small <= 2.2, mem


def test_memory_check_catches_quadratic_attention():
  """The same measure on dense softmax attention grows ~4x per doubling."""
  def dense(q, k, v, mask):
    return dense_softmax(q, k, v, mask, scale=0.25)
  small, big = (_train_memory(dense, n) for n in (1024, 2048))
  assert big / small > 3.5
