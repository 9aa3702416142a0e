"""SASRec model: causality, padding invariance, parameter count, attention."""

import numpy as np
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from recattn import attention
from recattn import models


def _model(attention_name="scaled_dot", norm="sasrec", dim=16, heads=2,
           blocks=2, num_items=40, max_len=10, ffn_act="relu", ffn_dim=0):
  cfg = ml_collections.ConfigDict(dict(
      name="sasrec", attention=attention_name, num_blocks=blocks,
      num_heads=heads, dim=dim, ffn_dim=ffn_dim, dropout=0.3, norm=norm,
      l2_norm=False, ffn_act=ffn_act))
  return models.create(cfg, num_items=num_items, max_len=max_len, seed=0)


@pytest.mark.parametrize("norm,ffn_act", [
    ("sasrec", "relu"), ("pre", "relu"), ("post", "relu"), ("ligr", "swiglu"),
    ("pre", "gelu")])
def test_causality_changing_a_later_item_never_changes_earlier_outputs(
    norm, ffn_act):
  model = _model(norm=norm, ffn_act=ffn_act)
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


def test_ligr_and_swiglu_parameter_count():
  d, f, v, l, blocks = 16, 64, 40, 10, 2
  model = _model(dim=d, num_items=v, max_len=l, blocks=blocks, norm="ligr",
                 ffn_act="swiglu", ffn_dim=f)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  per_block = ((d * 3 * d + 3 * d) + (d * d + d) + 2 * (2 * d)
               + (d * 2 * f + 2 * f) + (f * d + d)  # SwiGLU: two inputs
               + 2 * (d * d + d))  # the two residual gates
  assert n == (v + 1) * d + l * d + blocks * per_block + 2 * d


def test_ligr_block_is_the_gated_pre_norm_block():
  """Open gates (sigmoid -> 1) turn LiGR into the pre-norm block; closed
  gates (sigmoid -> 0) turn every block into the identity."""
  items = jnp.array([[0, 0, 3, 5, 7, 9, 11, 2, 4, 6]])
  pre, ligr = _model(norm="pre"), _model(norm="ligr")
  for block_pre, block_ligr in zip(pre.blocks, ligr.blocks):
    for name in ("attn", "ln_attn", "ln_ffn", "ffn_in", "ffn_out"):
      nnx.update(getattr(block_ligr, name),
                 nnx.state(getattr(block_pre, name)))
  for name in ("item_embedding", "pos_embedding", "final_ln"):
    nnx.update(getattr(ligr, name), nnx.state(getattr(pre, name)))

  def set_gates(bias):
    for block in ligr.blocks:
      for gate in (block.gate_attn, block.gate_ffn):
        gate.kernel[...] = jnp.zeros_like(gate.kernel[...])
        gate.bias[...] = jnp.full_like(gate.bias[...], bias)

  set_gates(30.0)
  np.testing.assert_allclose(ligr.encode(items), pre.encode(items),
                             atol=1e-5)
  set_gates(-30.0)
  x0, _ = ligr.embed(items, None)
  np.testing.assert_allclose(ligr.encode(items), ligr.output(x0), atol=1e-5)


@pytest.mark.parametrize("dense_init", ["torch", "normal"])
def test_dense_init_sets_every_projection_kernel(dense_init):
  cfg = ml_collections.ConfigDict(dict(
      name="sasrec", attention="scaled_dot", num_blocks=2, num_heads=1,
      dim=64, ffn_dim=0, dropout=0.1, norm="sasrec", l2_norm=False,
      dense_init=dense_init))
  model = models.create(cfg, num_items=40, max_len=10, seed=0)
  for block in model.blocks:
    for dense in (block.attn.qkv, block.attn.out, block.ffn_in,
                  block.ffn_out):
      w = np.asarray(dense.kernel[...])
      if dense_init == "normal":  # N(0, 0.02)
        assert 0.017 < w.std() < 0.023
      else:  # uniform, bound 1/sqrt(fan_in): std 1/sqrt(3 fan_in)
        bound = 1 / np.sqrt(w.shape[0])
        assert np.abs(w).max() <= bound
        assert abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound


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


def _attribute_model(attr_ids, num_attrs, l2_norm=False):
  cfg = ml_collections.ConfigDict(dict(
      name="sasrec", attention="scaled_dot", num_blocks=1, num_heads=1,
      dim=8, ffn_dim=0, dropout=0.0, norm="sasrec", l2_norm=l2_norm,
      item_features="attributes"))
  return models.create(cfg, num_items=attr_ids.shape[0] - 1, max_len=6,
                       seed=0, item_attributes=(attr_ids, num_attrs))


def test_item_attributes_add_the_mean_of_their_embeddings():
  # Items 1..4; attribute ids shifted by one (0 pads); item 4 has none.
  attr_ids = np.array([[0, 0], [1, 2], [2, 0], [3, 1], [0, 0]], np.int32)
  model = _attribute_model(attr_ids, 4)
  ids = model.item_embedding.embedding[...]
  attrs = model.attr_embedding.embedding[...]
  expected = ids[:5] + np.stack([
      np.zeros(8), (attrs[1] + attrs[2]) / 2, attrs[2],
      (attrs[3] + attrs[1]) / 2, np.zeros(8)])
  np.testing.assert_allclose(model.all_item_vectors(), expected, atol=1e-6)
  np.testing.assert_allclose(model.item_vectors(jnp.array([[3, 1]])),
                             expected[None, [3, 1]], atol=1e-6)
  # The input side reads the same rows.
  np.testing.assert_allclose(
      model.embed_at(jnp.array([[2]]), jnp.array([[0]])),
      expected[None, [2]] * np.sqrt(8) + model.pos_embedding.embedding[0],
      atol=1e-5)


def test_item_attributes_are_trained_through_both_sides():
  attr_ids = np.array([[0], [1], [1], [2]], np.int32)
  model = _attribute_model(attr_ids, 3, l2_norm=True)

  graphdef, params = nnx.split(model, nnx.Param)

  def score(params):
    m = nnx.merge(graphdef, params)
    h = m.encode(jnp.array([[0, 1, 2]]))[:, -1]
    return jnp.sum(h * m.item_vectors(jnp.array([3])))

  grad = jax.grad(score)(params)["attr_embedding"]["embedding"][...]
  assert np.abs(grad[1]).sum() > 0 and np.abs(grad[2]).sum() > 0
  np.testing.assert_array_equal(grad[0], 0)  # Padding attribute.


def test_item_attributes_must_match_the_config():
  attr_ids = np.zeros((5, 1), np.int32)
  cfg = ml_collections.ConfigDict(dict(
      name="sasrec", attention="scaled_dot", num_blocks=1, num_heads=1,
      dim=8, ffn_dim=0, dropout=0.0, norm="sasrec", l2_norm=False,
      item_features="none"))
  with pytest.raises(ValueError, match="item_features='none' but "
                     "item_attributes given"):
    models.create(cfg, num_items=4, max_len=6, seed=0,
                  item_attributes=(attr_ids, 1))
  cfg.item_features = "attributes"
  with pytest.raises(ValueError, match="item_attributes missing"):
    models.create(cfg, num_items=4, max_len=6, seed=0)
  with pytest.raises(ValueError, match="6 rows for 4 items"):
    models.create(cfg, num_items=4, max_len=6, seed=0,
                  item_attributes=(np.zeros((6, 1), np.int32), 1))
