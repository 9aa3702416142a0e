"""Target-aware candidate scoring (M-FALCON) equals scoring each alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recattn.serving import incremental

from serving_models import MAX_LEN, NUM_ITEMS
from serving_models import small_model

# Every variant `score_targets` supports, with the time bias and both HSTU
# normalizers (the "padded" one divides by the key count).
CASES = [
    ("sasrec", "scaled_dot", {}),
    ("sasrec", "dot", {"model.norm": "pre"}),
    ("sasrec", "blockwise", {"model.attn.block_q": 4, "model.attn.block_k": 4}),
    ("sasrec", "linear", {}),
    ("sasrec", "linear", {"model.attn.linear_feature": "l2",
                          "model.kv_raw": True}),
    ("sasrec", "additive", {}),
    ("sasrec", "din", {"model.attn.din_hidden": (8,)}),
    ("sasrec", "scaled_dot", {"model.rel_bias": "time"}),
    ("sasrec", "scaled_dot", {"model.positions": "none"}),
    ("hstu", "hstu", {"model.rel_bias": "time"}),
    ("hstu", "hstu", {"model.rel_bias": "none", "model.attn.normalizer": "true",
                      "model.attn.hstu_block_k": 5}),
]


def _model(name, attention, overrides, **fields):
  return small_model(name, attention, overrides, **{"rank_head": True,
                                                    **fields})


def _window(seq, times):
  """Left-padded `[W]` window of the last MAX_LEN events."""
  items = np.zeros(MAX_LEN, np.int32)
  stamps = np.zeros(MAX_LEN, np.int32)
  seq, times = seq[-MAX_LEN:], times[-MAX_LEN:]
  items[MAX_LEN - len(seq):] = seq
  stamps[MAX_LEN - len(times):] = times
  return items, stamps


def _alone(model, history, times, candidate):
  """The logit of `candidate` scored after `history` by a full forward."""
  now = times[-1] if len(times) else 0
  items, stamps = _window(np.append(history, candidate), np.append(times, now))
  kwargs = {"times": jnp.asarray(stamps[None])} if "time" in model.rel_bias \
      else {}
  h = model.encode(jnp.asarray(items[None]), **kwargs)[:, -1]
  return float(model.rank_head(h)[0, 0])


def _histories(seed=0):
  rng = np.random.default_rng(seed)
  lengths = [0, 1, 5, MAX_LEN - 1]  # empty ... one short of a full window
  histories = [rng.integers(1, NUM_ITEMS + 1, n) for n in lengths]
  times = [np.sort(rng.integers(10**9, 10**9 + 10**6, n)) for n in lengths]
  candidates = rng.integers(1, NUM_ITEMS + 1, (len(lengths), 6))
  return histories, times, candidates


@pytest.mark.parametrize("name,attention,overrides", CASES,
                         ids=[f"{n}-{a}-{i}" for i, (n, a, _) in
                              enumerate(CASES)])
def test_one_pass_equals_each_candidate_alone(name, attention, overrides):
  model = _model(name, attention, overrides)
  histories, times, candidates = _histories()
  windows = [_window(h, t) for h, t in zip(histories, times)]
  items = jnp.asarray(np.stack([w[0] for w in windows]))
  stamps = jnp.asarray(np.stack([w[1] for w in windows]))
  _, cache = incremental.encode_window(model, items, stamps)
  got = incremental.score_targets(model, cache, items, stamps,
                                  jnp.asarray(candidates))
  want = [[_alone(model, h, t, c) for c in row]
          for h, t, row in zip(histories, times, candidates)]
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention,rel_bias", [("scaled_dot", "time"),
                                               ("linear", "none")])
def test_cut_scores_the_prefix(attention, rel_bias):
  """Training's cut on a recorded full window = scoring the prefix alone."""
  model = _model("sasrec", attention, {}, rel_bias=rel_bias)
  rng = np.random.default_rng(1)
  n = MAX_LEN
  seqs = rng.integers(1, NUM_ITEMS + 1, (3, n))
  times = np.sort(rng.integers(10**9, 10**9 + 10**6, (3, n)), axis=1)
  cut = np.array([0, 4, n - 1])
  candidates = rng.integers(1, NUM_ITEMS + 1, (3, 4))
  _, cache = incremental.encode_recording(
      model, jnp.asarray(seqs, jnp.int32), jnp.asarray(times, jnp.int32))
  got = incremental.score_targets(
      model, cache, jnp.asarray(seqs, jnp.int32), jnp.asarray(times, jnp.int32),
      jnp.asarray(candidates), cut=jnp.asarray(cut))
  for row in range(3):
    items, stamps = _window(seqs[row, :cut[row] + 1], times[row, :cut[row] + 1])
    items, stamps = jnp.asarray(items[None]), jnp.asarray(stamps[None])
    _, prefix = incremental.encode_window(model, items, stamps)
    want = incremental.score_targets(model, prefix, items, stamps,
                                     jnp.asarray(candidates[row:row + 1]))
    np.testing.assert_allclose(np.asarray(got[row]), np.asarray(want[0]),
                               atol=1e-5, rtol=1e-5)


def test_scores_are_jittable_and_differentiable():
  model = _model("sasrec", "scaled_dot", {})
  graphdef, params = nnx.split(model)
  items = jnp.asarray(np.arange(1, MAX_LEN + 1)[None], jnp.int32)

  def loss(params):
    m = nnx.merge(graphdef, params)
    _, cache = incremental.encode_recording(m, items, None)
    logits = incremental.score_targets(m, cache, items, None,
                                       jnp.array([[3, 4]]), cut=jnp.array([5]))
    return jnp.sum(logits)

  grads = jax.jit(jax.grad(loss))(params)
  head = jax.tree.leaves(grads["rank_head"])
  assert head and all(float(jnp.abs(g).sum()) > 0 for g in head)


@pytest.mark.parametrize("fields,message", [
    ({"attention": "local"}, "unsupported"),
    ({"attention": "low_rank"}, "unsupported"),
])
def test_unsupported_variants_say_so(fields, message):
  model = _model("sasrec", fields["attention"], {})
  items = jnp.ones((1, MAX_LEN), jnp.int32)
  with pytest.raises(ValueError, match=message):
    incremental.score_targets(model, {}, items, None, jnp.ones((1, 2), int))


@pytest.mark.parametrize("fields,message", [
    ({"positions": "right"}, "model.positions"),
    ({"rel_bias": "position"}, "model.rel_bias"),
    ({"rel_bias": "alibi"}, "model.rel_bias"),
])
def test_rank_head_refuses_layouts_it_cannot_score(fields, message):
  with pytest.raises(ValueError, match=message):
    _model("sasrec", "scaled_dot", {}, **fields)


def test_models_without_a_head_say_how_to_get_one():
  model = _model("sasrec", "scaled_dot", {}, rank_head=False)
  items = jnp.ones((1, MAX_LEN), jnp.int32)
  with pytest.raises(ValueError, match="model.rank_head=True"):
    incremental.score_targets(model, {}, items, None, jnp.ones((1, 2), int))
