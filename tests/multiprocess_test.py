"""Two real processes (jax.distributed, gloo CPU collectives) = one process.

Both runs see 2 CPU devices on a `data=2` mesh: one process with 2 fake
devices, or two processes on localhost with one each (several fake CPU
devices per process made gloo collectives hang now and then, as in
openxla/xla#16430). Same config and
seed, so the training losses and final metrics must agree; each of the two
processes must build only its half of every batch, and only process 0
writes the run records.

With `data.process_shards` each process holds half of the users; the run
must equal one process that puts the two shards' rows side by side
(`_emulate_two_shards`), and its evaluation one process evaluating every
user.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import test as test_config
from recattn import checkpoint as checkpoint_lib
from recattn import data as data_lib
from recattn import interrupt
from recattn import models
from recattn import optim
from recattn import sharding
from recattn import train
from recattn.data import batching
from recattn.evaluation import Evaluator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
BATCH = 32  # configs/test.py


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(num_devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
  env.pop("RECATTN_DISTRIBUTED", None)
  return env


def _command(tmp_path, workdir, *extra):
  return [sys.executable, "-m", "recattn.main", "--config=configs/test.py",
          f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'tfds'}",
          "--config.num_epochs=2", "--config.mesh.data=2",
          "--config.mesh.model=1", "--config.progress=False", *extra]


def _records(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  final = json.loads((workdir / "final_metrics.json").read_text())
  return [json.loads(l) for l in lines], final


def _assert_close(got, want, key):
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=key)


def _run_two_processes(tmp_path, workdir, *extra, meanwhile=None,
                       expect=0):
  """Runs the two processes to the end; returns their logs.

  `meanwhile(procs)` runs once both have started. Fails on a hang or an
  exit status other than `expect`, skips where gloo is missing.
  """
  port = _free_port()
  logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
  procs = [subprocess.Popen(
      _command(tmp_path, workdir,
               f"--coordinator_address=127.0.0.1:{port}",
               "--num_processes=2", f"--process_id={i}", *extra),
      cwd=ROOT, env=_env(1), stdout=logs[i], stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  try:
    if meanwhile is not None:
      meanwhile(procs)
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = []
  for f in logs:
    f.seek(0)
    outputs.append(f.read())
    f.close()
  # A hang is a failure (it was seen with 2 fake devices per process, and
  # with both checkpoint managers saving in the background).
  if codes is None:
    pytest.fail(f"two-process run still running after {TIMEOUT_S}s:\n" +
                "\n".join(o[-2000:] for o in outputs))
  if any(codes) and re.search(
      r"(gloo|collectives).{0,80}(not (available|supported|implemented)|"
      r"unavailable|unimplemented|has no attribute)", "\n".join(outputs),
      re.IGNORECASE):
    pytest.skip("this jaxlib has no gloo CPU collectives")
  for i, (code, out) in enumerate(zip(codes, outputs)):
    assert code == expect, f"process {i}:\n{out[-3000:]}"
  return outputs


def test_two_processes_train_like_one(tmp_path):
  # One process, 2 devices. Runs first: it also prepares the dataset, so the
  # two processes below only read it.
  single = subprocess.run(
      _command(tmp_path, tmp_path / "one"), cwd=ROOT, env=_env(2),
      capture_output=True, text=True, timeout=TIMEOUT_S)
  assert single.returncode == 0, single.stderr[-3000:]
  outputs = _run_two_processes(tmp_path, tmp_path / "two")

  # Each process built only the rows its 2 devices hold.
  half = BATCH // 2
  for i, out in enumerate(outputs):
    assert (f"process {i} of 2 builds batch rows {i * half}:{(i + 1) * half} "
            f"of {BATCH}") in out, out[-3000:]
  assert "process 0 of 1 builds batch rows 0:32 of 32" in single.stderr

  want_rows, want_final = _records(tmp_path / "one")
  got_rows, got_final = _records(tmp_path / "two")
  # Process 0 alone wrote the records: every step once, as in one process.
  assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows]
  for got, want in zip(got_rows, want_rows):
    assert got.keys() == want.keys()
    for key in want:
      if not key.endswith("_s"):  # timings differ
        _assert_close(got[key], want[key], key)
  assert got_final.keys() == want_final.keys()
  for key, want in want_final.items():
    if key.startswith(("valid/", "test/")) or key in (
        "train/epochs", "train/steps", "train/num_params"):
      _assert_close(got_final[key], want, key)
  env = json.loads((tmp_path / "two" / "env.json").read_text())
  assert env["process_count"] == 2 and env["device_count"] == 2
  # Both processes took part in the checkpoints Orbax wrote.
  assert (tmp_path / "two" / "ckpt" / "best").is_dir()
  assert (tmp_path / "two" / "ckpt" / "latest").is_dir()


def test_sigterm_to_one_process_stops_both_at_the_same_epoch(tmp_path):
  # The data is prepared by a one-process run first (as above).
  single = subprocess.run(
      _command(tmp_path, tmp_path / "one", "--config.num_epochs=1"),
      cwd=ROOT, env=_env(2), capture_output=True, text=True,
      timeout=TIMEOUT_S)
  assert single.returncode == 0, single.stderr[-3000:]
  workdir = tmp_path / "two"

  def stop_process_1_after_epoch_1(procs):
    deadline = time.time() + TIMEOUT_S
    while not (workdir / "metrics.jsonl").exists() and (
        time.time() < deadline and procs[0].poll() is None):
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # process 0 is not told

  epochs = "--config.num_epochs=50"
  outputs = _run_two_processes(tmp_path, workdir, epochs,
                               meanwhile=stop_process_1_after_epoch_1,
                               expect=interrupt.EXIT_CODE)
  stopped = [re.search(r"stopped after epoch (\d+)", o) for o in outputs]
  assert all(stopped), outputs[0][-2000:]
  epoch = int(stopped[0][1])
  assert int(stopped[1][1]) == epoch < 50
  assert "a stop requested in another process" in outputs[0]
  # both saved the end of that epoch
  steps_per_epoch = json.loads(
      (tmp_path / "one" / "final_metrics.json").read_text())["train/steps"]
  assert os.listdir(workdir / "ckpt" / "latest") == [
      str(epoch * steps_per_epoch)]
  outputs = _run_two_processes(tmp_path, workdir,
                               f"--config.num_epochs={epoch + 1}")
  assert f"resumed from epoch {epoch} (step " in outputs[0]


# --- data.process_shards: each process reads and batches its own users ------

# Exercises what the processes must agree on: per-step windows (length
# buckets of 5 items), item counts (popularity sampling, logQ, popularity
# eval negatives) and the time origin (time-aware attention bias).
_SHARD_FLAGS = ("--config.data.process_shards=True",
                "--config.data.bucket_chunk=2", "--config.data.bucket_step=5",
                "--config.loss.sampling=popularity",
                "--config.eval.negatives=popularity",
                "--config.model.rel_bias=time")


def _shard_config(tmp_path):
  """configs/test.py with `_command`'s and `_SHARD_FLAGS`' overrides."""
  c = test_config.get_config()
  with c.unlocked():
    c.data.data_dir = str(tmp_path / "tfds")
    c.num_epochs = 2
    c.mesh.data, c.mesh.model = 2, 1
    c.data.process_shards = True
    c.data.bucket_chunk, c.data.bucket_step = 2, 5
    c.loss.sampling = c.eval.negatives = "popularity"
    c.model.rel_bias = "time"
  return c


def _emulate_two_shards(config, ds):
  """One process, 2 devices, the two shards' rows side by side.

  What the two processes do, without processes: shard k's rows fill rows
  k*B/2..(k+1)*B/2 of each global batch, in shard k's own order
  (`train.shard_epoch_plan`), every step as wide as the wider shard needs.
  Returns `(graphdef, state, per-epoch mean losses, mesh, rules)`.
  """

  mesh = sharding.make_mesh(2, 1)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  local_batch = config.batch_size // 2
  max_len, windows = config.data.max_len, config.data.train_windows
  parts = []
  for index in range(2):
    part = ds.shard(index, 2)
    inputs, targets = batching.train_arrays(part, max_len, windows)
    parts.append((inputs, targets,
                  batching.train_times(part, max_len, windows),
                  np.sum(targets > 0, axis=1)))
  steps = max(-(-len(p[0]) // local_batch) for p in parts)
  model = models.create(config.model, num_items=ds.num_items,
                        max_len=max_len, seed=config.seed)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.make_optimizer(config.optimizer, steps * config.num_epochs)
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  state_sharding = sharding.state_shardings(state, mesh, rules)
  state = jax.device_put(state, state_sharding)
  log_q = train.sampler_log_q(config.loss, batching.item_counts(ds))
  step_fn = jax.jit(train.make_train_step(graphdef, tx, config.loss, log_q),
                    donate_argnums=0,
                    out_shardings=(state_sharding, sharding.replicated(mesh)))
  rng = jax.random.key(config.seed)
  epoch_losses = []
  for epoch in range(config.num_epochs):
    plans = [train.shard_epoch_plan(p[3], local_batch, steps, epoch, config,
                                    index, 2)
             for index, p in enumerate(parts)]
    widths = np.max([w for _, w in plans], axis=0)
    losses = []
    for step in range(steps):
      # pylint: disable-next=protected-access
      halves = [train._train_batch(inputs, targets, times,
                                   plans[index][0][step], int(widths[step]),
                                   slice(None))
                for index, (inputs, targets, times, _) in enumerate(parts)]
      batch = jax.tree.map(lambda *x: np.concatenate(x), *halves)
      state, loss = step_fn(
          state, jax.device_put(batch, sharding.batch_sharding(mesh, rules)),
          rng)
      losses.append(loss)
    epoch_losses.append(float(np.mean(jax.device_get(losses))))
  return graphdef, state, epoch_losses, mesh, rules


def test_process_shards_train_like_one_process_emulating_the_shards(
    tmp_path):

  config = _shard_config(tmp_path)
  ds = data_lib.load(config.data)  # prepares it: the processes only read
  workdir = tmp_path / "shards"
  outputs = _run_two_processes(tmp_path, workdir, *_SHARD_FLAGS)
  for i, out in enumerate(outputs):
    assert f"process {i} of 2 holds shard {{'index': {i}, 'count': 2" in out, (
        out[-3000:])
  card = json.loads((workdir / "data_card.json").read_text())
  assert card["shard"]["index"] == 0 and card["shard"]["count"] == 2
  assert card["time_origin"] == int(ds.timestamps.min())

  graphdef, state, losses, mesh, rules = _emulate_two_shards(config, ds)
  rows, final = _records(workdir)
  got_losses = [r["train/loss"] for r in rows if "train/loss" in r]
  _assert_close(got_losses, losses, "train/loss")
  assert final["train/steps"] == int(state["step"])

  ckpts = checkpoint_lib.Checkpoints(str(workdir))
  try:
    saved, _ = ckpts.restore_latest(state)
  finally:
    ckpts.close()
  got = jax.tree_util.tree_leaves_with_path(saved["params"])
  want = jax.tree_util.tree_leaves(state["params"])
  for (path, x), y in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                               atol=1e-6, err_msg=jax.tree_util.keystr(path))

  # The sharded evaluation equals one process evaluating every user (the
  # only evaluation, at epoch 2, picked the last parameters as best).
  for split in ("valid", "test"):
    evaluator = Evaluator(
        ds, split, max_len=config.data.max_len,
        batch_size=config.eval.batch_size,
        filter_seen=config.eval.filter_seen,
        num_negatives=config.eval.num_negatives,
        negatives=config.eval.negatives, seed=config.eval.seed,
        with_times=True, mesh=mesh, rules=rules, process_shards=True,
        item_counts=batching.item_counts(ds))
    for key, want in evaluator(graphdef, state["params"]).items():
      _assert_close(final[key], want, key)

