"""Every attention variant inside the models: causal, and it learns."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import test as test_config
from recattn import attention
from recattn import models
from recattn import train

NUM_ITEMS, MAX_LEN, BATCH = 20, 12, 32

# (model, attention, rel_bias): every registered variant in SASRec, plus the
# HSTU model and a relative bias through each family.
CASES = [("sasrec", name, "none") for name in sorted(attention.REGISTRY)] + [
    ("hstu", "hstu", "position"),
    ("hstu", "scaled_dot", "alibi"),
    ("sasrec", "scaled_dot", "position"),
    ("sasrec", "blockwise", "alibi"),
    ("sasrec", "scaled_dot", "time"),
    ("hstu", "hstu", "position+time"),
    ("sasrec", "blockwise", "position+time"),
]


def _config(model_name, variant, rel_bias):
  c = test_config.get_config()
  with c.unlocked():
    c.model.name = model_name
    c.model.attention = variant
    c.model.rel_bias = rel_bias
    c.model.dim = 16
    c.model.num_heads = 2
    c.model.dropout = 0.0
    c.model.attn.window = 4
    c.model.attn.block_q = 4
    c.model.attn.block_k = 4
    c.loss.name = "softmax"
    c.optimizer.lr = 1e-2
  return c


def _batch(seed):
  """Deterministic sequences i, i+1, i+2, ... (mod V): easy to learn."""
  r = np.random.default_rng(seed)
  start = r.integers(1, NUM_ITEMS + 1, size=(BATCH, 1))
  seq = (start + np.arange(MAX_LEN + 1)[None] - 1) % NUM_ITEMS + 1
  lengths = r.integers(4, MAX_LEN + 1, size=BATCH)
  pad = np.arange(MAX_LEN)[None] < (MAX_LEN - lengths)[:, None]
  inputs = np.where(pad, 0, seq[:, :-1])
  targets = np.where(pad, 0, seq[:, 1:])
  gaps = r.integers(1, 10**5, size=(BATCH, MAX_LEN))  # seconds between items
  times = np.where(pad, 0, np.cumsum(gaps, axis=1))
  return {"inputs": jnp.asarray(inputs, jnp.int32),
          "targets": jnp.asarray(targets, jnp.int32),
          "times": jnp.asarray(times, jnp.int32)}


@pytest.mark.parametrize("model_name,variant,rel_bias", CASES)
def test_tiny_training_run_decreases_the_loss(model_name, variant, rel_bias):
  c = _config(model_name, variant, rel_bias)
  model = models.create(c.model, num_items=NUM_ITEMS, max_len=MAX_LEN, seed=0)
  graphdef, params = nnx.split(model)
  tx = optax.adam(c.optimizer.lr)
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  log_q = jnp.zeros(NUM_ITEMS + 1)
  step = jax.jit(train.make_train_step(graphdef, tx, c.loss, log_q))
  batch = _batch(0)
  losses = []
  for i in range(30):
    state, loss = step(state, batch, jax.random.key(i))
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("model_name,variant,rel_bias", CASES)
def test_changing_a_later_item_never_changes_earlier_states(
    model_name, variant, rel_bias):
  c = _config(model_name, variant, rel_bias)
  model = models.create(c.model, num_items=NUM_ITEMS, max_len=MAX_LEN, seed=0)
  batch = _batch(1)
  items, times = batch["inputs"][:2], batch["times"][:2]
  h = model.encode(items, times=times)
  t = MAX_LEN - 4
  changed = items.at[:, t + 1].set(items[:, t + 1] % NUM_ITEMS + 1)
  h2 = model.encode(changed, times=times.at[:, t + 1:].add(777))
  np.testing.assert_allclose(h2[:, :t + 1], h[:, :t + 1], atol=1e-5)
  assert not np.allclose(h2[:, t + 1], h[:, t + 1])


@pytest.mark.parametrize("variant", sorted(attention.REGISTRY))
def test_sasrec_takes_a_query_key_size_apart_from_the_value_size(variant):
  c = _config("sasrec", variant, "none")
  with c.unlocked():
    c.model.qk_dim = 4  # dim 16, 2 heads: values keep 8 per head
  model = models.create(c.model, num_items=NUM_ITEMS, max_len=MAX_LEN, seed=0)
  attn = model.blocks[0].attn
  assert attn.qkv.kernel.shape == (16, 2 * (4 + 4 + 8))
  assert attn.out.kernel.shape == (2 * 8, 16)
  batch = _batch(2)
  items = batch["inputs"][:2]
  h = model.encode(items)
  assert h.shape == (2, MAX_LEN, 16) and np.all(np.isfinite(h))
  t = MAX_LEN - 4
  h2 = model.encode(items.at[:, t + 1].set(items[:, t + 1] % NUM_ITEMS + 1))
  np.testing.assert_allclose(h2[:, :t + 1], h[:, :t + 1], atol=1e-5)


def test_sasrec_qk_dim_zero_means_dim_over_heads():
  c = _config("sasrec", "scaled_dot", "none")
  explicit = c.copy_and_resolve_references()
  with explicit.unlocked():
    explicit.model.qk_dim = 8
  items = _batch(3)["inputs"][:4]
  a = models.create(c.model, num_items=NUM_ITEMS, max_len=MAX_LEN, seed=0)
  b = models.create(explicit.model, num_items=NUM_ITEMS, max_len=MAX_LEN,
                    seed=0)
  assert a.blocks[0].attn.qkv.kernel.shape == (16, 48)
  np.testing.assert_array_equal(a.encode(items), b.encode(items))


def test_blockwise_matches_scaled_dot_with_a_smaller_query_key_size():
  # Same parameters (neither core has any); blockwise's own backward pass.
  def loss_and_grads(variant):
    c = _config("sasrec", variant, "none")
    with c.unlocked():
      c.model.qk_dim = 4
    model = models.create(c.model, num_items=NUM_ITEMS, max_len=MAX_LEN,
                          seed=0)
    items = _batch(4)["inputs"][:4]
    loss = lambda m: jnp.sum(jnp.sin(m.encode(items)))
    return nnx.value_and_grad(loss)(model)

  (a, grads_a), (b, grads_b) = map(loss_and_grads, ("scaled_dot",
                                                   "blockwise"))
  np.testing.assert_allclose(a, b, rtol=1e-5)
  for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-5)


LAST_CASES = CASES + [
    ("sasrec", "scaled_dot", "none", {"norm": "pre"}),
    ("sasrec", "scaled_dot", "position", {"norm": "post"}),
    ("sasrec", "scaled_dot", "none", {"kv_raw": True}),
    ("sasrec", "scaled_dot", "none", {"norm": "ligr", "ffn_act": "swiglu"}),
    ("sasrec", "scaled_dot", "time", {"remat": True}),
    ("hstu", "hstu", "position", {"remat": True, "num_blocks": 1}),
]


@pytest.mark.parametrize("case", LAST_CASES, ids=str)
def test_encode_last_positions_equals_the_full_output_tail(case):
  model_name, variant, rel_bias, *extra = case
  c = _config(model_name, variant, rel_bias)
  with c.unlocked():
    c.model.update(extra[0] if extra else {})
  model = models.create(c.model, num_items=NUM_ITEMS, max_len=MAX_LEN, seed=0)
  batch = _batch(2)
  items, times = batch["inputs"][:4], batch["times"][:4]
  kwargs = {"times": times, "query_times": times + 5}
  full = model.encode(items, **kwargs)
  for n in (1, 3, MAX_LEN):
    np.testing.assert_allclose(model.encode(items, last=n, **kwargs),
                               full[:, -n:], atol=1e-5, rtol=1e-5)
  # Gradients too (what per-prefix training takes).
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params, last):
    h = nnx.merge(graphdef, params).encode(items, last=last, **kwargs)
    return jnp.sum(h[:, -2:] ** 2)

  got = jax.tree.leaves(jax.grad(loss)(params, 2))
  want = jax.tree.leaves(jax.grad(loss)(params, None))
  # Some gradients are zero up to rounding (a key bias under softmax).
  scale = max(float(jnp.max(jnp.abs(w))) for w in want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale)


def test_encode_last_out_of_range_is_refused():
  c = _config("sasrec", "scaled_dot", "none")
  model = models.create(c.model, num_items=NUM_ITEMS, max_len=MAX_LEN, seed=0)
  items = _batch(0)["inputs"][:2]
  for n in (0, MAX_LEN + 1):
    with pytest.raises(ValueError, match=rf"encode\(last={n}\).*\[1, 12\]"):
      model.encode(items, last=n)


@pytest.mark.parametrize("variant", sorted(attention.REGISTRY))
def test_cpu_compiler_options_train_the_same_model(variant):
  options = attention.compiler_options(variant)
  assert options == (attention.get(variant).cpu_compiler_options
                     if jax.default_backend() == "cpu" else {})
  if not options:
    return
  c = _config("sasrec", variant, "none")
  model = models.create(c.model, num_items=NUM_ITEMS, max_len=MAX_LEN, seed=0)
  graphdef, params = nnx.split(model)
  # Plain SGD with rate 1: each parameter moves by its gradient (Adam's first
  # step would magnify rounding in gradients near zero).
  tx = optax.sgd(1.0)
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  step = train.make_train_step(graphdef, tx, c.loss, jnp.zeros(NUM_ITEMS + 1))
  batch, rng = _batch(5), jax.random.key(0)
  plain, loss = jax.jit(step)(state, batch, rng)
  tuned, tuned_loss = jax.jit(step, compiler_options=options)(state, batch,
                                                              rng)
  np.testing.assert_allclose(tuned_loss, loss, rtol=1e-5)
  for a, b, p in zip(jax.tree.leaves(tuned["params"]),
                     jax.tree.leaves(plain["params"]),
                     jax.tree.leaves(params)):
    np.testing.assert_allclose(a - p, b - p, rtol=1e-4, atol=1e-6)


def test_compiler_options_this_jaxlib_rejects_are_dropped(monkeypatch):
  bogus = {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"}
  monkeypatch.setitem(attention.REGISTRY, "din", dataclasses.replace(
      attention.REGISTRY["din"], cpu_compiler_options=bogus))
  assert attention.compiler_options("din") == {}
  assert attention.compiler_options("scaled_dot") == {}
