"""Each loss against a float64 numpy reference; the chunked softmax's
memory; the new losses inside the trainer."""

import json
import os

import ml_collections
import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from configs import test as test_config
from recattn import config_check
from recattn import losses
from recattn import models
from recattn import optim
from recattn import train
from recattn.serving import incremental

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


# --- Large-catalogue losses: chunked softmax, in-batch negatives, gBCE -------

def _loss_config(**fields):
  base = dict(num_negatives=4, sampling="uniform", temperature=0.7,
              logq_correction=True, negatives_group=0, item_chunk=4,
              gbce_t=0.75)
  return ml_collections.ConfigDict({**base, **fields})


def _loss_of(name, cfg, rng=None, log_q=None):
  """`(h, table, targets) -> loss` with the table as a differentiable input."""
  return jax.jit(lambda h, table, t: losses.LOSSES[name](
      _Table(table), h, t, rng, cfg, log_q))


@pytest.mark.parametrize("chunk", [1, 4, 13, 5, 64])  # V + 1 = 13 rows
def test_chunked_softmax_equals_full_softmax_in_value_and_gradients(chunk):
  v, d = 12, 4
  table = RNG.normal(size=(v + 1, d))
  h = RNG.normal(size=(2, 3, d))
  t = np.array([[0, 1, 12], [5, 5, 3]])  # padding, first and last item
  cfg = _loss_config(item_chunk=chunk)
  # float64 numpy reference of the value.
  logits = np.einsum("bld,vd->blv", h, table) / 0.7
  log_z = np.log(np.exp(logits[..., 1:]).sum(-1))
  pos = np.take_along_axis(logits, t[..., None], -1)[..., 0]
  want = ((log_z - pos) * (t > 0)).sum() / (t > 0).sum()
  args = (jnp.array(h, jnp.float32), jnp.array(table, jnp.float32),
          jnp.array(t))
  grad = jax.value_and_grad
  full, full_grads = jax.jit(grad(_loss_of("softmax", cfg), (0, 1)))(*args)
  chunked, chunked_grads = jax.jit(
      grad(_loss_of("softmax_chunked", cfg), (0, 1)))(*args)
  np.testing.assert_allclose(chunked, want, rtol=1e-5)
  np.testing.assert_allclose(chunked, full, rtol=1e-6)
  for got, ref in zip(chunked_grads, full_grads):  # w.r.t. h and the table
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(chunked_grads[1])[0] == 0)  # padding item unused


def _temp_bytes(name, v, b=4, l=16, d=32, chunk=1024):
  spec = (jax.ShapeDtypeStruct((b, l, d), jnp.float32),
          jax.ShapeDtypeStruct((v + 1, d), jnp.float32),
          jax.ShapeDtypeStruct((b, l), jnp.int32))
  fn = jax.jit(jax.grad(_loss_of(name, _loss_config(item_chunk=chunk)),
                        (0, 1)))
  return fn.lower(*spec).compile().memory_analysis().temp_size_in_bytes


def test_chunked_softmax_never_materialises_the_logits():
  # Naive fwd+bwd holds at least the [B, L, V] logits: >= 64 * V floats =
  # 12.8 MB at V = 50,000. Chunked: O(B L chunk) = 64 * 1024.
  full = _temp_bytes("softmax", 50_000)
  chunked = _temp_bytes("softmax_chunked", 50_000)
  assert full >= 4 * 16 * 50_000 * 4
  assert chunked < full / 5, (chunked, full)
  assert chunked < 16 * 4 * 16 * 1024 * 4  # a few [B, L, chunk] blocks


