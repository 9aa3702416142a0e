"""One trainer for every model: `train_and_evaluate(config, workdir)`.

The train step is a pure function of (state, batch, rng), jit-compiled over
a `(data, model)` mesh: batches split over `data`, the item table and its
Adam moments split by rows over `model` (`config.mesh.rules`), everything
else replicated. Validation picks the checkpoint; test is evaluated once, on
the selected checkpoint, at the end.
"""

import contextlib
import dataclasses
import itertools
import math
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recattn import attention
from recattn import checkpoint as checkpoint_lib
from recattn import config_check
from recattn import data as data_lib
from recattn import distributed
from recattn import interrupt
from recattn import losses
from recattn import models
from recattn import optim
from recattn import reporting
from recattn import runlock
from recattn import sharding
from recattn.data import batching
from recattn.data import dataset as dataset_lib
from recattn.models import base as models_base
from recattn.evaluation import Evaluator
from recattn.serving import incremental


class NonFiniteLossError(RuntimeError):
  pass


def sampler_log_q(loss_config, item_counts: np.ndarray) -> jax.Array:
  """`[V + 1]` log-probabilities of the training negative sampler."""
  if loss_config.sampling == "popularity":
    probs = item_counts.astype(np.float64)
  else:
    probs = np.ones_like(item_counts, np.float64)
  probs[0] = 0.0
  with np.errstate(divide="ignore"):
    return jnp.asarray(np.log(probs / probs.sum()), jnp.float32)


def make_train_step(graphdef, tx, loss_config, log_q):
  """Returns `train_step(state, batch, rng) -> (state, loss)`."""
  loss_fn = losses.LOSSES[loss_config.name]

  rank_weight = loss_config.get("rank_weight", 0.0)

  def train_step(state, batch, rng):
    rng = jax.random.fold_in(rng, state["step"])
    dropout_rng, negatives_rng = jax.random.split(rng)
    rank_rng = jax.random.fold_in(negatives_rng, 1)

    def loss(params):
      model = nnx.merge(graphdef, params)
      rngs = nnx.Rngs(dropout=dropout_rng)
      if not rank_weight:
        kwargs = {k: batch[k] for k in ("times", "query_times") if k in batch}
        # Targets narrower than the window (data.train_windows="prefixes")
        # score its last positions only; the final block computes just those.
        h = model.encode(batch["inputs"], rngs=rngs,
                         last=batch["targets"].shape[1], **kwargs)
        return loss_fn(model, h, batch["targets"], negatives_rng,
                       loss_config, log_q)
      # The ranking head's candidates attend to this pass's keys/values.
      h, cache = incremental.encode_recording(
          model, batch["inputs"], batch.get("times"), rngs=rngs)
      value = loss_fn(model, h, batch["targets"], negatives_rng, loss_config,
                      log_q)
      return value + rank_weight * losses.target_rank_loss(
          model, cache, batch["inputs"], batch["targets"], batch.get("times"),
          rank_rng, loss_config, rngs=rngs)

    value, grads = jax.value_and_grad(loss)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state,
            "step": state["step"] + 1}, value

  return train_step


def step_peak_bytes(step_fn, state, example_batch, rng) -> int | None:
  """XLA's estimate of the train step's peak memory for this batch shape.

  Arguments + outputs - donated aliases + temporaries of the compiled step;
  None where the backend gives no memory analysis.
  """
  spec = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      example_batch)
  analysis = step_fn.lower(state, spec, rng).compile().memory_analysis()
  if analysis is None:
    return None
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)


def _num_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


class _NoWriter:
  """MetricWriter stand-in for processes other than 0: records once."""

  def write(self, step, scalars):
    del step, scalars

  def close(self):
    pass


def _load_data(data_config, shard=None):
  """`data_lib.load`, process 0 first: it prepares what others then read."""
  if not distributed.is_primary():
    distributed.barrier("data prepared")
  ds = (data_lib.load(data_config) if shard is None
        else data_lib.load(data_config, shard=shard))
  if distributed.is_primary():
    distributed.barrier("data prepared")
  return ds


