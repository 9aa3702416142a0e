r"""Streaming evaluation: replay a timestamped log, recommend before each event.

  python -m recattn.serving.stream --workdir=<run trained with
      --config.data.stream_holdout=F> [--k=10,50] [--finetune_every=0]
      [--out=<json>]

Protocol. Training held out the newest fraction F of all interactions
(`data.stream_holdout`; `dataset.time_split`: global time order, ties in
data order). Every user starts the replay with the history it had before
them (`Engine.start`); then, in time order, each held-out event (u, i, t)
is first predicted — the top-K over the whole catalogue for u's current
state, seen items excluded as in the offline evaluation
(`eval.filter_seen`) — and then applied (`Engine.observe`). HR@K and
NDCG@K are averaged over all replayed events (full ranking, no sampled
candidates); events of users with no history get the popularity list
(counted apart as cold). Consecutive events of distinct users are
processed as one batch, which gives exactly the sequential result.

Re-ranking. `--rerank=N` (models trained with `model.rank_head`) also
re-orders each event's top-N by the ranking head's target-aware scores
(`Engine.score`: each candidate after the user's history, M-FALCON), as a
two-stage recommender would; metrics `stream/rerank<N>/...` for K <= N
count the target's place in the re-ordered list (a target outside the
top-N stays a miss).

Model updates. `--finetune_every=0` keeps the model frozen. N > 0 takes
`--finetune_steps` optimizer steps on the windows of the users seen in the
last N events (their histories up to now, the training loss and
optimizer settings of the run) after every N events, then rebuilds the
states of every user from its history (the parameters changed, so every
cache did).
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from recattn import reporting
from recattn.data import dataset as dataset_lib
from recattn.data import loading as data_lib
from recattn.serving import engine as engine_lib


def _ndcg(rank: np.ndarray) -> np.ndarray:
  return np.where(rank >= 0, 1.0 / np.log2(np.maximum(rank, 0) + 2.0), 0.0)


def _chunks(users: np.ndarray, max_size: int):
  """Consecutive runs of distinct users (at most `max_size` long)."""
  start, seen = 0, set()
  for i, u in enumerate(users.tolist()):
    if u in seen or i - start == max_size:
      yield start, i
      start, seen = i, set()
    seen.add(u)
  if start < len(users):
    yield start, len(users)


class _FineTuner:
  """A few optimizer steps on recent users' windows (the run's loss)."""

  def __init__(self, engine, config, steps: int, item_counts: np.ndarray):
    # pylint: disable=g-import-not-at-top
    from flax import nnx
    from recattn import optim
    from recattn import train
    # pylint: enable=g-import-not-at-top
    self.nnx = nnx
    graphdef, params = engine._model  # pylint: disable=protected-access
    self.graphdef, self.params = nnx.split(nnx.merge(graphdef, params),
                                           nnx.Param)
    self.rest = nnx.state(nnx.merge(graphdef, params), nnx.Not(nnx.Param))
    self.tx = optim.make_optimizer(config.optimizer, 1 << 30)
    self.opt_state = self.tx.init(self.params)
    self.step_fn = jax.jit(train.make_train_step(
        self.graphdef, self.tx, config.loss,
        train.sampler_log_q(config.loss, item_counts)))
    self.config, self.steps = config, steps
    self.rng = jax.random.key(config.seed + 1)
    self.count = 0

  def update(self, histories, times, users) -> None:
    """Trains on the windows ending at each of `users`' newest event."""
    w, b = self.config.data.max_len, self.config.batch_size
    users = np.asarray(users)
    for _ in range(self.steps):
      pick = users[np.random.default_rng(self.count).integers(
          0, len(users), size=b)]
      inputs = np.zeros((b, w), np.int32)
      targets = np.zeros((b, w), np.int32)
      ts = np.zeros((b, w), np.int32)
      for row, u in enumerate(pick):
        seq = np.asarray(histories[u], np.int32)[-(w + 1):]
        if len(seq) < 2:
          continue
        inputs[row, w - len(seq) + 1:] = seq[:-1]
        targets[row, w - len(seq) + 1:] = seq[1:]
        t = np.asarray(times[u], np.int64)[-(w + 1):-1]
        ts[row, w - len(t):] = t
      batch = {"inputs": inputs, "targets": targets}
      if "time" in self.config.model.get("rel_bias", "none"):
        batch["times"] = ts
      state = {"params": self.params, "opt_state": self.opt_state,
               "step": np.asarray(self.count, np.int32)}
      state, _ = self.step_fn(state, batch, self.rng)
      self.params, self.opt_state = state["params"], state["opt_state"]
      self.count += 1

  def apply(self, engine) -> None:
    """Puts the updated parameters (and item table) into `engine`."""
    model = self.nnx.merge(self.graphdef, self.params, self.rest)
    engine.params = self.nnx.state(model)
    engine.table = engine_lib.scoring_table(model.all_item_vectors(),
                                            engine.scoring)


