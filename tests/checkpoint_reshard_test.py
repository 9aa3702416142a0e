"""Checkpoints restore onto another mesh shape (8 fake CPU devices).

Saved on a (2, 4) mesh, the item table (34 rows for 33 items) is padded to
36 rows; a model=2 or model=1 template has 34, a model=3 one 36 and a
model=8 one 40. Restoring cuts or adds zero rows and lands every array on
the template's sharding; real rows, Adam moments and the step are equal.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import test as test_config
from recattn import checkpoint
from recattn import models
from recattn import optim
from recattn import sharding
from recattn import train

NUM_ITEMS = 33  # 34 rows: 36 on model=4 or 3, 34 on 2 or 1, 40 on 8
ROWS = NUM_ITEMS + 1
MAX_LEN = 8


def _config():
  c = test_config.get_config()
  with c.unlocked():
    c.model.num_blocks = 1
    c.loss.name = "sampled_softmax"
  return c


def _state(c, mesh, num_items=NUM_ITEMS, max_len=MAX_LEN):
  """(graphdef, tx, state placed on `mesh`, its shardings)."""
  model = models.create(c.model, num_items=num_items, max_len=max_len,
                        seed=0)
  model.pad_item_rows(sharding.axis_size(mesh, "items"))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.make_optimizer(c.optimizer, 10)
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  shardings = sharding.state_shardings(state, mesh)
  return graphdef, tx, jax.device_put(state, shardings), shardings


def _trained_state(c, mesh):
  """Two sampled-softmax steps: params and Adam moments all move."""
  graphdef, tx, state, shardings = _state(c, mesh)
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, ROWS, (16, MAX_LEN)).astype(np.int32)
           for k in ("inputs", "targets")}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  log_q = train.sampler_log_q(c.loss, np.ones(ROWS))
  step = jax.jit(train.make_train_step(graphdef, tx, c.loss, log_q),
                 out_shardings=(shardings, sharding.replicated(mesh)))
  for _ in range(2):
    state, _ = step(state, batch, jax.random.key(0))
  return state


def _tables(state):
  adam = state["opt_state"][0]
  return [x["item_embedding"]["embedding"][...]
          for x in (state["params"], adam.mu, adam.nu)]


def _saved(tmp_path, mesh_shape=(2, 4)):
  c = _config()
  state = _trained_state(c, sharding.make_mesh(*mesh_shape))
  ckpts = checkpoint.Checkpoints(str(tmp_path))
  ckpts.save_latest(2, state, {"epoch": 1})
  ckpts.save_best(2, state, {"epoch": 1})
  ckpts.close()
  return c, jax.device_get(state)


@pytest.mark.parametrize("saved_on,data,model,rows", [
    ((2, 4), 4, 2, 34), ((2, 4), 8, 1, 34), ((2, 4), 1, 1, 34),
    ((2, 4), 1, 4, 36),  # 8 -> 4 devices, same padding
    ((2, 4), 1, 8, 40),  # 4 -> 8 shards: zero rows added
    ((1, 8), 1, 4, 36),  # 8 -> 4 devices: 40 -> 36 rows
    ((1, 8), 2, 3, 36),  # 40 rows do not split in 3: restored replicated
    ((1, 8), 1, 1, 34)])
def test_restore_onto_another_mesh(tmp_path, saved_on, data, model, rows):
  c, saved = _saved(tmp_path, saved_on)
  mesh = sharding.make_mesh(data, model)
  _, _, template, _ = _state(c, mesh)
  ckpts = checkpoint.Checkpoints(str(tmp_path))  # fresh, as on resume
  for restored, meta in (ckpts.restore_latest(template),
                         ckpts.restore_best(template)):
    assert meta == {"epoch": 1}
    # Every array on the template's sharding (its mesh, its devices).
    jax.tree.map(lambda x, t: (x.shape, x.sharding) == (t.shape, t.sharding)
                 or pytest.fail(f"{x.shape} {x.sharding} != "
                                f"{t.shape} {t.sharding}"),
                 restored, template)
    assert restored["params"]["item_embedding"]["embedding"][...].sharding \
        .spec == P("model", None)
    assert len(restored["step"].sharding.device_set) == data * model
    assert int(restored["step"]) == 2
    got = jax.device_get(restored)
    for table, want in zip(_tables(got), _tables(saved)):
      assert table.shape == (rows, 16)
      np.testing.assert_array_equal(table[:ROWS], want[:ROWS])
      np.testing.assert_array_equal(table[ROWS:], 0.0)
    assert np.any(_tables(got)[1][:ROWS] != 0)  # moments were trained
    # Everything else bit-equal.
    jax.tree_util.tree_map_with_path(
        lambda path, x, y: "item_embedding" in jax.tree_util.keystr(path)
        or np.testing.assert_array_equal(x, y), got, saved)
  ckpts.close()


def test_other_shape_mismatches_name_the_array_and_both_shapes(tmp_path):
  c, _ = _saved(tmp_path)
  ckpts = checkpoint.Checkpoints(str(tmp_path))
  mesh = sharding.make_mesh(1, 1)
  # Another max_len: the position table differs in dim 0, but its rows
  # are positions, not padded items.
  _, _, template, _ = _state(c, mesh, max_len=MAX_LEN + 2)
  with pytest.raises(ValueError) as e:
    ckpts.restore_latest(template)
  message = str(e.value)
  assert "pos_embedding/embedding/value" in message
  assert "(8, 16)" in message and "(10, 16)" in message
  assert "'items'" in message
  # Another width: every array differs; the first one met is named.
  with c.unlocked():
    c.model.dim, c.model.num_heads = 8, 1
  _, _, template, _ = _state(c, mesh)
  with pytest.raises(ValueError,
                     match=r"'opt_state/0/mu/blocks/0/attn/out/bias/value' "
                           r"has shape \(16,\), the restore template \(8,\)"):
    ckpts.restore_latest(template)
  ckpts.close()


def test_a_smaller_catalogue_is_not_mistaken_for_padding(tmp_path):
  c, _ = _saved(tmp_path)
  ckpts = checkpoint.Checkpoints(str(tmp_path))
  # 30 rows: cutting 36 -> 30 would drop 4 real items.
  _, _, template, _ = _state(c, sharding.make_mesh(1, 1), num_items=29)
  with pytest.raises(ValueError, match=r"item_embedding/embedding/value' "
                     r"of shape \(36, 16\): rows 30\.\.35 are not zero"):
    ckpts.restore_latest(template)
  ckpts.close()
