"""Tests for `recattn.optim`: the optimizer and Polyak averaging."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import test as test_config
from recattn import checkpoint as checkpoint_lib
from recattn import config_check
from recattn import models
from recattn import optim
from recattn import sharding
from recattn import train
from recattn.serving import engine as serving_engine


def test_params_ema_follows_its_recursion():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32)}
  decay = 0.8
  tx = optax.chain(optax.sgd(0.1), optim.params_ema(decay))
  state = tx.init(params)
  p = {k: v.astype(np.float64) for k, v in params.items()}
  ema = dict(p)
  for t in range(1, 31):
    grads = {k: rng.normal(size=v.shape).astype(np.float32)
             for k, v in params.items()}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    d = min(decay, t / (t + 9))
    p = {k: p[k] - 0.1 * grads[k] for k in p}
    ema = {k: d * ema[k] + (1 - d) * p[k] for k in p}
  got = optim.averaged_params({"params": params, "opt_state": state})
  for k in p:
    np.testing.assert_allclose(params[k], p[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[k], ema[k], rtol=1e-5, atol=1e-6)
  assert not np.allclose(got["w"], params["w"])  # an average, not a copy


def test_params_ema_needs_params_and_a_decay_in_range():
  tx = optim.params_ema(0.9)
  state = tx.init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update({"w": jnp.ones(2)}, state)
  with pytest.raises(ValueError, match=r"in \[0, 1\), got 1.0"):
    optim.params_ema(1.0)


def _opt_config(**changes):
  c = test_config.get_config().optimizer
  with c.unlocked():
    c.update(changes)
  return c


def test_without_averaging_the_state_is_the_bare_optimizer_s():
  params = {"w": jnp.ones((2, 3))}
  got = optim.make_optimizer(_opt_config(), 10).init(params)
  want = optax.adam(optax.constant_schedule(1e-3)).init(params)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  state = {"params": params, "opt_state": got}
  assert optim.averaged_params(state) is params


def test_the_average_is_sharded_like_the_parameters():
  c = test_config.get_config()
  model = models.create(c.model, num_items=31, max_len=8, seed=0)
  model.pad_item_rows(2)
  _, params = nnx.split(model, nnx.Param)
  tx = optim.make_optimizer(_opt_config(ema_decay=0.9, clip_norm=1.0), 10)
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  mesh = sharding.make_mesh(4, 2)
  placed = jax.device_put(state, sharding.state_shardings(state, mesh))
  ema = optim.averaged_params(placed)
  table = ema["item_embedding"]["embedding"][...]
  assert table.sharding.spec == P("model", None)
  np.testing.assert_array_equal(
      table, placed["params"]["item_embedding"]["embedding"][...])


def test_ema_decay_out_of_range_is_a_config_error():
  c = test_config.get_config()
  c.optimizer.ema_decay = 1.0
  with pytest.raises(config_check.ConfigError,
                     match=r"config.optimizer.ema_decay=1.0: must be in "
                     r"\[0, 1\)"):
    config_check.validate(c)


def test_training_with_averaging_evaluates_and_serves_the_average(tmp_path):
  c = test_config.get_config()
  c.data.data_dir = str(tmp_path / "tfds")
  c.num_epochs = 3
  c.eval.every_epochs = 1
  c.optimizer.ema_decay = 0.9
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(c, workdir)
  model, config, ds = serving_engine.restore_model(workdir)
  _, params = nnx.split(models.create_for_data(config, ds, seed=config.seed),
                        nnx.Param)
  tx = optim.make_optimizer(config.optimizer, 1)
  template = {"params": params, "opt_state": tx.init(params),
              "step": jnp.zeros((), jnp.int32)}
  ckpts = checkpoint_lib.Checkpoints(workdir)
  try:
    best, meta = ckpts.restore_best(template)
  finally:
    ckpts.close()
  # Selection during training and the final validation saw the same
  # parameters: the selected checkpoint's average.
  assert final["valid/full/ndcg@10"] == pytest.approx(meta["best"], abs=1e-6)
  # Serving gets that average, not the raw parameters it was taken from.
  served = nnx.state(model, nnx.Param)
  ema = optim.averaged_params(best)
  jax.tree.map(np.testing.assert_array_equal, served, ema)
  table = lambda tree: np.asarray(tree["item_embedding"]["embedding"][...])
  assert not np.allclose(table(ema), table(best["params"]))
  # The average does not touch training: without it the same losses, but
  # validation then scores the raw parameters.
  c.optimizer.ema_decay = 0.0
  c.data.data_dir = str(tmp_path / "tfds")
  raw_dir = str(tmp_path / "raw")
  train.train_and_evaluate(c, raw_dir)
  with_ema, without = _metrics(workdir), _metrics(raw_dir)
  np.testing.assert_allclose([m["train/loss"] for m in with_ema],
                             [m["train/loss"] for m in without], rtol=1e-6)
  assert ([m["valid/full/ndcg@10"] for m in with_ema]
          != [m["valid/full/ndcg@10"] for m in without])


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if "train/loss" in line]
