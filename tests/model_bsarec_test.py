"""BSARec: the filter against an FFT written out, the same function at every
window width, last positions, per-prefix training, refused configs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import test as test_config
from recattn import attention
from recattn import config_check
from recattn import models
from recattn import optim
from recattn import train
from recattn.models import bsarec
from recattn.serving import engine as engine_lib

NUM_ITEMS, MAX_LEN = 30, 12


def _config(**model):
  c = test_config.get_config()
  with c.unlocked():
    c.model.name = "bsarec"
    c.model.dropout = 0.0
    c.model.update(model)
    c.data.train_windows = "prefixes"
  return c


def _model(**model):
  return models.create(_config(**model).model, num_items=NUM_ITEMS,
                       max_len=MAX_LEN, seed=0)


def _items(seed, batch=4, length=MAX_LEN):
  rng = np.random.default_rng(seed)
  items = rng.integers(1, NUM_ITEMS + 1, (batch, length))
  lengths = rng.integers(3, length + 1, batch)
  pad = np.arange(length)[None] < (length - lengths)[:, None]
  return jnp.asarray(np.where(pad, 0, items), jnp.int32)


@pytest.mark.parametrize("length,c", [(12, 5), (11, 5), (50, 5), (8, 1),
                                      (9, 17)])
def test_low_pass_matrix_is_the_truncated_fft(length, c):
  keep = c // 2 + 1
  x = np.random.default_rng(0).normal(size=(3, length, 4))
  spectrum = jnp.fft.rfft(x, axis=1, norm="ortho")
  spectrum = spectrum.at[:, keep:].set(0)
  want = jnp.fft.irfft(spectrum, n=length, axis=1, norm="ortho")
  got = np.einsum("qk,bkd->bqd", bsarec.low_pass_matrix(length, keep), x)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # Keeping every bin is the identity; keeping only bin 0 is the mean.
  np.testing.assert_allclose(
      bsarec.low_pass_matrix(length, length // 2 + 1), np.eye(length),
      atol=1e-12)
  np.testing.assert_allclose(bsarec.low_pass_matrix(length, 1),
                             np.full((length, length), 1 / length),
                             atol=1e-12)


def test_block_is_bsarec_written_out():
  # One block on a full-width window, against the paper's formula with
  # jnp.fft and plain LayerNorms (dropout off).
  model = _model(num_blocks=1, bsarec_alpha=0.6, bsarec_c=3)
  block = model.blocks[0]
  x = jax.random.normal(jax.random.key(0), (2, MAX_LEN, 16))
  m = attention.Mask(causal=True, key_valid=jnp.ones((2, MAX_LEN), bool))
  got, _ = block(x, m, rngs=None)

  def ln(mod, v):
    mu = v.mean(-1, keepdims=True)
    var = ((v - mu) ** 2).mean(-1, keepdims=True)
    return (v - mu) / jnp.sqrt(var + 1e-12) * mod.scale[...] + mod.bias[...]

  spectrum = jnp.fft.rfft(x, axis=1, norm="ortho").at[:, 2:].set(0)
  low = jnp.fft.irfft(spectrum, n=MAX_LEN, axis=1, norm="ortho")
  beta = block.sqrt_beta[...] ** 2
  dsp = ln(block.ln_filter, x + low + beta * (x - low))
  a, _ = block.attn(x, m)
  gsp = ln(block.ln_attn, x + a)
  h = 0.6 * dsp + 0.4 * gsp
  y = block.ffn_out(jax.nn.gelu(block.ffn_in(h), approximate=False))
  np.testing.assert_allclose(got, ln(block.ln_ffn, h + y), atol=2e-5)


def test_states_do_not_depend_on_the_window_width():
  # Bucketed batches cut windows to different widths; left padding must not
  # change a state (the filter is the max_len one, restricted).
  model = _model()
  items = _items(1, length=7)
  wide = jnp.pad(items, ((0, 0), (MAX_LEN - 7, 0)))
  np.testing.assert_allclose(model.encode(items),
                             model.encode(wide)[:, -7:], atol=2e-5)


def test_states_see_later_items():
  # Why the config check asks for per-prefix rows.
  model = _model()
  items = _items(2)
  changed = items.at[:, -1].set(items[:, -1] % NUM_ITEMS + 1)
  assert not np.allclose(model.encode(changed)[:, -4],
                         model.encode(items)[:, -4])


def test_encode_last_positions_equals_the_full_output_tail():
  model = _model()
  items = _items(3)
  full = model.encode(items)
  for n in (1, 3, MAX_LEN):
    np.testing.assert_allclose(model.encode(items, last=n), full[:, -n:],
                               atol=2e-5)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params, last):
    h = nnx.merge(graphdef, params).encode(items, last=last)
    return jnp.sum(h[:, -1:] ** 2)

  scale = max(float(jnp.max(jnp.abs(g))) for g in
              jax.tree.leaves(jax.grad(loss)(params, None)))
  for g, w in zip(jax.tree.leaves(jax.grad(loss)(params, 1)),
                  jax.tree.leaves(jax.grad(loss)(params, None))):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale)


def test_per_prefix_training_decreases_the_loss():
  # Rows i, i+1, ... (mod V); the target is the next item after the window.
  c = _config(attention="scaled_dot")
  with c.unlocked():
    c.loss.name = "softmax"
    c.optimizer.lr = 1e-2
  model = models.create(c.model, num_items=NUM_ITEMS, max_len=MAX_LEN,
                        seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.make_optimizer(c.optimizer, 100)
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  rng = np.random.default_rng(0)
  start = rng.integers(1, NUM_ITEMS + 1, (32, 1))
  seq = (start + np.arange(MAX_LEN + 1)[None] - 1) % NUM_ITEMS + 1
  batch = {"inputs": jnp.asarray(seq[:, :-1], jnp.int32),
           "targets": jnp.asarray(seq[:, -1:], jnp.int32)}
  step = jax.jit(train.make_train_step(graphdef, tx, c.loss, None))
  losses = []
  for i in range(40):
    state, value = step(state, batch, jax.random.key(i))
    losses.append(float(value))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses


def test_served_state_is_the_last_position_of_the_window():
  # Serving re-encodes the window at every event (positions 'right') and
  # keeps the last position's state: what the evaluator scores.
  model = _model()
  engine = engine_lib.Engine.from_model(
      model, max_len=MAX_LEN, original_item_ids=np.arange(NUM_ITEMS) + 1)
  assert not engine.cached
  items = np.asarray(_items(5, batch=2, length=MAX_LEN + 3)) % NUM_ITEMS + 1
  states = [engine.new_state() for _ in range(2)]
  for t in range(items.shape[1]):
    states = engine.observe(states, items[:, t])
    window = items[:, max(0, t + 1 - MAX_LEN):t + 1]
    window = np.pad(window, ((0, 0), (MAX_LEN - window.shape[1], 0)))
    want = model.encode(jnp.asarray(window, jnp.int32), last=1)[:, -1]
    np.testing.assert_allclose(np.stack([s["h"] for s in states]), want,
                               atol=2e-5, err_msg=f"after {t + 1} events")


@pytest.mark.parametrize("fields,message", [
    ({"data.train_windows": "last"},
     "config.model.name='bsarec' with config.data.train_windows='last'"),
    ({"data.train_windows": "all"}, "allowed value: 'prefixes'"),
    ({"model.positions": "left"},
     "config.model.name='bsarec': config.model.positions='left'"),
    ({"model.rank_head": True}, "config.model.rank_head=True scores"),
    ({"model.bsarec_alpha": 1.5},
     "config.model.bsarec_alpha=1.5: must be in [0, 1]"),
    ({"model.bsarec_c": 0}, "config.model.bsarec_c=0: must be an int >= 1"),
    ({}, None),
])
def test_config_check(fields, message):
  c = _config()
  with c.unlocked():
    for field, value in fields.items():
      section, name = field.split(".")
      c[section][name] = value
  if message is None:
    config_check.validate(c)
    return
  with pytest.raises(config_check.ConfigError, match=re.escape(message)):
    config_check.validate(c)


def test_trains_and_evaluates_end_to_end(tmp_path):
  c = _config()
  with c.unlocked():
    c.data.data_dir = str(tmp_path / "tfds")
    c.mesh.data = 1
    c.num_epochs = 2
    c.loss.name = "softmax"
  final = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert np.isfinite(final["test/full/ndcg@10"])
  assert final["test/full/ndcg@10"] > 0
