"""Every attention variant inside the models: causal, and it learns."""

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
