r"""Issue 6's bar: one event -> updated top-100 over 10^6 items, latency.

One user at a time (no batching across users, the latency a single
request sees): `Engine.observe` of one event, then `Engine.recommend`
top-100 with the user's seen items excluded. SASRec, d=64, 2 blocks,
2 heads, max_len 200, `model.positions=left`, random weights (latency does
not depend on their values). Regimes:

  filling  the window holds 100-199 events: one position through the
           cached blocks (`incremental.append`);
  full     the window is full (a long-history user): the event re-encodes
           the 200-item window (what the model would compute anyway);
  nocache  `cache=none`: every event re-encodes the window (also how
           `positions=right` models are served).

and the catalogue scan `exact` (float32) or `int8` (int8 scan + float32
re-score of the best 200). Timings are wall clock per event (observe +
recommend, results on the host), after warm-up; the JSON holds every
percentile and the split between the two calls. `--repeats` runs every row
again: on this shared machine p99 drifts by a few ms from minute to minute.

  python experiments/007_serving/latency.py \
      --out=experiments/007_serving/latency_cpu.json
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from configs import base as base_config  # pylint: disable=g-import-not-at-top
from recattn import models
from recattn import reporting
from recattn.serving import engine as engine_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_items", 1_000_000, "catalogue size V")
flags.DEFINE_integer("dim", 64, "model dim")
flags.DEFINE_integer("blocks", 2, "blocks")
flags.DEFINE_integer("heads", 2, "heads")
flags.DEFINE_integer("max_len", 200, "window")
flags.DEFINE_integer("k", 100, "top-k")
flags.DEFINE_integer("events", 1000, "timed events per regime and scoring")
flags.DEFINE_integer("warmup", 50, "untimed events first")
flags.DEFINE_list("regimes", ["filling", "full", "nocache"], "regimes")
flags.DEFINE_list("scorings", ["exact", "int8"], "catalogue scans")
flags.DEFINE_string("attention", "scaled_dot", "attention variant")
flags.DEFINE_integer("repeats", 1, "runs of every row, one after another "
                     "(this machine's latency drifts by +-30% over minutes)")
flags.DEFINE_string("out", "", "results JSON ('' = print only)")


def _model():
  c = base_config.get_base_config().model
  c.attention = FLAGS.attention
  c.dim, c.num_blocks, c.num_heads = FLAGS.dim, FLAGS.blocks, FLAGS.heads
  c.positions = "left"
  c.l2_norm = True
  return models.create(c, num_items=FLAGS.num_items, max_len=FLAGS.max_len,
                       seed=0)


def _percentiles(x):
  x = np.asarray(x) * 1e3
  return {"p50_ms": float(np.percentile(x, 50)),
          "p90_ms": float(np.percentile(x, 90)),
          "p99_ms": float(np.percentile(x, 99)),
          "max_ms": float(x.max()), "mean_ms": float(x.mean())}


def run(engine, regime: str, rng) -> dict:
  w = engine.max_len
  history = rng.integers(1, engine.num_items + 1, size=2 * w)
  # filling: restart at 100 events whenever the window would fill.
  start_len = w // 2 if regime == "filling" else w
  state, = engine.start([history[:start_len]])
  length = start_len
  total, observe, recommend = [], [], []
  for i in range(FLAGS.warmup + FLAGS.events):
    if regime == "filling" and length >= w:
      state, = engine.start([history[:start_len]])
      length = start_len
    item = int(rng.integers(1, engine.num_items + 1))
    t0 = time.perf_counter()
    state, = engine.observe([state], [item], [10**9 + i])
    t1 = time.perf_counter()
    ids, _ = engine.recommend([state], FLAGS.k)
    t2 = time.perf_counter()
    assert ids.shape == (1, FLAGS.k)
    length += 1
    if i >= FLAGS.warmup:
      total.append(t2 - t0)
      observe.append(t1 - t0)
      recommend.append(t2 - t1)
  return {"total": _percentiles(total), "observe": _percentiles(observe),
          "recommend": _percentiles(recommend)}


def main(argv):
  del argv
  model = _model()
  ids = np.arange(1, FLAGS.num_items + 1)
  results = []
  for scoring in FLAGS.scorings:
    engines = {}
    for repeat in range(FLAGS.repeats):
      for regime in FLAGS.regimes:
        cache = "none" if regime == "nocache" else "kv"
        if cache not in engines:
          engines[cache] = engine_lib.Engine.from_model(
              model, max_len=FLAGS.max_len, original_item_ids=ids,
              cache=cache, scoring=scoring)
        row = {"regime": regime, "scoring": scoring, "repeat": repeat,
               **run(engines[cache], regime, np.random.default_rng(repeat))}
        print(json.dumps(row), flush=True)
        results.append(row)
  # How often the int8 scan returns the exact top-k (random weights and
  # histories: a sanity check, not a property of a trained model).
  recall = None
  if "int8" in FLAGS.scorings:
    rng = np.random.default_rng(1)
    histories = [rng.integers(1, FLAGS.num_items + 1, size=FLAGS.max_len)
                 for _ in range(64)]
    got = []
    for scoring in ("exact", "int8"):
      e = engine_lib.Engine.from_model(model, max_len=FLAGS.max_len,
                                       original_item_ids=ids,
                                       scoring=scoring)
      got.append(e.recommend(e.start(histories), FLAGS.k)[0])
    recall = float(np.mean([len(set(a) & set(b)) / FLAGS.k
                            for a, b in zip(*got)]))
    print(f"int8 top-{FLAGS.k} recall of the exact top-{FLAGS.k}: {recall}")
  report = {
      "setup": {"num_items": FLAGS.num_items, "dim": FLAGS.dim,
                "blocks": FLAGS.blocks, "heads": FLAGS.heads,
                "max_len": FLAGS.max_len, "k": FLAGS.k,
                "events": FLAGS.events, "attention": FLAGS.attention,
                "state_bytes_kv": engine_lib.Engine.from_model(
                    model, max_len=FLAGS.max_len, original_item_ids=ids,
                    cache="kv").state_bytes()},
      "int8_recall_at_k": recall,
      "env": reporting.environment(), "results": results,
      "date": time.strftime("%Y-%m-%d"),
      "command": "python experiments/007_serving/latency.py " + " ".join(
          sys.argv[1:]),
  }
  if FLAGS.out:
    reporting.write_json(FLAGS.out, report)


if __name__ == "__main__":
  app.run(main)