def replay(engine, ds, events: dataset_lib.StreamEvents, *, ks=(10, 50),
           exclude_seen: bool = True, batch: int = 256,
           finetune_every: int = 0, finetuner=None, rerank: int = 0) -> dict:
  """Runs the protocol of the module docstring; returns the metrics."""
  k_max = max(max(ks), rerank)
  n = len(events.items)
  first = np.full(ds.num_users, np.iinfo(np.int64).max)
  np.minimum.at(first, events.users, events.index)
  lengths = ds.lengths()
  first = np.minimum(first, lengths)
  # Histories as python lists (extended as the replay goes).
  histories = [list(ds.sequence(u)[:first[u]]) for u in range(ds.num_users)]
  times = [list(ds.timestamps[ds.offsets[u]:ds.offsets[u] + first[u]])
           for u in range(ds.num_users)]
  states = engine.start(histories, times)
  rank = np.full(n, -1, np.int64)
  reranked = np.full(n, -1, np.int64)
  cold = np.zeros(n, bool)
  t0 = time.time()
  since_update, recent = 0, set()
  for lo, hi in _chunks(events.users, batch):
    users = events.users[lo:hi]
    mine = [states[u] for u in users]
    cold[lo:hi] = [int(s["count"]) == 0 for s in mine]
    ids, _ = engine.recommend(mine, k_max, exclude_seen=exclude_seen)
    hit = ids == events.items[lo:hi, None]
    rank[lo:hi] = np.where(hit.any(1), hit.argmax(1), -1)
    if rerank:
      top = ids[:, :rerank]
      scores = np.stack(engine.score(mine, list(top)))
      order = np.argsort(-scores, axis=1, kind="stable")
      hit = np.take_along_axis(top, order, 1) == events.items[lo:hi, None]
      reranked[lo:hi] = np.where(hit.any(1), hit.argmax(1), -1)
    new = engine.observe(mine, events.items[lo:hi], events.times[lo:hi])
    for u, s, item, t in zip(users, new, events.items[lo:hi],
                             events.times[lo:hi]):
      states[u] = s
      histories[u].append(int(item))
      times[u].append(int(t))
    recent.update(users.tolist())
    since_update += hi - lo
    if finetune_every and since_update >= finetune_every:
      finetuner.update(histories, times, sorted(recent))
      finetuner.apply(engine)
      states = engine.start(histories, times)
      since_update, recent = 0, set()
  seconds = time.time() - t0
  out = {"stream/events": n, "stream/cold_events": int(cold.sum()),
         "stream/users": int(len(np.unique(events.users))),
         "stream/seconds": seconds, "stream/events_per_s": n / seconds}
  for k in ks:
    inside = (rank >= 0) & (rank < k)
    out[f"stream/full/hr@{k}"] = float(inside.mean())
    out[f"stream/full/ndcg@{k}"] = float(np.where(inside, _ndcg(rank),
                                                  0).mean())
    if k <= rerank:
      inside = (reranked >= 0) & (reranked < k)
      out[f"stream/rerank{rerank}/hr@{k}"] = float(inside.mean())
      out[f"stream/rerank{rerank}/ndcg@{k}"] = float(
          np.where(inside, _ndcg(reranked), 0).mean())
      inside = (rank >= 0) & (rank < k)
    warm = ~cold
    if warm.any():
      out[f"stream/full_warm/hr@{k}"] = float(inside[warm].mean())
      out[f"stream/full_warm/ndcg@{k}"] = float(
          np.where(inside, _ndcg(rank), 0)[warm].mean())
  return out


def _define_flags():
  """Flags of the entry point (defined only when run as a program, so that
  importing this module next to other entry points cannot clash)."""
  global _WORKDIR, _KS, _RERANK, _FINETUNE_EVERY, _FINETUNE_STEPS, _BATCH, \
      _SCORING, _OUT
  _WORKDIR = flags.DEFINE_string("workdir", None, "A run trained with "
                                 "--config.data.stream_holdout=F.")
  _KS = flags.DEFINE_list("k", ["10", "50"], "Cut-offs K of HR@K / NDCG@K.")
  _FINETUNE_EVERY = flags.DEFINE_integer(
      "finetune_every", 0, "Fine-tune after every N events (0: frozen).")
  _FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 4,
                                         "Optimizer steps per fine-tune.")
  _BATCH = flags.DEFINE_integer("batch", 256, "Most events per engine call.")
  _RERANK = flags.DEFINE_integer(
      "rerank", 0, "Also re-order each event's top-N by the ranking head "
      "(models trained with model.rank_head); 0 = off.")
  _SCORING = flags.DEFINE_enum("scoring", "exact", ["exact", "int8"],
                               "Catalogue scan (serving.engine).")
  _OUT = flags.DEFINE_string("out", None, "Write the metrics (JSON) here; "
                             "default <workdir>/stream_metrics.json.")


def main(argv):
  del argv
  workdir = _WORKDIR.value
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  fraction = config["data"].get("stream_holdout", 0.0)
  if not fraction:
    raise app.UsageError(
        f"{workdir}: trained without data.stream_holdout, so every event "
        "was seen in training; retrain with --config.data.stream_holdout="
        "0.1 (for example)")
  engine = engine_lib.Engine.from_workdir(workdir, scoring=_SCORING.value)
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config)
  ds = data_lib.load(config.data)
  prefix, events = dataset_lib.time_split(ds, fraction)
  finetuner = None
  if _FINETUNE_EVERY.value:
    from recattn.data import batching  # pylint: disable=g-import-not-at-top
    finetuner = _FineTuner(engine, config, _FINETUNE_STEPS.value,
                           batching.item_counts(prefix))
  metrics = replay(engine, ds, events, ks=tuple(int(k) for k in _KS.value),
                   exclude_seen=config.eval.filter_seen, batch=_BATCH.value,
                   finetune_every=_FINETUNE_EVERY.value, finetuner=finetuner,
                   rerank=_RERANK.value)
  metrics.update({"stream/holdout": fraction,
                  "stream/finetune_every": _FINETUNE_EVERY.value,
                  "stream/finetune_steps": (_FINETUNE_STEPS.value if
                                            _FINETUNE_EVERY.value else 0)})
  logging.info("stream: %s", metrics)
  out = _OUT.value or os.path.join(workdir, "stream_metrics.json")
  reporting.write_json(out, {"metrics": metrics,
                             "env": reporting.environment(),
                             "protocol": __doc__.split("Protocol.")[1]
                             .split("Model updates.")[0].strip()})
  print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flag_as_required("workdir")
  app.run(main)
