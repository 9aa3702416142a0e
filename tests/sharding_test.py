"""Scale-out on 8 fake CPU devices: (data, model) meshes, the row-sharded
item table, sharded train step == single device, sharded top-k == lax.top_k,
sharded evaluator == one device, remat on == off."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import test as test_config
from recattn import losses
from recattn import models
from recattn import optim
from recattn import sharding
from recattn import train
from recattn.data.dataset import SequenceDataset
from recattn.evaluation import Evaluator

NUM_ITEMS = 30  # 31 table rows: divides over no model axis > 1
RULES = (("batch", "data"), ("items", "model"))


def _config(**model):
  c = test_config.get_config()
  with c.unlocked():
    c.model.num_blocks = 1  # compile time; blocks are not sharded
    for key, value in model.items():
      c.model[key] = value
  return c


def _model(c, shards=1, num_items=NUM_ITEMS, max_len=8):
  model = models.create(c.model, num_items=num_items, max_len=max_len,
                        seed=0)
  model.pad_item_rows(shards)
  return model


@pytest.mark.parametrize("data,model,shape", [
    (4, 2, (4, 2)), (2, 4, (2, 4)), (-1, 2, (4, 2)), (2, -1, (2, 4)),
    (-1, 1, (8, 1)), (1, 1, (1, 1))])
def test_mesh_shapes_and_minus_one(data, model, shape):
  assert jax.device_count() == 8, "conftest fakes 8 CPU devices"
  mesh = sharding.make_mesh(data, model)
  assert mesh.axis_names == ("data", "model")
  assert (mesh.shape["data"], mesh.shape["model"]) == shape


@pytest.mark.parametrize("data,model,why", [
    (3, 3, "9 devices needed"), (-1, -1, "at most one"),
    (-1, 3, "3 does not divide 8"), (16, 1, "16 devices needed"),
    (0, 2, "-1 or a positive")])
def test_bad_mesh_names_the_fields_and_the_device_count(data, model, why):
  with pytest.raises(ValueError) as e:
    sharding.make_mesh(data, model)
  message = str(e.value)
  assert f"config.mesh.data={data}, config.mesh.model={model}" in message
  assert "(8 devices present)" in message and why in message


def test_logical_rules_to_partition_specs():
  assert sharding.logical_to_spec(("items", None), RULES) == P("model", None)
  assert sharding.logical_to_spec(("batch",), RULES) == P("data")
  assert sharding.logical_to_spec(("items", None),
                                  (("items", None),)) == P(None, None)
  with pytest.raises(ValueError, match="'heads' has no rule in config.mesh"):
    sharding.logical_to_spec(("heads",), RULES)
  with pytest.raises(ValueError, match="maps 'items' to 'tensor'"):
    sharding.logical_to_spec(("items",), (("items", "tensor"),))


def _placed_state(c, mesh, rules=RULES, num_items=NUM_ITEMS):
  model = _model(c, sharding.axis_size(mesh, "items", rules), num_items)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.make_optimizer(c.optimizer, 10)
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  shardings = sharding.state_shardings(state, mesh, rules)
  return graphdef, tx, jax.device_put(state, shardings), shardings


def _table_specs(state):
  adam = state["opt_state"][0]
  return [x["item_embedding"]["embedding"][...].sharding.spec
          for x in (state["params"], adam.mu, adam.nu)]


def test_item_table_and_adam_moments_follow_the_rules():
  mesh = sharding.make_mesh(4, 2)
  _, _, state, _ = _placed_state(_config(), mesh)
  assert _table_specs(state) == [P("model", None)] * 3
  table = state["params"]["item_embedding"]["embedding"][...]
  assert table.shape == (32, 16)  # 31 rows padded to divide over model=2
  assert {s.data.shape for s in table.addressable_shards} == {(16, 16)}
  pos = state["params"]["pos_embedding"]["embedding"][...]
  assert pos.sharding.spec == P() and state["step"].sharding.spec == P()
  # A rule mapping items to None replicates the table.
  _, _, state, _ = _placed_state(_config(), mesh,
                                 rules=(("batch", "data"), ("items", None)))
  assert _table_specs(state) == [P(None, None)] * 3


def test_non_dividing_catalogue_is_padded_with_unscored_zero_rows():
  c = _config()
  plain = _model(c)
  for shards, rows in ((2, 32), (4, 32), (8, 32), (3, 33), (1, 31)):
    model = _model(c, shards)
    table = model.item_embedding.embedding[...]
    assert table.shape[0] == rows and rows % shards == 0
    np.testing.assert_array_equal(table[31:], 0.0)
    # Losses and evaluators see exactly the unpadded model.
    np.testing.assert_array_equal(model.all_item_vectors(),
                                  plain.all_item_vectors())


def _batch(batch=16, max_len=8, num_items=NUM_ITEMS):
  rng = np.random.default_rng(0)
  targets = rng.integers(0, num_items + 1, (batch, max_len)).astype(np.int32)
  inputs = rng.integers(0, num_items + 1, (batch, max_len)).astype(np.int32)
  return {"inputs": inputs, "targets": targets}


def _loss_and_grads(c, mesh, batch):
  """Deterministic (no dropout) loss and gradients on `mesh`."""
  graphdef, _, state, shardings = _placed_state(c, mesh)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  log_q = train.sampler_log_q(c.loss, np.ones(NUM_ITEMS + 1))

  def loss(params):
    model = nnx.merge(graphdef, params)
    h = model.encode(batch["inputs"])
    return losses.LOSSES[c.loss.name](model, h, batch["targets"],
                                      jax.random.key(1), c.loss, log_q)

  value, grads = jax.jit(jax.value_and_grad(loss),
                         out_shardings=(sharding.replicated(mesh),
                                        shardings["params"]))(state["params"])
  grads = jax.device_get(grads)
  table = grads["item_embedding"]["embedding"]
  np.testing.assert_array_equal(table[...][NUM_ITEMS + 1:], 0.0)
  table.set_value(table[...][:NUM_ITEMS + 1])  # compare the real rows
  return float(value), grads


def _two_steps(c, mesh, batch):
  graphdef, tx, state, shardings = _placed_state(c, mesh)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  log_q = train.sampler_log_q(c.loss, np.ones(NUM_ITEMS + 1))
  step = jax.jit(train.make_train_step(graphdef, tx, c.loss, log_q),
                 donate_argnums=0,
                 out_shardings=(shardings, sharding.replicated(mesh)))
  state, _ = step(state, batch, jax.random.key(0))
  state, loss = step(state, batch, jax.random.key(0))
  assert _table_specs(state) == [P("model", None)] * 3  # kept by the step
  params = jax.device_get(state["params"])
  table = params["item_embedding"]["embedding"]
  np.testing.assert_array_equal(table[...][NUM_ITEMS + 1:], 0.0)
  table.set_value(table[...][:NUM_ITEMS + 1])
  return float(loss), params


def test_sharded_softmax_loss_and_grads_equal_single_device():
  c = _config()
  with c.unlocked():
    c.loss.name = "softmax"  # every item's logit: the sharded case
  batch = _batch()
  l1, g1 = _loss_and_grads(c, sharding.make_mesh(1, 1), batch)
  for data, model in ((4, 2), (2, 4)):
    l8, g8 = _loss_and_grads(c, sharding.make_mesh(data, model), batch)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g1))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5 * scale), g8, g1)


@pytest.mark.parametrize("data,model,loss", [(4, 2, "softmax"),
                                             (2, 4, "sampled_softmax")])
def test_sharded_train_step_equals_single_device(data, model, loss):
  c = _config()  # dropout on: the step's rng must not depend on the mesh
  with c.unlocked():
    c.loss.name = loss
  batch = _batch()
  l1, p1 = _two_steps(c, sharding.make_mesh(1, 1), batch)
  l8, p8 = _two_steps(c, sharding.make_mesh(data, model), batch)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  # As in train_test: 1e-4 is 10% of one Adam step (lr 1e-3).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               p8, p1)


@pytest.mark.parametrize("data,model", [(4, 2), (2, 4), (1, 8)])
def test_sharded_top_k_equals_lax_top_k(data, model):
  mesh = sharding.make_mesh(data, model)
  # 101 items: padded with -inf columns to divide over the model axis.
  scores = jax.random.normal(jax.random.key(0), (8, 101))
  fn = jax.jit(sharding.sharded_top_k, static_argnums=(1, 2))
  for k in (1, 10, 50, 101):
    values, ids = fn(scores, k, mesh)
    want_values, want_ids = jax.lax.top_k(scores, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(values, want_values)
  # Ties go to the lower id, as in lax.top_k.
  tied = jnp.round(scores)
  np.testing.assert_array_equal(fn(tied, 30, mesh)[1],
                                jax.lax.top_k(tied, 30)[1])
  with pytest.raises(ValueError, match="k=102 exceeds the 101"):
    sharding.sharded_top_k(scores, 102, mesh)


def _toy_dataset(num_items=37, num_users=24, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, 12, num_users)
  items = rng.integers(1, num_items + 1, lengths.sum()).astype(np.int32)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  return SequenceDataset("toy", num_items, items, offsets, None, {})


@pytest.mark.parametrize("filter_seen", [False, True])
def test_evaluator_on_2x4_mesh_equals_one_device(filter_seen):
  ds = _toy_dataset()
  c = _config()
  kwargs = dict(max_len=8, batch_size=16, filter_seen=filter_seen,
                num_negatives=5, negatives="uniform", seed=0)
  results = []
  for data, model in ((1, 1), (2, 4)):
    mesh = sharding.make_mesh(data, model)
    net = _model(c, model, num_items=ds.num_items)  # 38 rows -> 40 on 4
    graphdef, params = nnx.split(net, nnx.Param)
    params = jax.device_put(params,
                            sharding.state_shardings(params, mesh, RULES))
    ev = Evaluator(ds, "valid", mesh=mesh, rules=RULES, **kwargs)
    results.append((ev(graphdef, params), ev.top_k(graphdef, params, 10),
                    ev.targets))
  (m1, top1, targets), (m8, top8, _) = results
  assert m1.keys() == m8.keys()
  for key in m1:
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-6, err_msg=key)
  np.testing.assert_array_equal(top8, top1)
  # The top-k is the list the ranks come from: HR@10 = [target in top 10].
  hits = np.mean(np.any(top8 == targets[:, None], axis=1))
  np.testing.assert_allclose(hits, m8["valid/full/hr@10"], rtol=1e-6)
  assert top8.min() >= 1 and top8.max() <= ds.num_items  # no padding ids


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_remat_gives_the_same_outputs_and_grads(name):
  items = jnp.asarray(
      np.random.default_rng(0).integers(0, NUM_ITEMS + 1, (4, 8)))
  w = jax.random.normal(jax.random.key(3), (4, 8, 16))
  out = []
  for remat in (False, True):
    graphdef, params = nnx.split(_model(_config(name=name, remat=remat)),
                                 nnx.Param)

    def f(params):
      model = nnx.merge(graphdef, params)
      h = model.encode(items, rngs=nnx.Rngs(dropout=1))  # dropout on
      return jnp.sum(h * w)

    out.append(jax.jit(jax.value_and_grad(f))(params))
  (v0, g0), (v1, g1) = out
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  # Recomputation reorders float32 sums: on some CPUs (AVX-512 here) a
  # gradient of 0.039 differs by 1.5e-5. A wrong recomputation (say, another
  # dropout mask) differs by whole units.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3,
                                                       atol=1e-5), g1, g0)


def test_train_and_evaluate_on_a_2x4_mesh(tmp_path):
  c = test_config.get_config()
  with c.unlocked():
    c.data.data_dir = str(tmp_path / "tfds")
    c.num_epochs = 1
    c.eval.every_epochs = 1
    c.mesh.data, c.mesh.model = 2, 4
  final = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert np.isfinite(final["test/full/ndcg@10"])
  assert 0.0 <= final["test/full/hr@10"] <= 1.0
  saved = json.load(open(os.path.join(tmp_path, "run", "config.json")))
  assert saved["mesh"]["model"] == 4
