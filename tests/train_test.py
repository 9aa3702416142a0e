"""Trainer: sharded == single device, resume == straight run, entry point,
clear errors for impossible configs and non-finite losses."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import test as test_config
from recattn import config_check
from recattn import data as data_lib
from recattn import interrupt
from recattn import losses
from recattn import models
from recattn import optim
from recattn import runlock
from recattn import sharding
from recattn import train
from recattn.data import batching
from recattn.models import base as models_base
from recattn.serving import engine as serving_engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tmp_path, **overrides):
  c = test_config.get_config()
  with c.unlocked():
    c.data.data_dir = str(tmp_path / "tfds")
    c.mesh.data = 1
    for key, value in overrides.items():
      section, field = key.split("__") if "__" in key else (None, key)
      (c[section] if section else c)[field] = value
  return c


def _step_once(num_devices):
  c = test_config.get_config()
  num_items, max_len, batch = 30, 8, 16
  model = models.create(c.model, num_items=num_items, max_len=max_len,
                        seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.make_optimizer(c.optimizer, 10)
  mesh = sharding.make_mesh(num_devices)
  state = jax.device_put(
      {"params": params, "opt_state": tx.init(params),
       "step": jnp.zeros((), jnp.int32)}, sharding.replicated(mesh))
  rng = np.random.default_rng(0)
  targets = rng.integers(0, num_items + 1, (batch, max_len)).astype(np.int32)
  inputs = rng.integers(0, num_items + 1, (batch, max_len)).astype(np.int32)
  data = jax.device_put({"inputs": inputs, "targets": targets},
                        sharding.batch_sharding(mesh))
  log_q = train.sampler_log_q(c.loss, np.ones(num_items + 1))
  step = jax.jit(train.make_train_step(graphdef, tx, c.loss, log_q))
  state, loss = step(state, data, jax.random.key(0))
  state, loss = step(state, data, jax.random.key(0))
  return jax.device_get(state["params"]), float(loss)


def test_sharded_step_on_8_devices_equals_single_device():
  assert jax.device_count() == 8, "conftest fakes 8 CPU devices"
  p1, l1 = _step_once(1)
  p8, l8 = _step_once(8)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  # Adam divides by sqrt(v): for near-zero gradients, reduction-order noise
  # moves a parameter by a fraction of one lr (1e-3) step. 1e-4 is 10% of a
  # step; a real sharding bug moves parameters by whole steps.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               p8, p1)


def _quality(final):
  return {k: v for k, v in final.items() if not k.startswith("train/")
          or k in ("train/epochs", "train/steps", "train/best_epoch")}


def test_killed_and_resumed_run_ends_where_a_straight_run_does(
    tmp_path, monkeypatch):
  straight = train.train_and_evaluate(_config(tmp_path),
                                      str(tmp_path / "straight"))
  real = batching.epoch_batches

  def dies_in_epoch_3(lengths, batch_size, epoch, seed, chunk):
    if epoch == 2:
      raise KeyboardInterrupt("simulated kill")
    return real(lengths, batch_size, epoch, seed, chunk)

  monkeypatch.setattr(batching, "epoch_batches", dies_in_epoch_3)
  workdir = str(tmp_path / "resumed")
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(_config(tmp_path), workdir)
  assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))
  monkeypatch.setattr(batching, "epoch_batches", real)
  resumed = train.train_and_evaluate(_config(tmp_path), workdir)
  assert _quality(resumed) == _quality(straight)
  steps = [json.loads(l)["step"] for l in open(
      os.path.join(workdir, "metrics.jsonl"))]
  assert steps == sorted(steps) and len(steps) == len(set(steps)) + 1, steps


def test_sigterm_mid_epoch_saves_there_and_resuming_ends_as_a_straight_run(
    tmp_path, monkeypatch):
  straight = train.train_and_evaluate(_config(tmp_path),
                                      str(tmp_path / "straight"))
  steps_per_epoch = straight["train/steps"] // straight["train/epochs"]
  real, calls = train.distributed.place, []

  def place(*args, **kwargs):  # every training batch goes through it
    calls.append(None)
    if len(calls) == steps_per_epoch + 3:  # during epoch 2's third step
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

  monkeypatch.setattr(train.distributed, "place", place)
  workdir = tmp_path / "stopped"
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(interrupt.Interrupted,
                     match=f"SIGTERM: stopped after step 3 of "
                           f"{steps_per_epoch} of epoch 2"):
    train.train_and_evaluate(_config(tmp_path), str(workdir))
  assert signal.getsignal(signal.SIGTERM) is before
  assert not (workdir / "final_metrics.json").exists()
  assert os.listdir(workdir / "ckpt" / "latest") == [
      str(steps_per_epoch + 3)]
  monkeypatch.setattr(train.distributed, "place", real)
  resumed = train.train_and_evaluate(_config(tmp_path), str(workdir))
  assert _quality(resumed) == _quality(straight)
  # the interrupted epoch's seconds are kept: one entry per epoch
  assert resumed["train/epochs"] == straight["train/epochs"]
  losses = [json.loads(l).get("train/loss") for l in open(
      workdir / "metrics.jsonl")]
  assert losses == [json.loads(l).get("train/loss") for l in open(
      tmp_path / "straight" / "metrics.jsonl")]


def test_stop_request_records_the_first_signal_and_restores_handlers():
  told = []
  before = signal.getsignal(signal.SIGINT)
  with interrupt.StopRequest(on_stop=told.append) as stopper:
    assert not stopper.requested
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGTERM)  # ignored: already stopping
    assert stopper.requested == signal.SIGINT and stopper.reason == "SIGINT"
  assert told == [signal.SIGINT]
  assert signal.getsignal(signal.SIGINT) is before


def test_entry_point_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, RECATTN_DATA_DIR=str(tmp_path / "tfds"))
  proc = subprocess.run(
      [sys.executable, "-m", "recattn.main", "--config=configs/test.py",
       f"--workdir={workdir}", "--config.num_epochs=2",
       "--config.mesh.data=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("config.json", "env.json", "metrics.jsonl",
               "final_metrics.json", "data_card.json"):
    assert (workdir / name).exists(), name
  final = json.loads((workdir / "final_metrics.json").read_text())
  for key in ("valid/full/ndcg@10", "test/full/ndcg@10", "test/full/hr@10",
              "test/sampled_uniform20/ndcg@10", "test/full/mrr",
              "train/wall_s", "train/epochs", "train/s_per_epoch"):
    assert isinstance(final[key], (int, float)), key
  assert final["train/epochs"] == 2
  # a [32, 20] SASRec step holds at least its parameters and Adam moments
  assert final["train/peak_bytes"] > 3 * 4 * final["train/num_params"]
  env_json = json.loads((workdir / "env.json").read_text())
  assert env_json["device_count"] >= 1 and env_json["packages"]["jax"]
  assert (workdir / "ckpt" / "best").is_dir()


@pytest.mark.parametrize("field,value,message", [
    ("data.max_len", 0, "config.data.max_len=0: must be a number > 0"),
    ("model.attention", "nope", "config.model.attention='nope': allowed"),
    ("model.num_heads", 3, "config.model.num_heads=3 must divide"),
    ("loss.name", "hinge", "config.loss.name='hinge': allowed values are"),
    ("eval.select_metric", "test/full/ndcg@10", "selection must use"),
    ("model.rel_bias", "rope", "config.model.rel_bias='rope': allowed"),
    ("model.attn.window", 0, "config.model.attn.window=0: must be"),
    ("model.attn.linear_feature", "relu",
     "config.model.attn.linear_feature='relu': allowed values are"),
    ("model.attn.normalizer", "max", "config.model.attn.normalizer='max'"),
    ("data.train_on_valid", True, "set config.eval.select_metric='none'"),
    ("model.positions", "center", "config.model.positions='center'"),
    ("model.dense_init", "xavier",
     "config.model.dense_init='xavier': allowed values are ['normal', "
     "'torch']"),
    ("data.train_windows", "every", "allowed values are ['all', 'last', "
     "'prefixes']"),
    ("model.norm", "rms", "config.model.norm='rms': allowed values are "
     "['ligr', 'post', 'pre', 'sasrec']"),
    ("model.ffn_act", "tanh", "config.model.ffn_act='tanh': allowed values "
     "are ['gelu', 'relu', 'swiglu']"),
])
def test_impossible_configs_name_the_field(field, value, message):
  c = test_config.get_config()
  *path, name = field.split(".")
  with c.unlocked():
    section = c
    for part in path:
      section = section[part]
    section[name] = value
  with pytest.raises(config_check.ConfigError, match=message.replace(
      "(", r"\(").replace("[", r"\[")):
    config_check.validate(c)


@pytest.mark.parametrize("fields,message", [
    ({"loss.rank_weight": 1.0}, "set config.model.rank_head=True"),
    ({"loss.rank_weight": -1.0}, "config.loss.rank_weight=-1.0: must be >= 0"),
    ({"model.rank_head": True, "model.positions": "left",
      "loss.rank_weight": 1.0, "data.train_windows": "prefixes"},
     "config.data.train_windows='prefixes': the ranking head"),
    ({"model.rank_head": True}, "config.model.positions='left' or 'none'"),
    ({"model.rank_head": True, "model.positions": "left",
      "model.rel_bias": "alibi"}, "config.model.rel_bias='alibi'"),
    ({"model.rank_head": True, "model.positions": "left",
      "model.attention": "local"}, "config.model.attention='local' cannot"),
    ({"model.rank_head": True, "model.positions": "left",
      "loss.rank_negatives": 0}, "config.loss.rank_negatives=0"),
    ({"model.qk_dim": -1}, "config.model.qk_dim=-1: must be a number >= 0"),
    ({"model.v_dim": 8}, "config.model.v_dim=8: only model.name='hstu'"),
    ({"model.qk_dim": 4, "model.attention": "low_rank"}, None),
    ({"model.qk_dim": 4, "model.attn.low_rank_value_pool": True},
     "config.model.attn.low_rank_value_pool=True pools values"),
    ({"model.item_features": "text"},
     "config.model.item_features='text': allowed values are ['none', "
     "'attributes']"),
    ({"model.item_features": "attributes"},
     "config.data.name='synthetic' has no item attributes; datasets with "
     "them: ['beauty', 'ml-1m', 'ml-1m-partial', 'ml-1m-seq', 'sports', "
     "'toys']"),
    ({"model.item_features": "attributes", "data.name": "toys"}, None),
    ({"model.item_features": "attributes", "data.name": "ml-1m-seq"}, None),
    ({"model.ffn_act": "swiglu", "model.name": "bsarec"},
     "config.model.ffn_act='swiglu': only model.name='sasrec' has it"),
    ({"model.ffn_act": "swiglu", "model.norm": "ligr"}, None),
])
def test_impossible_field_combinations_are_refused(fields, message):
  c = test_config.get_config()
  with c.unlocked():
    for field, value in fields.items():
      *path, name = field.split(".")
      section = c
      for part in path:
        section = section[part]
      section[name] = value
  if message is None:  # a valid neighbour of the refused configs
    config_check.validate(c)
    return
  with pytest.raises(config_check.ConfigError, match=re.escape(message)):
    config_check.validate(c)


def test_ranking_head_trains_and_is_evaluated_target_aware(tmp_path):
  c = test_config.get_config()
  c.data.data_dir = str(tmp_path / "tfds")
  c.num_epochs = 2
  c.model.positions = "left"
  c.model.rank_head = True
  c.loss.rank_weight = 1.0
  final = train.train_and_evaluate(c, str(tmp_path / "run"))
  for split in ("valid", "test"):
    for protocol in ("full", "sampled_uniform20", "ranker_uniform20"):
      value = final[f"{split}/{protocol}/ndcg@10"]
      assert 0.0 < value <= 1.0, (split, protocol, value)


def test_entry_point_prints_one_line_for_a_bad_config(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "recattn.main", "--config=configs/test.py",
       f"--workdir={tmp_path}", "--config.model.num_heads=3"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.model.num_heads=3"), proc.stderr


def test_a_workdir_in_training_is_refused_before_anything_is_written(
    tmp_path):
  workdir = tmp_path / "run"
  with runlock.hold(str(workdir)):
    with pytest.raises(runlock.Busy, match="being trained by another"):
      train.train_and_evaluate(_config(tmp_path), str(workdir))
    proc = subprocess.run(
        [sys.executable, "-m", "recattn.main", "--config=configs/test.py",
         f"--workdir={workdir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {workdir} is being trained by another "
                         f"process (pid {os.getpid()} "), proc.stderr
  assert os.listdir(workdir) == [runlock.LOCK_NAME]


def test_non_finite_loss_stops_with_the_step_range(tmp_path, monkeypatch):
  monkeypatch.setitem(losses.LOSSES, "sampled_softmax",
                      lambda *a: jnp.float32(jnp.nan))
  with pytest.raises(train.NonFiniteLossError, match="non-finite training "
                     "loss at step 0 .epoch 1, steps 1..7"):
    train.train_and_evaluate(_config(tmp_path), str(tmp_path / "nan"))


def test_time_bias_on_data_without_timestamps_names_the_field(
    tmp_path, monkeypatch):
  real_load = train.data_lib.load

  def load_without_times(data_config):
    return dataclasses.replace(real_load(data_config), timestamps=None)

  monkeypatch.setattr(train.data_lib, "load", load_without_times)
  c = _config(tmp_path)
  with c.unlocked():
    c.model.rel_bias = "time"
  with pytest.raises(config_check.ConfigError,
                     match="config.model.rel_bias='time' needs timestamps"):
    train.train_and_evaluate(c, str(tmp_path / "notime"))


def test_time_query_next_trains_and_evaluates_from_the_next_item_s_time(
    tmp_path, monkeypatch):
  c = _config(tmp_path, num_epochs=1)
  with c.unlocked():
    c.model.rel_bias = "time"
    c.model.time_query = "next"
  seen = []
  real_encode = models_base.SequenceRecommender.encode

  def spy(self, items, **kwargs):
    seen.append(kwargs.get("query_times") is not None)
    return real_encode(self, items, **kwargs)

  monkeypatch.setattr(models_base.SequenceRecommender, "encode", spy)
  final = train.train_and_evaluate(c, str(tmp_path / "next"))
  assert np.isfinite(final["test/full/ndcg@10"])
  assert seen and all(seen)  # every training and evaluation pass
  with pytest.raises(ValueError, match="time_query='next'"):
    serving_engine.restore_model(str(tmp_path / "next"))


@pytest.mark.parametrize("changes, match", [
    ({"model.time_query": "target"}, "allowed values are"),
    ({"model.time_query": "next"}, "rel_bias='none' has none"),
    ({"model.time_query": "next", "model.rel_bias": "time",
      "model.rank_head": True, "model.positions": "left",
      "loss.rank_weight": 1.0}, "ranking head"),
])
def test_time_query_config_errors(tmp_path, changes, match):
  c = _config(tmp_path)
  with c.unlocked():
    for field, value in changes.items():
      section, name = field.split(".")
      c[section][name] = value
  with pytest.raises(config_check.ConfigError, match=match):
    config_check.validate(c)


def test_train_on_valid_trains_on_the_validation_item_and_selects_nothing(
    tmp_path):
  c = _config(tmp_path, num_epochs=2, data__train_on_valid=True)
  with c.unlocked():
    c.eval.select_metric = "none"
  final = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert final["train/best_epoch"] == final["train/epochs"] == 2
  assert not any(k.startswith("valid/") for k in final)
  assert np.isfinite(final["test/full/ndcg@10"])
  ds = data_lib.load(c.data)
  _, targets = batching.train_arrays(ds, c.data.max_len, holdout=1)
  # The last training target of every user is now its validation item.
  assert np.diff(ds.offsets).min() >= 3  # so every user has a row
  np.testing.assert_array_equal(targets[:, -1], ds.items[ds.offsets[1:] - 2])


def test_prefix_rows_score_the_last_position_only():
  # A step's loss on [B, 1] targets is the loss of full-width targets that
  # are zero (padding) everywhere but the last position.
  c = test_config.get_config()
  c.model.dropout = 0.0
  num_items, max_len = 30, 8
  model = models.create(c.model, num_items=num_items, max_len=max_len,
                        seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.make_optimizer(c.optimizer, 10)
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  with c.unlocked():
    c.loss.name = "softmax"
  step = jax.jit(train.make_train_step(graphdef, tx, c.loss, None))
  rng = np.random.default_rng(0)
  inputs = rng.integers(1, num_items + 1, (4, max_len)).astype(np.int32)
  last = rng.integers(1, num_items + 1, (4, 1)).astype(np.int32)
  wide = np.zeros_like(inputs)
  wide[:, -1:] = last
  _, narrow_loss = step(state, {"inputs": inputs, "targets": last},
                        jax.random.key(0))
  _, wide_loss = step(state, {"inputs": inputs, "targets": wide},
                      jax.random.key(0))
  np.testing.assert_allclose(narrow_loss, wide_loss, rtol=1e-5)


def test_prefix_windows_train_one_step_per_batch_of_targets(tmp_path):
  c = _config(tmp_path, num_epochs=2, data__train_windows="prefixes")
  final = train.train_and_evaluate(c, str(tmp_path / "run"))
  ds = data_lib.load(c.data)
  targets = int(np.sum(np.diff(ds.offsets) - 3))  # n - 3 per user
  assert final["train/steps"] == 2 * -(-targets // c.batch_size)
  assert np.isfinite(final["test/full/ndcg@10"])


def test_item_attributes_train_end_to_end_and_restore_for_serving(tmp_path):
  # A small Beauty-format file: 60 users over items 1..40, 5 attributes.
  rng = np.random.default_rng(0)
  manual = tmp_path / "manual" / "amazon-s3rec"
  manual.mkdir(parents=True)
  lines = [" ".join(map(str, [u, *rng.integers(1, 41, rng.integers(5, 12))]))
           for u in range(1, 61)]
  (manual / "Beauty.txt").write_text("\n".join(lines) + "\n")
  attrs = {str(i): [i % 3, 3 + i % 2] for i in range(1, 41)}
  (manual / "Beauty_item2attributes.json").write_text(json.dumps(attrs))
  c = _config(tmp_path, num_epochs=2)
  with c.unlocked():
    c.data.name = "beauty"
    c.data.manual_dir = str(tmp_path / "manual")
    c.data.download = False
    c.data.max_len = 12
    c.model.item_features = "attributes"
  final = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert np.isfinite(final["test/full/ndcg@10"])
  model, _, ds = serving_engine.restore_model(str(tmp_path / "run"))
  attr_ids, num_attrs = data_lib.load_item_attributes(c.data, ds)
  assert model.attr_embedding.embedding.shape == (num_attrs, c.model.dim)
  # Trained (moved from its initial values), and part of every item vector.
  fresh = models.create_for_data(c, ds, seed=c.seed)
  assert not np.allclose(model.attr_embedding.embedding[...],
                         fresh.attr_embedding.embedding[...], atol=1e-4)
  assert not np.allclose(model.all_item_vectors()[1:],
                         model.item_embedding.embedding[1:ds.num_items + 1])
  assert attr_ids.shape == (ds.num_items + 1, 2)
