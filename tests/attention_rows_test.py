"""Causal row blocks: the split covers every visible key, and the split
softmax, HSTU, additive and DIN attention give the one-block outputs and
gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recattn.attention import biases
from recattn.attention import hstu
from recattn.attention import masks
from recattn.attention import mlp_score
from recattn.attention import relative
from recattn.attention import scaled_dot
from recattn.attention.masks import Mask

MASKS = [
    dict(causal=True),
    dict(causal=True, window=5),
    dict(causal=True, num_targets=3),
    dict(causal=False),
]


@pytest.mark.parametrize("mask_kw", MASKS)
@pytest.mark.parametrize("q_len,k_len", [(200, 200), (23, 23), (9, 23)])
def test_row_blocks_cover_queries_and_every_visible_key(
    monkeypatch, mask_kw, q_len, k_len):
  monkeypatch.setattr(masks, "MIN_ROWS", 4)
  mask = Mask(**mask_kw)
  blocks = masks.causal_row_blocks(mask, q_len, k_len)
  assert blocks[0][0] == 0 and blocks[-1][1] == q_len
  assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
  assert len(blocks) == (1 if not mask.causal else
                         min(masks.MAX_ROW_BLOCKS, q_len // 4))
  allowed = np.asarray(mask.allowed(jnp.arange(q_len) + k_len - q_len,
                                    jnp.arange(k_len), k_len))[0, 0]
  for q0, q1, k0, k1 in blocks:
    outside = np.ones(k_len, bool)
    outside[k0:k1] = False
    assert not allowed[q0:q1][:, outside].any(), (q0, q1, k0, k1)


def test_short_sequences_stay_one_block():
  assert masks.causal_row_blocks(Mask(), 50, 50) == [(0, 50, 0, 50)]
  assert len(masks.causal_row_blocks(Mask(), 200, 200)) == 4


def _inputs(b, lq, lk, h, d, dv, seed=0):
  r = np.random.default_rng(seed)
  q, k = (jnp.asarray(r.normal(size=(b, n, h, d)), jnp.float32)
          for n in (lq, lk))
  v = jnp.asarray(r.normal(size=(b, lk, h, dv)), jnp.float32)
  lengths = r.integers(1, lk + 1, size=b)
  lengths[0] = lk
  valid = jnp.asarray(np.arange(lk)[None] >= (lk - lengths)[:, None])
  return q, k, v, valid


def _biases(b, lq, lk, h):
  r = np.random.default_rng(1)
  times = jnp.asarray(np.cumsum(r.integers(0, 10**5, size=(b, lk)), 1),
                      jnp.int32)
  position = relative.RelativePositionBias(h, rngs=nnx.Rngs(0), init_std=1.0)
  time = relative.TimeIntervalBias(h, rngs=nnx.Rngs(1), init_std=1.0)
  return {
      "none": None,
      "dense": jnp.asarray(r.normal(size=(1, h, lq, lk)), jnp.float32),
      "position+time": relative.combine(position(), time(times)),
  }


def _mlp_score_pair(name, h, d):
  """Row blocks (no weights) and one block over all keys (with weights)."""
  if name == "additive":
    module = mlp_score.Additive(h, d, rngs=nnx.Rngs(0))
  else:
    module = mlp_score.DIN(h, d, normalize=name == "din_softmax",
                           rngs=nnx.Rngs(0))
  split = lambda *a: module(*a)[0]
  ref = lambda *a: module(*a, return_weights=True)[0]
  return split, ref


def _split_and_reference(name):
  if name == "scaled_dot":
    split = lambda *a: scaled_dot.by_rows(*a, scale=0.3)
    ref = lambda *a: scaled_dot.reference(*a, scale=0.3)[0]
  else:
    split = lambda *a: hstu.by_rows(*a, alpha=0.4, normalizer=name[5:])
    ref = lambda *a: hstu.reference(*a, alpha=0.4, normalizer=name[5:])[0]
  return split, ref


@pytest.mark.parametrize("name", ["scaled_dot", "hstu_padded", "hstu_true"])
@pytest.mark.parametrize("mask_kw,lq,kinds", [
    (MASKS[0], 17, ("dense", "position+time")),
    (MASKS[1], 17, ("dense", "position+time")),
    (MASKS[2], 17, ("position+time",)),
    (MASKS[3], 17, ("dense",)),
    (MASKS[0], 9, ("none",)),  # queries aligned right: incremental decoding
    (MASKS[0], 26, ("none", "dense")),  # more queries than keys: blocks
                                        # that see no key output zeros
])
def test_by_rows_matches_the_reference_with_gradients(
    monkeypatch, name, mask_kw, lq, kinds):
  monkeypatch.setattr(masks, "MIN_ROWS", 3)  # several blocks at test sizes
  b, lk, h = 3, 17, 2
  q, k, v, valid = _inputs(b, lq, lk, h, 4, 6)
  mask = Mask(key_valid=valid, **mask_kw)
  split, ref = _split_and_reference(name)
  _check_split(split, ref, q, k, v, mask, kinds)


@pytest.mark.parametrize("name", ["additive", "din_softmax", "din_raw"])
@pytest.mark.parametrize("mask_kw,lq", [
    (MASKS[0], 17), (MASKS[1], 17), (MASKS[2], 17), (MASKS[3], 17),
    (MASKS[0], 9),  # queries aligned right
    (MASKS[0], 20),  # more queries than keys: the first block sees none
])
def test_mlp_score_rows_match_one_block_with_gradients(
    monkeypatch, name, mask_kw, lq):
  monkeypatch.setattr(mlp_score, "_MIN_ROWS", 3)
  b, lk, h, d = 3, 17, 2, 4
  q, k, v, valid = _inputs(b, lq, lk, h, d, d)
  mask = Mask(key_valid=valid, **mask_kw)
  split, ref = _mlp_score_pair(name, h, d)
  kinds = ("none",) if name == "din_raw" else ("none", "dense")
  _check_split(split, ref, q, k, v, mask, kinds)


def _check_split(split, ref, q, k, v, mask, kinds):
  b, lq, h = q.shape[0], q.shape[1], q.shape[2]
  for kind in kinds:
    bias = _biases(b, lq, k.shape[1], h)[kind]
    def loss(fn, q, k, v, bias):
      return jnp.sum(jnp.sin(fn(q, k, v, mask, bias)))
    grad = lambda fn: jax.value_and_grad(
        lambda *x: loss(fn, *x), argnums=(0, 1, 2, 3), allow_int=True)(
            q, k, v, bias)
    (got, got_grads), (want, want_grads) = grad(split), grad(ref)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=kind)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
      if g.dtype != jax.dtypes.float0:  # timestamps have no gradient
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=kind)


@pytest.mark.parametrize("logits_shape,bias_shape", [
    ((4, 2, 5, 6), (1, 2, 5, 6)),  # shared by the batch: the dot path
    ((4, 2, 5, 6), (1, 1, 5, 6)),  # and by the heads
    ((4, 2, 5, 6), (4, 2, 5, 6)),  # per example: plain +
    ((1, 2, 5, 6), (1, 2, 5, 6)),
    ((4, 3, 2, 5, 6), (1, 3, 2, 5, 6)),  # local's [B, nq, H, w, 2w] tiles
])
def test_bias_add_matches_broadcasting_with_gradients(logits_shape,
                                                      bias_shape):
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=logits_shape), jnp.float32)
  b = jnp.asarray(r.normal(size=bias_shape), jnp.float32)
  w = jnp.asarray(r.normal(size=logits_shape), jnp.float32)
  loss = lambda add: lambda x, b: jnp.sum(jnp.sin(add(x, b)) * w)
  got = jax.jit(jax.value_and_grad(loss(biases.add), argnums=(0, 1)))(x, b)
  want = jax.value_and_grad(loss(jnp.add), argnums=(0, 1))(x, b)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == e.shape
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
  assert biases.add(x, None) is x