def test_in_batch_negatives_all_targets_with_logq_and_hits():
  # num_negatives >= B * L: every position's target is a negative once.
  d = 3
  t = np.array([[0, 2, 5, 2], [0, 0, 7, 2]])  # padding; item 2 three times
  table = RNG.normal(size=(8, d))
  h = RNG.normal(size=(2, 4, d))
  cfg = _loss_config(sampling="in_batch", num_negatives=8, temperature=0.5)
  got = _loss_of("sampled_softmax", cfg, jax.random.key(0))(
      jnp.array(h), jnp.array(table), jnp.array(t))
  # float64 reference: q_j = count of j among the 5 valid targets / 5.
  valid = t[t > 0]
  q = {j: np.sum(valid == j) / len(valid) for j in valid}
  per = []
  for b, l in zip(*np.nonzero(t > 0)):
    s = {j: h[b, l] @ table[j] / 0.5 - np.log(q[j]) for j in q}
    negs = [j for j in valid if j != t[b, l]]  # accidental hits removed
    per.append(np.log(np.exp(s[t[b, l]]) + sum(np.exp(s[j]) for j in negs))
               - s[t[b, l]])
  np.testing.assert_allclose(got, np.mean(per), rtol=1e-5)


def test_in_batch_negatives_are_drawn_from_valid_targets_by_frequency():
  t = jnp.array([[0, 3, 3, 3], [0, 0, 9, 3]])  # q(3) = 0.8, q(9) = 0.2
  negs, log_q = losses.in_batch_negatives(jax.random.key(0), t, 7)
  assert negs.shape == (7,)  # capped at num_negatives < B * L = 8
  draw = jax.jit(jax.vmap(lambda k: losses.in_batch_negatives(k, t, 7)[0]))
  draws = np.asarray(draw(jax.random.split(jax.random.key(1), 400))).ravel()
  assert set(draws) <= {3, 9}  # never padding
  np.testing.assert_allclose(np.mean(draws == 3), 0.8, atol=0.03)
  np.testing.assert_allclose(np.exp(log_q(jnp.array([3, 9, 5]))),
                             [0.8, 0.2, 0.0])


def test_gbce_matches_numpy_and_beta_follows_the_paper():
  pos, neg, t = RNG.normal(size=(3, 5)), RNG.normal(size=(3, 5, 2)), _targets()
  beta = 0.37
  want = -beta * _log_sigmoid(pos) - _log_sigmoid(-neg).sum(-1)
  want = (want * (t > 0)).sum() / (t > 0).sum()
  got = losses.gbce_from_logits(jnp.array(pos), jnp.array(neg), jnp.array(t),
                                beta)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # alpha = 16 / (101 - 1) = 0.16; beta = 0.16 (0.75 (1 - 6.25) + 6.25).
  np.testing.assert_allclose(losses.gbce_beta(16, 101, 0.75), 0.37)
  np.testing.assert_allclose(losses.gbce_beta(16, 101, 1.0), 0.16)
  np.testing.assert_allclose(losses.gbce_beta(16, 101, 0.0), 1.0)


def test_gbce_with_t0_is_bce_and_t_lowers_the_positive_weight():
  v, d = 30, 4
  table, h = RNG.normal(size=(v + 1, d)), RNG.normal(size=(3, 5, d))
  args = (jnp.array(h), jnp.array(table), jnp.array(_targets()))
  log_q = jnp.log(jnp.full((v + 1,), 1.0 / v).at[0].set(0.0))
  key = jax.random.key(0)
  bce = _loss_of("bce", _loss_config(), key, log_q)(*args)
  gbce0 = _loss_of("gbce", _loss_config(gbce_t=0.0), key, log_q)(*args)
  gbce1 = _loss_of("gbce", _loss_config(gbce_t=1.0), key, log_q)(*args)
  np.testing.assert_allclose(gbce0, bce, rtol=1e-6)
  assert gbce1 < bce  # beta = 4 / 29 < 1 shrinks the positive's term


def test_per_position_losses_refuse_in_batch_sampling():
  v, d = 30, 4
  args = (jnp.array(RNG.normal(size=(3, 5, d))),
          jnp.array(RNG.normal(size=(v + 1, d))), jnp.array(_targets()))
  log_q = jnp.zeros((v + 1,))
  for name in ("bce", "gbce"):
    with pytest.raises(ValueError, match="'in_batch' is implemented by"):
      _loss_of(name, _loss_config(sampling="in_batch"), jax.random.key(0),
               log_q)(*args)


