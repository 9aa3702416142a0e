"""SASRec model: causality, padding invariance, parameter count, attention."""

import numpy as np
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from recattn import attention
from recattn import models


def _model(attention_name="scaled_dot", norm="sasrec", dim=16, heads=2,
           blocks=2, num_items=40, max_len=10):
  cfg = ml_collections.ConfigDict(dict(
      name="sasrec", attention=attention_name, num_blocks=blocks,
      num_heads=heads, dim=dim, ffn_dim=0, dropout=0.3, norm=norm,
      l2_norm=False))
  return models.create(cfg, num_items=num_items, max_len=max_len, seed=0)


@pytest.mark.parametrize("norm", ["sasrec", "pre", "post"])
def test_causality_changing_a_later_item_never_changes_earlier_outputs(norm):
  model = _model(norm=norm)
  items = jnp.array([[0, 0, 3, 5, 7, 9, 11, 2, 4, 6]])
  h = model.encode(items)
  for t in range(2, 9):
    changed = items.at[0, t + 1].set(33)
    h2 = model.encode(changed)
    np.testing.assert_allclose(h2[0, :t + 1], h[0, :t + 1], atol=1e-5)
    assert not np.allclose(h2[0, t + 1], h[0, t + 1])


def test_padding_invariance_more_left_padding_same_outputs():
  model = _model(max_len=10)
  short = jnp.array([[0, 0, 0, 0, 3, 5, 7, 9, 11, 2]])
  h = model.encode(short)
  # The same items with less left padding (a shorter window): same outputs.
  np.testing.assert_allclose(model.encode(short[:, 2:])[0, 2:], h[0, 4:],
                             atol=1e-6)
  # Same suffix with different history lengths in a batch agrees with the
  # single-example encoding (batch composition is irrelevant).
  batch = jnp.concatenate([short, jnp.array([[1, 2, 3, 4, 5, 6, 7, 8, 9,
                                               10]])])
  np.testing.assert_allclose(model.encode(batch)[0, 4:], h[0, 4:],
                             atol=1e-6)
  assert np.all(np.isfinite(np.asarray(model.encode(batch))))


def test_exact_parameter_count():
  d, v, l, blocks = 16, 40, 10, 2
  model = _model(dim=d, num_items=v, max_len=l, blocks=blocks)
  from flax import nnx
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  per_block = (d * 3 * d + 3 * d) + (d * d + d) + 2 * (2 * d) + 2 * (d * d + d)
  assert n == (v + 1) * d + l * d + blocks * per_block + 2 * d


def test_dropout_is_on_only_with_rngs():
  from flax import nnx
  model = _model()
  items = jnp.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
  np.testing.assert_array_equal(model.encode(items), model.encode(items))
  a = model.encode(items, rngs=nnx.Rngs(dropout=0))
  b = model.encode(items, rngs=nnx.Rngs(dropout=1))
  assert not np.allclose(a, b)


def test_scaled_dot_matches_float64_reference_with_padding():
  rng = np.random.default_rng(0)
  b, l, h, d = 2, 7, 2, 4
  q, k, v = (rng.normal(size=(b, l, h, d)) for _ in range(3))
  valid = np.ones((b, l), bool)
  valid[0, :3] = False
  mask = attention.Mask(causal=True, key_valid=jnp.array(valid))
  out, _ = attention.scaled_dot.scaled_dot(
      *(jnp.array(x, jnp.float32) for x in (q, k, v)), mask)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
  allowed = np.tril(np.ones((l, l), bool))[None, None] & valid[:, None, None]
  logits = np.where(allowed, logits, -1e300)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  want = np.einsum("bhqk,bkhd->bqhd", w, v)
  rows = valid  # queries that see at least one key
  np.testing.assert_allclose(np.asarray(out)[rows], want[rows], atol=1e-5)
  ref_out, weights = attention.scaled_dot.scaled_dot(
      *(jnp.array(x, jnp.float32) for x in (q, k, v)), mask,
      return_weights=True)
  np.testing.assert_allclose(np.asarray(ref_out)[rows], want[rows], atol=1e-5)
  np.testing.assert_allclose(np.asarray(weights)[1], w[1], atol=1e-5)


def test_unknown_attention_lists_valid_names():
  with pytest.raises(ValueError, match="valid names: .*scaled_dot"):
    attention.get("nope")


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 3, 4, 8), (8,), (4, 8)])
def test_dense_flattened_matmul_equals_nnx_linear(shape):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from recattn.models import base  # pylint: disable=g-import-not-at-top
  dense = base.Dense(8, 6, rngs=nnx.Rngs(0))
  linear = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
  # Same parameters (names and shapes): checkpoints of either load into both.
  assert (jax.tree.map(jnp.shape, nnx.state(dense, nnx.Param)) ==
          jax.tree.map(jnp.shape, nnx.state(linear, nnx.Param)))
  x = jax.random.normal(jax.random.key(1), shape)

  def loss(m, x):
    return jnp.sum(jnp.sin(m(x)))

  got, got_grads = nnx.value_and_grad(loss, argnums=(0, 1))(dense, x)
  want, want_grads = nnx.value_and_grad(loss, argnums=(0, 1))(linear, x)
  assert dense(x).shape == shape[:-1] + (6,)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(base.matmul(x, dense.kernel[...]),
                             x @ dense.kernel[...], rtol=1e-5, atol=1e-6)


def test_query_times_move_only_the_time_bias_s_query_side():
  cfg = ml_collections.ConfigDict(dict(
      name="sasrec", attention="scaled_dot", num_blocks=2, num_heads=2,
      dim=16, ffn_dim=0, dropout=0.0, norm="sasrec", l2_norm=False,
      rel_bias="time"))
  model = models.create(cfg, num_items=40, max_len=6, seed=0)
  items = jnp.array([[0, 3, 5, 7, 9, 11]])
  times = jnp.array([[0, 10, 500, 7000, 90000, 10**6]])
  nxt = jnp.concatenate([times[:, 1:], jnp.array([[2 * 10**6]])], axis=1)
  h = model.encode(items, times=times)
  np.testing.assert_allclose(model.encode(items, times=times,
                                          query_times=times), h, atol=1e-6)
  moved = model.encode(items, times=times, query_times=nxt)
  assert not np.allclose(moved[0, 1:], h[0, 1:], atol=1e-4)
  # Causal: the next item's time of position t is all position t sees of t+1.
  later = model.encode(items.at[0, 5].set(13), times=times, query_times=nxt)
  np.testing.assert_allclose(later[0, :5], moved[0, :5], atol=1e-6)
