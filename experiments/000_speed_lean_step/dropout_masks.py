"""What dropout's random masks cost: threefry against recattn's counter hash.

  python experiments/000_speed_lean_step/dropout_masks.py \
      --out=experiments/000_speed_lean_step/dropout_masks_cpu.json

1. One `[128, 200, 50]` keep-mask (ML-1M's activations: B=128, L=200,
   d=50), milliseconds per mask, median of `--reps` jitted calls that each
   draw and apply six masks: `jax.random.bernoulli` (threefry, what
   `flax.nnx.Dropout` uses), `recattn.dropout.keep_mask` (hash), and no
   random numbers at all (a fixed mask: the floor).
2. The real trainer on ML-1M (`configs/sasrec_ml1m.py`, dropout 0.2; seconds
   per epoch, median of epochs after the first, no evaluation): with hash
   masks, with threefry masks (`recattn.dropout.keep_mask` swapped for
   `jax.random.bernoulli` in this process), and with dropout 0. The three
   trainings run interleaved `--rounds` times so that drifts in machine
   speed hit each alike.
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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from configs import sasrec_ml1m  # pylint: disable=g-import-not-at-top
from recattn import dropout  # pylint: disable=g-import-not-at-top
from recattn import reporting  # pylint: disable=g-import-not-at-top
from recattn import train  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_REPS = flags.DEFINE_integer("reps", 30, "Timed calls per mask kind.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Timed epochs per training.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Interleaved rounds of trainings.")

SHAPE = (128, 200, 50)
MASKS_PER_CALL = 6


def _threefry_mask(key, shape, keep_prob):
  return jax.random.bernoulli(key, keep_prob, shape)


def _fixed_mask(key, shape, keep_prob):
  del key, keep_prob
  return (jnp.arange(np.prod(shape)) % 5 != 0).reshape(shape)


def time_masks(mask_fn, reps: int) -> float:
  """Milliseconds per mask (drawn and applied), median over `reps` calls."""
  @jax.jit
  def f(key, x):
    out = x
    for i in range(MASKS_PER_CALL):
      m = mask_fn(jax.random.fold_in(key, i), x.shape, 0.8)
      out = jnp.where(m, out / 0.8, 0.0) + 1.0
    return out.sum()
  x = jnp.ones(SHAPE)
  f(jax.random.key(0), x).block_until_ready()
  times = []
  for r in range(reps):
    t0 = time.perf_counter()
    f(jax.random.key(r + 1), x).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 1000 * float(np.median(times)) / MASKS_PER_CALL


def time_training(masks: str, epochs: int) -> list[float]:
  config = sasrec_ml1m.get_config()
  config.num_epochs = epochs + 1
  config.eval.every_epochs = epochs + 1
  config.checkpoint.every_epochs = epochs + 1
  config.progress = False
  if masks == "none":
    config.model.dropout = 0.0
  original = dropout.keep_mask
  if masks == "threefry":
    dropout.keep_mask = _threefry_mask
  try:
    with tempfile.TemporaryDirectory() as workdir:
      train.train_and_evaluate(config, workdir)
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
  finally:
    dropout.keep_mask = original
  return [r["train/epoch_s"] for r in rows if "train/epoch_s" in r][1:]


def main(argv):
  del argv
  results = {"env": reporting.environment(), "command": " ".join(sys.argv),
             "mask_shape": list(SHAPE)}
  results["ms_per_mask"] = {
      name: time_masks(fn, _REPS.value) for name, fn in
      [("threefry", _threefry_mask), ("hash", dropout.keep_mask),
       ("fixed", _fixed_mask)]}
  print(json.dumps(results["ms_per_mask"], indent=1), flush=True)
  epochs = {"hash": [], "threefry": [], "none": []}
  for _ in range(_ROUNDS.value):
    for masks in epochs:
      epochs[masks] += time_training(masks, _EPOCHS.value)
      print(masks, epochs[masks], flush=True)
  results["train_epoch_s"] = epochs
  results["train_s_per_epoch"] = {k: float(np.median(v))
                                  for k, v in epochs.items()}
  print(json.dumps(results["train_s_per_epoch"], indent=1), flush=True)
  if _OUT.value:
    reporting.write_json(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
