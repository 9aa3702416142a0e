"""Counter-hash dropout masks: keep rate, independence, determinism,
sharding invariance, and the same key use as flax.nnx.Dropout."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest
from flax import nnx

from recattn import dropout


@pytest.mark.parametrize("keep", [0.5, 0.8, 0.05])
def test_keep_rate_is_keep_prob(keep):
  n = 1 << 20
  m = np.asarray(dropout.keep_mask(jax.random.key(3), (n,), keep))
  sigma = np.sqrt(keep * (1 - keep) / n)
  assert abs(m.mean() - keep) < 5 * sigma


def test_neighbours_and_keys_are_independent():
  keep, shape = 0.8, (256, 200, 50)
  a = np.asarray(dropout.keep_mask(jax.random.key(0), shape, keep))
  b = np.asarray(dropout.keep_mask(jax.random.key(1), shape, keep))
  n = a.size
  tol = 5 * np.sqrt(keep**2 * (1 - keep**2) / n)
  # Both kept: p^2 for neighbours along every axis and across two keys.
  for x, y in [(a[..., 1:], a[..., :-1]), (a[:, 1:], a[:, :-1]),
               (a[1:], a[:-1]), (a, b)]:
    assert abs(np.mean(x & y) - keep**2) < tol
  # Nor is one key's mask a shifted copy of another's.
  flat_a, flat_b = a.ravel(), b.ravel()
  for shift in (1, 2, 7, 1000):
    assert abs(np.mean(flat_a[shift:] & flat_b[:-shift]) - keep**2) < 2 * tol


def test_masks_depend_only_on_key_and_shape():
  key = jax.random.key(7)
  a = dropout.keep_mask(key, (4, 6), 0.5)
  np.testing.assert_array_equal(a, dropout.keep_mask(key, (4, 6), 0.5))
  assert not np.array_equal(a, dropout.keep_mask(jax.random.key(8), (4, 6),
                                                 0.5))
  assert dropout.keep_mask(key, (3,), 1.0).all()


def test_sharded_mask_equals_single_device_mask():
  assert jax.device_count() == 8, "conftest fakes 8 CPU devices"
  mesh = jax.make_mesh((8,), ("data",))
  shape, key = (16, 30, 5), jax.random.key(11)
  sharded = jax.jit(lambda k: dropout.keep_mask(k, shape, 0.7),
                    out_shardings=NamedSharding(mesh, P("data")))(key)
  np.testing.assert_array_equal(sharded, dropout.keep_mask(key, shape, 0.7))


def test_apply_scales_kept_values_and_zeroes_the_rest():
  x = jnp.full((1000,), 2.0)
  y = np.asarray(dropout.apply(x, 0.25, jax.random.key(0)))
  assert set(np.unique(y)) <= {0.0, np.float32(2.0 / 0.75)}
  assert dropout.apply(x, 0.0, jax.random.key(0)) is x


def test_module_draws_one_key_like_nnx_dropout():
  x = jnp.ones((2, 3, 4))
  ours, theirs = nnx.Rngs(dropout=5), nnx.Rngs(dropout=5)
  y = dropout.Dropout(0.5)(x, rngs=ours)
  nnx.Dropout(0.5)(x, rngs=theirs)
  # The stream advanced by one key in both: the next keys agree.
  np.testing.assert_array_equal(jax.random.key_data(ours.dropout()),
                                jax.random.key_data(theirs.dropout()))
  assert not np.array_equal(y, x)
  assert dropout.Dropout(0.5)(x, rngs=None, deterministic=True) is x
  with pytest.raises(ValueError, match="needs rngs"):
    dropout.Dropout(0.5)(x)