def _with_global_time_origin(ds):
  """A shard, its relative times counted from the whole dataset's start.

  `batching.train_times` subtracts the first timestamp; a shard read on its
  own would use its own first one. Attention biases see only differences,
  but padded positions hold 0, whose difference to a real time depends on
  the origin: the processes agree on the smallest first timestamp.
  """
  if ds.timestamps is None:
    return ds
  first = (ds.timestamps.min() if len(ds.timestamps)
           else np.iinfo(np.int64).max)
  origin = int(distributed.host_allgather(np.int64(first)).min())
  return dataclasses.replace(ds, card={**ds.card, "time_origin": origin})


def shard_epoch_plan(lengths, local_batch: int, num_batches: int, epoch: int,
                     config, shard: int, num_shards: int):
  """One shard's batches of an epoch and the windows it alone would need.

  Returns `(rows [num_batches, local_batch], widths [num_batches])`: row
  indices into the shard's training rows (-1: an empty row) and
  `batching.window_length` of each. The processes take the maximum of all
  shards' widths per step (`host_allgather`), so every step has one global
  shape; shards with fewer rows end with empty batches.
  """
  rows = np.stack(list(batching.epoch_batches(
      lengths, local_batch, epoch, config.seed, config.data.bucket_chunk,
      shard=shard, num_shards=num_shards, num_batches=num_batches)))
  widths = np.array([
      batching.window_length(lengths[r[r >= 0]], config.data.max_len,
                             config.data.bucket_step) for r in rows])
  return rows, widths


