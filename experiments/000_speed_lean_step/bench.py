"""recattn's training epoch against a lean hand-written JAX step, same run.

  python experiments/000_speed_lean_step/bench.py \
      --out=experiments/000_speed_lean_step/results.json

For each loss setting of `configs/sasrec_ml1m.py` (default: sampled softmax
with 128 shared negatives; `paper`: BCE with one negative) it times, in one
process on the same data (ML-1M, B=128, L=200, d=50, 2 blocks, 1 head):
  * `lean`: `lean_step.py`, fixed [128, 200] batches, plain shuffle;
  * `recattn_fixed`: the real trainer (`train_and_evaluate`) with length
    bucketing off, i.e. the same shapes as the lean step;
  * `recattn`: the real trainer as configured (length-bucketed batches).
Seconds per epoch are medians over `--epochs` timed epochs after one warm-up
epoch (which pays compilation). The trainer's times come from its own
`metrics.jsonl` (`train/epoch_s`, evaluation excluded).
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lean_step  # pylint: disable=g-import-not-at-top
from configs import sasrec_ml1m  # pylint: disable=g-import-not-at-top
from recattn import data as data_lib  # pylint: disable=g-import-not-at-top
from recattn import reporting  # pylint: disable=g-import-not-at-top
from recattn import train  # pylint: disable=g-import-not-at-top
from recattn.data import batching  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Timed epochs per setting.")
_SETTINGS = flags.DEFINE_list("settings", ["default", "paper"],
                              "configs/sasrec_ml1m.py args to time.")
_DIM = flags.DEFINE_integer("dim", 50, "Model dimension.")


def time_lean(config, ds, epochs: int) -> list[float]:
  inputs, targets = batching.train_arrays(ds, config.data.max_len)
  lengths = np.sum(targets > 0, 1)
  m = config.model
  params = lean_step.init_params(jax.random.key(0), ds.num_items,
                                 config.data.max_len, m.dim, m.num_blocks,
                                 m.dim)
  tx = optax.adam(config.optimizer.lr, b1=config.optimizer.b1,
                  b2=config.optimizer.b2)
  opt_state = tx.init(params)
  step = lean_step.make_step(
      tx, loss=config.loss.name, num_negatives=config.loss.num_negatives,
      temperature=config.loss.temperature, l2_norm=m.l2_norm,
      rate=m.dropout, num_heads=m.num_heads, num_items=ds.num_items)
  times = []
  for epoch in range(epochs + 1):
    t0 = time.time()
    losses = []
    for i, rows in enumerate(batching.epoch_batches(
        lengths, config.batch_size, epoch, 0)):
      params, opt_state, loss = step(
          params, opt_state, jnp.asarray(batching.take_rows(inputs, rows)),
          jnp.asarray(batching.take_rows(targets, rows)),
          jax.random.key(epoch * 100_000 + i))
      losses.append(loss)
    jax.block_until_ready(losses)
    times.append(time.time() - t0)
  return times[1:]


def time_recattn(config, epochs: int, bucketed: bool) -> list[float]:
  with config.unlocked():
    config.num_epochs = epochs + 1
    config.eval.every_epochs = epochs + 1
    config.progress = False
    if not bucketed:
      config.data.bucket_chunk = 0
      config.data.bucket_step = 0
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(l) for l in f]
  return [r["train/epoch_s"] for r in rows if "train/epoch_s" in r][1:]


def main(argv):
  del argv
  results = {"env": reporting.environment(), "command": " ".join(sys.argv),
             "settings": {}}
  for setting in _SETTINGS.value:
    config = sasrec_ml1m.get_config(None if setting == "default" else setting)
    with config.unlocked():
      config.model.dim = _DIM.value
    ds = data_lib.load(config.data)
    row = {"lean": time_lean(config, ds, _EPOCHS.value),
           "recattn_fixed": time_recattn(config.copy_and_resolve_references(),
                                         _EPOCHS.value, bucketed=False),
           "recattn": time_recattn(config.copy_and_resolve_references(),
                                   _EPOCHS.value, bucketed=True)}
    summary = {k + "_s_per_epoch": float(np.median(v)) for k, v in row.items()}
    summary["recattn_fixed_over_lean"] = (
        summary["recattn_fixed_s_per_epoch"] / summary["lean_s_per_epoch"])
    summary["recattn_over_lean"] = (
        summary["recattn_s_per_epoch"] / summary["lean_s_per_epoch"])
    results["settings"][setting] = {"epoch_seconds": row, **summary}
    print(setting, json.dumps(summary, indent=1), flush=True)
  if _OUT.value:
    reporting.write_json(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
