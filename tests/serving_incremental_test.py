"""Incremental serving state equals a full forward pass (recattn.serving)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recattn.serving import engine as engine_lib
from recattn.serving import incremental

from serving_models import MAX_LEN, NUM_ITEMS
from serving_models import small_model as _model

# Every registered variant; `linear` with both feature maps, `hstu` with
# both normalizers and the time bias (HSTU's rab), SASRec with each norm.
CASES = [
    ("sasrec", "scaled_dot", {}),
    ("sasrec", "dot", {"model.norm": "pre"}),
    ("sasrec", "blockwise", {"model.attn.block_q": 4, "model.attn.block_k": 4}),
    ("sasrec", "local", {"model.attn.window": 3, "model.norm": "post"}),
    ("sasrec", "linear", {}),
    ("sasrec", "linear", {"model.attn.linear_feature": "l2",
                          "model.kv_raw": True}),
    ("sasrec", "low_rank", {"model.attn.num_latents": 4}),
    ("sasrec", "additive", {}),
    ("sasrec", "din", {"model.attn.din_hidden": (8,)}),
    ("sasrec", "scaled_dot", {"model.rel_bias": "position+time"}),
    ("sasrec", "scaled_dot", {"model.rel_bias": "alibi",
                              "model.positions": "none"}),
    ("hstu", "hstu", {"model.rel_bias": "position+time"}),
    ("hstu", "hstu", {"model.attn.normalizer": "true",
                      "model.attn.hstu_block_k": 5}),
]


def _events(n, seed=0):
  rng = np.random.default_rng(seed)
  users = 3
  items = rng.integers(1, NUM_ITEMS + 1, size=(users, n))
  times = np.cumsum(rng.integers(1, 5000, size=(users, n)), axis=1) + 10**9
  return items, times


@pytest.mark.parametrize("name,attention,overrides", CASES,
                         ids=[f"{n}-{a}-{i}" for i, (n, a, _) in
                              enumerate(CASES)])
def test_state_after_each_event_equals_full_forward(name, attention,
                                                    overrides):
  model = _model(name, attention, overrides)
  engine = engine_lib.Engine.from_model(model, max_len=MAX_LEN, cache="kv",
                             original_item_ids=np.arange(NUM_ITEMS) + 100)
  assert engine.cached
  # Past max_len too: the window then rolls over (re-encoded).
  items, times = _events(MAX_LEN + 3)
  states = [engine.new_state() for _ in range(len(items))]
  for t in range(items.shape[1]):
    states = engine.observe(states, items[:, t], times[:, t])
    want = engine.full_forward(items[:, :t + 1], times[:, :t + 1])
    got = np.stack([s["h"] for s in states])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5,
                               err_msg=f"after {t + 1} events")
  assert all(int(s["count"]) == items.shape[1] for s in states)


def test_users_at_different_points_batch_together():
  model = _model("sasrec", "scaled_dot", {})
  engine = engine_lib.Engine.from_model(model, max_len=MAX_LEN,
                             original_item_ids=np.arange(NUM_ITEMS) + 1)
  items, times = _events(MAX_LEN + 2, seed=1)
  # User 0 gets every event, user 1 every other one, user 2 none at first.
  states = [engine.new_state() for _ in range(3)]
  seqs = [[], [], []]
  for t in range(items.shape[1]):
    who = [u for u in range(3) if (u == 0 or (u == 1 and t % 2 == 0) or
                                   (u == 2 and t >= 6))]
    new = engine.observe([states[u] for u in who], items[who, t],
                         times[who, t])
    for u, s in zip(who, new):
      states[u] = s
      seqs[u].append(items[u, t])
  want = engine.full_forward(seqs)
  np.testing.assert_allclose(np.stack([s["h"] for s in states]), want,
                             atol=1e-5, rtol=1e-5)


def test_observe_does_not_modify_its_inputs():
  engine = engine_lib.Engine.from_model(
      _model("sasrec", "linear", {}), max_len=MAX_LEN,
      original_item_ids=np.arange(NUM_ITEMS) + 1)
  state = engine.new_state()
  copy = {k: v.copy() for k, v in state.items()}
  engine.observe([state], [5])
  for k in state:
    np.testing.assert_array_equal(state[k], copy[k])


def test_right_positions_are_served_by_reencoding():
  model = _model("sasrec", "scaled_dot", {}, positions="right")
  ok, why = incremental.cacheable(model)
  assert not ok and "model.positions='right'" in why
  with pytest.raises(ValueError, match="impossible"):
    engine_lib.Engine.from_model(model, max_len=MAX_LEN, cache="kv",
                      original_item_ids=np.arange(NUM_ITEMS) + 1)
  engine = engine_lib.Engine.from_model(model, max_len=MAX_LEN,
                             original_item_ids=np.arange(NUM_ITEMS) + 1)
  assert not engine.cached and "positions" in engine.describe()[
      "why_not_cached"]
  assert not any(k.startswith("b0.") for k in engine.new_state())
  items, times = _events(MAX_LEN + 2, seed=2)
  states = [engine.new_state() for _ in range(3)]
  for t in range(items.shape[1]):
    states = engine.observe(states, items[:, t], times[:, t])
  np.testing.assert_allclose(np.stack([s["h"] for s in states]),
                             engine.full_forward(items), atol=1e-5, rtol=1e-5)


def test_recommend_excludes_seen_and_matches_dense_scores():
  engine = engine_lib.Engine.from_model(_model("sasrec", "scaled_dot", {}),
                             max_len=MAX_LEN,
                             original_item_ids=np.arange(NUM_ITEMS) + 1)
  items, times = _events(5, seed=4)
  states = [engine.new_state() for _ in range(3)]
  for t in range(5):
    states = engine.observe(states, items[:, t], times[:, t])
  h = np.stack([s["h"] for s in states])
  table = np.asarray(engine.table["vectors"])
  dense = h @ table.T
  dense[:, 0] = -np.inf
  for exclude in (True, False):
    ids, scores = engine.recommend(states, 10, exclude_seen=exclude)
    for u in range(3):
      d = dense[u].copy()
      if exclude:
        d[items[u]] = -np.inf
      want = np.argsort(-d, kind="stable")[:10]
      np.testing.assert_allclose(scores[u], d[want], rtol=1e-5, atol=1e-6)
      assert set(ids[u]) == set(want) or np.allclose(
          np.sort(d[ids[u]]), np.sort(d[want]))
      if exclude:
        assert not set(ids[u]) & set(items[u])
  # A user without events gets the popular list.
  ids, scores = engine.recommend([engine.new_state()], 4)
  np.testing.assert_array_equal(ids[0], engine.popular[:4])
  with pytest.raises(ValueError, match="k=0"):
    engine.recommend(states, 0)


def test_int8_scan_returns_exact_scores_of_the_true_top_k():
  rng = np.random.default_rng(0)
  vectors = rng.normal(size=(5001, 16)).astype(np.float32)
  vectors[0] = 0
  h = rng.normal(size=(4, 16)).astype(np.float32)
  seen = rng.integers(1, 5001, size=(4, 30)).astype(np.int32)
  exact = engine_lib.scoring_table(jnp.asarray(vectors), "exact")
  quant = engine_lib.scoring_table(jnp.asarray(vectors), "int8")
  assert quant["q"].dtype == np.int8
  for k in (1, 10, 100):
    ids_e, scores_e = engine_lib.top_k(exact, h, seen, k)
    ids_q, scores_q = engine_lib.top_k(quant, h, seen, k)
    np.testing.assert_array_equal(ids_q, ids_e)
    np.testing.assert_allclose(scores_q, scores_e, rtol=1e-6)
    for row in range(4):
      assert not np.isin(ids_q[row], seen[row]).any()
  with pytest.raises(ValueError, match="scoring='fp8'"):
    engine_lib.scoring_table(vectors, "fp8")


@pytest.mark.parametrize("attention", ["scaled_dot", "linear"])
def test_start_from_histories_equals_observing_them(attention):
  engine = engine_lib.Engine.from_model(
      _model("sasrec", attention, {"model.rel_bias": "time"}
             if attention == "scaled_dot" else {}),
      max_len=MAX_LEN, max_seen=16,
      original_item_ids=np.arange(NUM_ITEMS) + 1)
  items, times = _events(MAX_LEN + 6, seed=5)
  lengths = [0, 3, MAX_LEN + 6]
  started = engine.start([items[u, :n] for u, n in enumerate(lengths)],
                         [times[u, :n] for u, n in enumerate(lengths)])
  for u, n in enumerate(lengths):
    state = engine.new_state()
    for t in range(n):
      state, = engine.observe([state], items[u, t:t + 1], times[u, t:t + 1])
    assert set(started[u]) == set(state)
    for key in state:
      np.testing.assert_allclose(started[u][key], state[key], atol=1e-5,
                                 rtol=1e-5, err_msg=f"user {u} {key}")


def test_warmup_compiles_every_batch_shape_a_service_uses():
  engine = engine_lib.Engine.from_model(
      _model("sasrec", "scaled_dot", {}), max_len=MAX_LEN,
      original_item_ids=np.arange(NUM_ITEMS) + 1)
  engine.warmup(4)
  sizes = {engine.append_fn._cache_size(), engine.encode_fn._cache_size(),
           engine.top_k_fn._cache_size()}
  assert sizes == {3}  # batches of 1, 2 and 4
  states = engine.observe([engine.new_state() for _ in range(3)], [1, 2, 3])
  engine.recommend(states, 5)
  assert engine.append_fn._cache_size() == 3  # nothing new compiled


@pytest.mark.parametrize("v,k,block", [(1000, 10, 8), (1000, 128, 7),
                                       (50, 16, 8), (4096, 5, 128)])
def test_block_top_k_equals_lax_top_k(v, k, block):
  rng = np.random.default_rng(v + k)
  scores = rng.standard_normal((3, v)).astype(np.float32)
  scores[0, rng.integers(0, v, v // 2)] = -np.inf  # excluded items
  scores[1, :] = np.round(scores[1], 1)  # many ties
  scores[2, : v // 3] = 5.0  # the best all in the first blocks
  want_values, want_ids = jax.lax.top_k(jnp.asarray(scores), k)
  values, ids = engine_lib.block_top_k(jnp.asarray(scores), k, block)
  np.testing.assert_array_equal(values, want_values)
  # Ids: each returned id carries its returned value, no id twice.
  np.testing.assert_array_equal(
      np.take_along_axis(scores, np.asarray(ids), 1), values)
  assert all(len(set(row)) == k for row in np.asarray(ids).tolist())


def test_block_top_k_with_fewer_finite_scores_than_k():
  scores = np.full((1, 1003), -np.inf, np.float32)
  scores[0, [5, 700, 1002]] = [1.0, 3.0, 2.0]
  values, ids = engine_lib.block_top_k(jnp.asarray(scores), 10, 8)
  np.testing.assert_array_equal(np.asarray(ids)[0, :3], [700, 1002, 5])
  assert np.isneginf(np.asarray(values)[0, 3:]).all()
  assert 0 <= int(np.min(ids)) and int(np.max(ids)) < 1003