@pytest.mark.parametrize("field, value, message", [
    ("name", "softmax_chunk", "allowed values are .*'softmax_chunked'"),
    ("sampling", "batch", "allowed values are .*'in_batch'"),
    ("item_chunk", 0, "config.loss.item_chunk=0: must be"),
    ("gbce_t", 1.5, r"config.loss.gbce_t=1.5: must be in \[0, 1\]"),
    ("name", "gbce", "sampling='in_batch' needs loss.name='sampled_softmax'"),
])
def test_config_check_knows_the_new_losses(field, value, message):
  c = test_config.get_config()
  for name, sampling in (("gbce", "popularity"), ("softmax_chunked", "uniform"),
                         ("sampled_softmax", "in_batch")):
    with c.unlocked():
      c.loss.name, c.loss.sampling = name, sampling
    config_check.validate(c)
  with c.unlocked():
    c.loss[field] = value
  with pytest.raises(config_check.ConfigError, match=message):
    config_check.validate(c)


def _train_steps(loss_config, num_items=40, batch=8, max_len=10):
  """Two trainer steps of the test model; returns both losses."""
  c = test_config.get_config()
  with c.unlocked():
    c.model.num_blocks = 1
  model = models.create(c.model, num_items=num_items, max_len=max_len, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.make_optimizer(c.optimizer, 10)
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  rng = np.random.default_rng(0)
  batch = {k: jnp.array(rng.integers(0, num_items + 1, (batch, max_len)))
           for k in ("inputs", "targets")}
  log_q = train.sampler_log_q(loss_config, np.arange(num_items + 1) + 1)
  step = jax.jit(train.make_train_step(graphdef, tx, loss_config, log_q))
  state, first = step(state, batch, jax.random.key(0))
  _, second = step(state, batch, jax.random.key(0))
  return float(first), float(second)


@pytest.mark.parametrize("name, sampling", [
    ("gbce", "popularity"), ("sampled_softmax", "in_batch")])
def test_trainer_step_with_each_new_loss(name, sampling):
  cfg = _loss_config(name=name, sampling=sampling, num_negatives=8)
  first, second = _train_steps(cfg)
  assert np.isfinite(first) and np.isfinite(second) and first > 0
  assert second < first  # one Adam step on the same batch lowers the loss


def test_one_epoch_of_chunked_softmax_training(tmp_path):
  # End to end, in-process: configs/test.py, one epoch,
  # 100 items in blocks of 64 (the last block overlaps the previous one).
  c = test_config.get_config()
  with c.unlocked():
    c.data.data_dir = str(tmp_path / "tfds")
    c.mesh.data = 1
    c.num_epochs = 1
    c.loss.name, c.loss.item_chunk = "softmax_chunked", 64
  final = train.train_and_evaluate(c, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    loss = json.loads(f.readline())["train/loss"]
  np.testing.assert_allclose(loss, np.log(100), rtol=0.05)  # ~ uniform at init
  assert final["valid/full/ndcg@10"] > 0


def test_pooled_negatives_match_a_numpy_reference():
  # negatives_pool: one pool per step, each position picks its own columns.
  v, d, pool, n = 30, 4, 8, 5
  table = RNG.normal(size=(v + 1, d))
  h = RNG.normal(size=(2, 3, d))
  t = np.array([[0, 4, 9], [7, 7, 2]])
  counts = np.arange(v + 1, dtype=np.float64)
  counts[0] = 0
  log_q = np.log(counts / counts.sum())
  cfg = _loss_config(num_negatives=n, negatives_pool=pool,
                     sampling="popularity")
  rng = jax.random.key(3)
  got = _loss_of("sampled_softmax", cfg, rng, jnp.array(log_q, jnp.float32))(
      jnp.array(h), jnp.array(table), jnp.array(t))
  # The same draws, read back from the sampler, then float64 numpy.
  pool_rng, pick_rng = jax.random.split(rng)
  ids = np.asarray(losses.sample_negatives(
      pool_rng, (pool,), jnp.array(log_q, jnp.float32), "popularity"))
  pick = np.asarray(jax.random.randint(pick_rng, (2, 3, n), 0, pool))
  negs = ids[pick]  # [B, L, N]: different columns at different positions
  assert len({tuple(x) for x in negs.reshape(-1, n)}) > 1
  pos = np.sum(h * table[t], -1) / 0.7 - np.where(t > 0, log_q[t], 0)
  neg = np.einsum("bld,blnd->bln", h, table[negs]) / 0.7 - log_q[negs]
  neg = np.where(negs == t[..., None], -np.inf, neg)
  all_l = np.concatenate([pos[..., None], neg], -1)
  want = np.log(np.exp(all_l).sum(-1)) - pos
  want = (want * (t > 0)).sum() / (t > 0).sum()
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _ranker(num_items=30, max_len=10, attention="scaled_dot"):
  c = test_config.get_config().model
  c.positions = "left"
  c.rank_head = True
  c.attention = attention
  return models.create(c, num_items=num_items, max_len=max_len, seed=0)


def test_target_rank_loss_scores_one_target_position_per_row(monkeypatch):
  model = _ranker()
  inputs = jnp.array([[0, 0, 0, 5, 6, 7, 8, 9, 10, 11],
                      [0] * 10,  # no targets: counts zero
                      [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], jnp.int32)
  targets = jnp.where(inputs > 0, inputs + 1, 0)
  seen = {}

  def fake_scores(model, cache, items, times, candidates, *, cut, rngs):
    del model, cache, times, rngs
    seen.update(items=items, candidates=candidates, cut=cut)
    # Logits = candidate id / 10: the softmax is easy to recompute.
    return candidates.astype(jnp.float32) / 10.0

  monkeypatch.setattr(losses.incremental, "score_targets", fake_scores)
  config = ml_collections.ConfigDict({"rank_negatives": 40})
  value = losses.target_rank_loss(model, {}, inputs, targets, None,
                                  jax.random.key(0), config)
  cut = np.asarray(seen["cut"])
  cands = np.asarray(seen["candidates"])
  assert cut[0] >= 3 and cut[2] >= 0  # rows 0 and 2: a position with a target
  np.testing.assert_array_equal(cands[[0, 2], 0],
                                np.asarray(targets)[[0, 2], cut[[0, 2]]])
  assert cands.shape == (3, 41) and cands[:, 1:].min() >= 1
  assert cands[:, 1:].max() <= model.num_items
  want = []
  for row in (0, 2):  # negatives equal to the positive are left out
    keep = np.concatenate([[True], cands[row, 1:] != cands[row, 0]])
    logits = cands[row][keep] / 10.0
    want.append(np.log(np.exp(logits).sum()) - logits[0])
  np.testing.assert_allclose(float(value), np.mean(want), rtol=1e-5)


@pytest.mark.parametrize("attention", ["scaled_dot", "linear"])
def test_target_rank_loss_trains_the_head(attention):
  model = _ranker(attention=attention)
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.integers(1, 31, (8, 10)), jnp.int32)
  targets = jnp.roll(inputs, -1, axis=1).at[:, -1].set(3)
  config = ml_collections.ConfigDict({"rank_negatives": 8, "rank_cuts": 3})
  tx = optax.adam(1e-2)

  def loss(params):
    m = nnx.merge(graphdef, params)
    _, cache = incremental.encode_recording(m, inputs, None)
    return losses.target_rank_loss(m, cache, inputs, targets, None,
                                   jax.random.key(1), config)

  @jax.jit
  def step(params, opt_state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state = tx.init(params)
  first = None
  for _ in range(40):
    params, opt_state, value = step(params, opt_state)
    first = float(value) if first is None else first
  assert float(loss(params)) < 0.5 * first