def _train_batch(inputs, targets, times, rows, width, local,
                 query_times=None):
  """This process's rows `rows[local]` of a batch, last `width` steps."""
  rows = rows[local]
  batch = {"inputs": batching.take_rows(inputs, rows)[:, -width:],
           "targets": batching.take_rows(targets, rows)[:, -width:]}
  if times is not None:
    batch["times"] = batching.take_rows(times, rows)[:, -width:]
  if query_times is not None:
    batch["query_times"] = batching.take_rows(query_times, rows)[:, -width:]
  return batch


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains, selects on validation, tests the selected checkpoint.

  Returns the flat dict also written to `<workdir>/final_metrics.json`.
  Rerun with the same workdir, it resumes from `<workdir>/ckpt/latest`.

  Raises:
    runlock.Busy: another process is training this workdir.
    interrupt.Interrupted: SIGTERM or SIGINT came during training (from the
      main thread's point of view); the state after the current step is
      saved in `ckpt/latest` (`recattn.interrupt`). A signal while the
      selected checkpoint is tested is ignored: the run finishes.
  """
  config_check.validate(config)
  with contextlib.ExitStack() as stack:
    # Process 0 writes the records: it holds the workdir against a second
    # training of it (runlock.Busy).
    if distributed.is_primary():
      stack.enter_context(runlock.hold(workdir))
    stopper = stack.enter_context(interrupt.StopRequest())
    return _train_and_evaluate(config, workdir, stopper)


def _train_and_evaluate(config, workdir: str, stopper) -> dict[str, float]:
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  # Several processes (jax.distributed) share the workdir: process 0 writes
  # the records, all of them take part in checkpoints.
  primary = distributed.is_primary()
  if primary:
    reporting.write_json(os.path.join(workdir, "config.json"),
                         config.to_dict())
    reporting.write_env(os.path.join(workdir, "env.json"))

  # data.process_shards: this process reads, holds and batches only the
  # users u % P == p (SequenceDataset.shard); the few numbers the processes
  # must share (steps, windows, item counts) go through host_allgather.
  shards = bool(config.data.get("process_shards", False))
  shard = (jax.process_index(), jax.process_count()) if shards else None
  ds = _load_data(config.data, shard)
  holdout = config.data.get("stream_holdout", 0.0)
  if holdout:
    # The newest interactions are kept out of training and evaluation for
    # a streaming replay (recattn.serving.stream).
    if shards:
      raise config_check.ConfigError(
          "config.data.stream_holdout needs every user's events in one "
          "process (a global time order); use data.process_shards=False")
    ds, _ = dataset_lib.time_split(ds, holdout)
  if shards:
    ds = _with_global_time_origin(ds)
  # data.train_on_valid: the validation item is trained on too (only the
  # test item is held out), so nothing can be selected on validation.
  train_holdout = 1 if config.data.get("train_on_valid", False) else 2
  counts = batching.item_counts(ds, train_holdout)
  if shards:  # the whole dataset's, for samplers and logQ
    counts = distributed.host_allgather(counts).sum(0)
  if primary:
    reporting.write_json(os.path.join(workdir, "data_card.json"), ds.card)
  logging.info("data: %s", ds.card)
  inputs, targets = batching.train_arrays(ds, config.data.max_len,
                                          config.data.train_windows,
                                          train_holdout)
  lengths = np.sum(inputs > 0, axis=1)  # history items per row
  with_times = models_base.uses_time(config.model.get("rel_bias", "none"))
  if with_times and ds.timestamps is None:
    raise config_check.ConfigError(
        f"config.model.rel_bias={config.model.rel_bias!r} needs timestamps, "
        f"but data.name={config.data.name!r} has none; use a dataset with "
        "timestamps (ml-1m, ml-100k, ml-20m, ml-1m-partial, synthetic) or "
        "rel_bias 'none' | 'position' | 'alibi'")
  times = (batching.train_times(ds, config.data.max_len,
                                config.data.train_windows, train_holdout)
           if with_times else None)
  time_query = config.model.get("time_query", "own")
  # model.time_query="next": queries measure intervals from their target's
  # time (see recattn.models.base.TIME_QUERIES).
  query_times = (batching.train_times(ds, config.data.max_len,
                                      config.data.train_windows,
                                      train_holdout, shift=1)
                 if with_times and time_query == "next" else None)

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
  rules = tuple(tuple(rule) for rule in config.mesh.rules)
  logging.info("mesh: %s", dict(mesh.shape))
  if jax.process_count() > 1 and mesh.size != jax.device_count():
    raise config_check.ConfigError(
        f"config.mesh.data * config.mesh.model = {mesh.size}, but a "
        f"{jax.process_count()}-process run must use all "
        f"{jax.device_count()} devices (every process holds part of the "
        "mesh); use -1 for one of the two")
  n_dev = sharding.axis_size(mesh, "batch", rules)
  for field, size in (("batch_size", config.batch_size),
                      ("eval.batch_size", config.eval.batch_size)):
    if size % n_dev:
      raise config_check.ConfigError(
          f"config.{field}={size} must be a multiple of the {n_dev} devices "
          "on the data axis")
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = sharding.replicated(mesh)
  # Every process walks the same global batches (same seed) and builds only
  # the rows its devices hold; with process shards, from its own users.
  local = distributed.local_rows(batch_sharding, config.batch_size)
  logging.info("process %d of %d builds batch rows %d:%d of %d",
               jax.process_index(), jax.process_count(), local.start,
               local.stop, config.batch_size)
  local_batch = local.stop - local.start
  if shards:
    if local_batch * jax.process_count() != config.batch_size:
      raise config_check.ConfigError(
          f"config.data.process_shards=True needs each process to hold its "
          f"own 1/{jax.process_count()} of the batch rows; process "
          f"{jax.process_index()} holds {local.start}:{local.stop} of "
          f"{config.batch_size} (a mesh axis that replicates batches spans "
          "processes): use process_shards=False")
    # Every process runs as many steps as the shard with the most rows.
    row_counts = distributed.host_allgather(len(inputs))
    steps_per_epoch = max(1, math.ceil(row_counts.max() / local_batch))
    logging.info("process %d of %d holds shard %s: %d training rows (all "
                 "shards %s), %d steps per epoch", jax.process_index(),
                 jax.process_count(), ds.card["shard"], len(inputs),
                 row_counts.tolist(), steps_per_epoch)
  else:
    steps_per_epoch = math.ceil(len(inputs) / config.batch_size)

  model = models.create_for_data(config, ds, seed=config.seed)
  item_shards = sharding.axis_size(mesh, "items", rules)
  pad_rows = model.pad_item_rows(item_shards)
  if pad_rows:
    logging.info(
        "item table padded from %d to %d rows to divide over the %d "
        "devices of its mesh axis (padded rows are never scored)",
        ds.num_items + 1, ds.num_items + 1 + pad_rows, item_shards)
  graphdef, params = nnx.split(model, nnx.Param)
  total_steps = steps_per_epoch * config.num_epochs
  tx = optim.make_optimizer(config.optimizer, total_steps)
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  state_sharding = sharding.state_shardings(state, mesh, rules)
  state = jax.device_put(state, state_sharding)
  log_q = sampler_log_q(config.loss, counts)
  # Output shardings pinned to the input ones: the donated state keeps its
  # layout step after step, whatever XLA would propagate.
  step_fn = jax.jit(make_train_step(graphdef, tx, config.loss, log_q),
                    donate_argnums=0,
                    out_shardings=(state_sharding, replicated),
                    compiler_options=attention.compiler_options(
                        config.model.attention))
  base_rng = jax.random.key(config.seed)

  eval_kwargs = dict(
      max_len=config.data.max_len, batch_size=config.eval.batch_size,
      filter_seen=config.eval.filter_seen,
      num_negatives=config.eval.num_negatives,
      negatives=config.eval.negatives, seed=config.eval.seed,
      with_times=with_times, time_query=time_query, mesh=mesh, rules=rules,
      process_shards=shards, item_counts=counts if shards else None,
      rank_head=config.model.get("rank_head", False))
  valid_eval = Evaluator(ds, "valid", **eval_kwargs)

  ckpts = checkpoint_lib.Checkpoints(workdir)
  meta = {"epoch": 0, "best": -math.inf, "best_epoch": 0, "bad_evals": 0,
          "train_seconds": 0.0, "epoch_seconds": []}
  restored = ckpts.restore_latest(state)
  if restored is not None:
    state, meta = restored
    state = jax.device_put(state, state_sharding)
  # A run stopped mid-epoch saved the steps, losses and seconds of its
  # unfinished epoch; that epoch goes on from the next batch of its
  # (seed, epoch)-determined order.
  partial = {"steps": meta.pop("epoch_steps", 0),
             "losses": meta.pop("epoch_losses", []),
             "seconds": meta.pop("epoch_partial_s", 0.0)}
  if restored is not None:
    logging.info("resumed from epoch %d (step %d)%s", meta["epoch"],
                 int(state["step"]),
                 f" and {partial['steps']} steps of epoch {meta['epoch'] + 1}"
                 if partial["steps"] else "")
  writer = (reporting.MetricWriter(workdir, resume_step=int(state["step"]))
            if primary else _NoWriter())
  progress = reporting.Progress(total_steps, int(state["step"]),
                                enabled=primary and config.get("progress",
                                                               True))
  select = config.eval.select_metric

  epoch = meta["epoch"]
  # One process checks for a stop after every step; several agree on it
  # once an epoch (a collective), so that all of them save the same step.
  one_process = jax.process_count() == 1
  try:
    if stopper.requested and one_process:  # during data loading
      raise interrupt.Interrupted(f"{stopper.reason}: stopped before "
                                  "training; rerun the same command")
    while epoch < config.num_epochs:
      t0 = time.time() - partial["seconds"]
      # float32 as the step returns them: the epoch's mean is the same
      epoch_losses = [np.float32(x) for x in partial["losses"]]
      skip = partial["steps"]
      partial = {"steps": 0, "losses": [], "seconds": 0.0}
      if shards:
        shard_rows, widths = shard_epoch_plan(
            lengths, local_batch, steps_per_epoch, epoch, config, *shard)
        # One collective per epoch: each step's window is the widest any
        # shard needs, so every process builds the same global shape.
        widths = distributed.host_allgather(widths).max(0)
        plan, mine = zip(shard_rows, widths), slice(None)
      else:
        plan = ((rows, batching.window_length(
            lengths[rows[rows >= 0]], config.data.max_len,
            config.data.bucket_step))
                for rows in batching.epoch_batches(
                    lengths, config.batch_size, epoch, config.seed,
                    config.data.bucket_chunk))
        mine = local
      for rows, width in itertools.islice(plan, skip, None):
        batch = distributed.place(
            _train_batch(inputs, targets, times, rows, int(width), mine,
                         query_times),
            batch_sharding, config.batch_size)
        state, loss = step_fn(state, batch, base_rng)
        epoch_losses.append(loss)
        done = len(epoch_losses)
        progress.update(epoch * steps_per_epoch + done, f"epoch {epoch + 1}")
        if stopper.requested and one_process and done < steps_per_epoch:
          losses_so_far = [float(x) for x in jax.device_get(epoch_losses)]
          ckpts.save_latest(epoch * steps_per_epoch + done, state, dict(
              meta, epoch_steps=done, epoch_losses=losses_so_far,
              epoch_partial_s=time.time() - t0))
          raise interrupt.Interrupted(
              f"{stopper.reason}: stopped after step {done} of "
              f"{steps_per_epoch} of epoch {epoch + 1}, saved in "
              f"{workdir}/ckpt/latest; rerun the same command to resume")
      epoch_losses = np.asarray(jax.device_get(epoch_losses))
      seconds = time.time() - t0
      epoch += 1
      step = epoch * steps_per_epoch
      if not np.all(np.isfinite(epoch_losses)):
        first = step - steps_per_epoch + int(
            np.argmin(np.isfinite(epoch_losses)))
        raise NonFiniteLossError(
            f"non-finite training loss at step {first} (epoch {epoch}, steps "
            f"{step - steps_per_epoch + 1}..{step}); try a lower "
            f"config.optimizer.lr (now {config.optimizer.lr}) or "
            "config.optimizer.clip_norm")
      meta["epoch"] = epoch
      meta["train_seconds"] += seconds
      meta["epoch_seconds"] = meta["epoch_seconds"] + [seconds]
      scalars = {"train/loss": float(epoch_losses.mean()),
                 "train/epoch": epoch, "train/epoch_s": seconds}
      stop = False
      if select != "none" and (epoch % config.eval.every_epochs == 0 or
                               epoch == config.num_epochs):
        scalars.update(valid_eval(graphdef, optim.averaged_params(state)))
        if scalars[select] > meta["best"]:
          meta.update(best=scalars[select], best_epoch=epoch, bad_evals=0)
          ckpts.save_best(step, state, meta)
        else:
          meta["bad_evals"] += 1
          stop = 0 < config.eval.patience <= meta["bad_evals"]
        progress.update(step, f"{select}={scalars[select]:.4f} "
                        f"(best {meta['best']:.4f} @ {meta['best_epoch']})",
                        force=True)
      writer.write(step, scalars)
      halt = bool(stopper.requested)
      if not one_process:
        halt = bool(distributed.host_allgather(np.int32(halt)).max())
      if halt or stop or epoch % config.checkpoint.every_epochs == 0 or (
          epoch == config.num_epochs):
        ckpts.save_latest(step, state, meta)
      if halt and not stop and epoch < config.num_epochs:
        raise interrupt.Interrupted(
            f"{stopper.reason}: stopped after epoch {epoch}, saved in "
            f"{workdir}/ckpt/latest; rerun the same command to resume")
      if stop:
        logging.info("early stop at epoch %d: %s did not improve for %d "
                     "evaluations", epoch, select, meta["bad_evals"])
        break
    progress.close()

    if select == "none":  # no selection: the last epoch is tested
      best_state, best_meta = state, dict(meta, best_epoch=meta["epoch"])
    else:
      best_state, best_meta = ckpts.restore_best(state)
    best_params = jax.device_put(optim.averaged_params(best_state),
                                 state_sharding["params"])
    test_eval = Evaluator(ds, "test", **eval_kwargs)
    final = {}
    if train_holdout == 2:  # else validation items were trained on
      final.update(valid_eval(graphdef, best_params))
    final.update(test_eval(graphdef, best_params))
    epoch_seconds = meta["epoch_seconds"]
    widest = np.arange(local_batch if shards else config.batch_size)
    widest[widest >= len(inputs)] = -1  # padding rows, as in epoch_batches
    widest_batch = distributed.place(
        _train_batch(inputs, targets, times, widest, config.data.max_len,
                     slice(None) if shards else local, query_times),
        batch_sharding,
        config.batch_size)
    peak = step_peak_bytes(step_fn, state, widest_batch, base_rng)
    final.update({
        "train/epochs": meta["epoch"],
        "train/best_epoch": best_meta["best_epoch"],
        "train/steps": int(state["step"]),
        "train/wall_s": time.time() - t_start,
        "train/train_s": meta["train_seconds"],
        # The first epoch includes compilation; the median is the steady
        # state. Both are recorded.
        "train/s_per_epoch": float(np.median(epoch_seconds)),
        "train/first_epoch_s": epoch_seconds[0],
        # Rows padded for sharding are not parameters of the model.
        "train/num_params": (_num_params(best_params) -
                             pad_rows * config.model.dim),
    })
    if peak is not None:
      # Compiled estimate for a full-width [batch, max_len] training step.
      final["train/peak_bytes"] = peak
    writer.write(int(state["step"]), {k: v for k, v in final.items()
                                      if k.startswith("test/")})
    if primary:
      reporting.write_json(os.path.join(workdir, "final_metrics.json"),
                           final)
    logging.info("final: %s", {k: v for k, v in final.items()
                               if k.endswith("@10") or k.startswith("train/")})
    return final
  finally:
    writer.close()
    ckpts.close()
