"""Each loss against a float64 numpy reference."""

import ml_collections
import numpy as np
import jax
import jax.numpy as jnp

from recattn import losses

RNG = np.random.default_rng(0)


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _targets():
  t = RNG.integers(1, 30, size=(3, 5))
  t[0, :2] = 0  # padding positions carry no loss
  return t


def test_bce_matches_numpy():
  pos, neg, t = RNG.normal(size=(3, 5)), RNG.normal(size=(3, 5, 2)), _targets()
  want = -_log_sigmoid(pos) - _log_sigmoid(-neg).sum(-1)
  want = (want * (t > 0)).sum() / (t > 0).sum()
  got = losses.bce_from_logits(jnp.array(pos), jnp.array(neg), jnp.array(t))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_full_softmax_matches_numpy_and_ignores_padding_item():
  logits, t = RNG.normal(size=(3, 5, 30)), _targets()
  z = logits[..., 1:]
  log_z = np.log(np.exp(z).sum(-1))
  pos = np.take_along_axis(logits, t[..., None], -1)[..., 0]
  want = ((log_z - pos) * (t > 0)).sum() / (t > 0).sum()
  got = losses.softmax_from_logits(jnp.array(logits), jnp.array(t))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_sampled_softmax_with_logq_and_accidental_hits():
  t = _targets()
  negs = np.array([3, 7, t[1, 1], 11])  # one negative equals a target
  pos, neg = RNG.normal(size=(3, 5)), RNG.normal(size=(3, 5, 4))
  log_q = np.log(RNG.uniform(0.01, 1.0, size=30))
  hits = t[..., None] == negs
  p = pos - log_q[t]
  n = np.where(hits, -np.inf, neg - log_q[negs])
  all_l = np.concatenate([p[..., None], n], -1)
  want = np.log(np.exp(all_l).sum(-1)) - p
  want = (want * (t > 0)).sum() / (t > 0).sum()
  got = losses.sampled_softmax_from_logits(
      jnp.array(pos), jnp.array(neg), jnp.array(hits), jnp.array(t),
      jnp.array(log_q[t]), jnp.array(log_q[negs]))
  np.testing.assert_allclose(got, want, rtol=1e-5)


class _Table:
  """A stand-in model: fixed item vectors."""

  def __init__(self, table):
    self.table = jnp.array(table)

  def item_vectors(self, ids):
    return self.table[ids]

  def all_item_vectors(self):
    return self.table


def test_sampled_softmax_with_all_items_as_negatives_is_full_softmax():
  # Every item once as a negative + the hit removed == exact softmax.
  v, d = 12, 4
  table = RNG.normal(size=(v + 1, d))
  h = RNG.normal(size=(2, 3, d))
  t = RNG.integers(1, v + 1, size=(2, 3))
  cfg = ml_collections.ConfigDict(dict(
      num_negatives=v, sampling="uniform", temperature=0.5,
      logq_correction=False))
  full = losses.softmax(_Table(table), jnp.array(h), jnp.array(t), None, cfg,
                        None)
  negs = jnp.arange(1, v + 1)
  pos = jnp.sum(jnp.array(h) * table[t], -1) / 0.5
  neg = jnp.einsum("bld,nd->bln", jnp.array(h), table[1:]) / 0.5
  sampled = losses.sampled_softmax_from_logits(
      pos, neg, jnp.array(t)[..., None] == negs, jnp.array(t))
  np.testing.assert_allclose(sampled, full, rtol=1e-5)


def test_popularity_sampler_follows_log_q():
  log_q = jnp.log(jnp.array([0.0, 0.7, 0.2, 0.1]))
  draws = losses.sample_negatives(jax.random.key(0), (20000,), log_q,
                                  "popularity")
  freq = np.bincount(np.asarray(draws), minlength=4) / 20000
  np.testing.assert_allclose(freq, [0, 0.7, 0.2, 0.1], atol=0.02)
  uni = losses.sample_negatives(jax.random.key(1), (1000,), log_q, "uniform")
  assert np.asarray(uni).min() >= 1 and np.asarray(uni).max() <= 3
