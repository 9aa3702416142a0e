"""Final block on the scored positions only: `encode(last=n)` on and off.

  python experiments/000_speed_lean_step/last_queries.py \
      --out=experiments/000_speed_lean_step/last_queries_cpu.json

Per-prefix training rows (`data.train_windows=prefixes`) score one position
per row, and evaluation and serving score the last position of each window.
`SequenceRecommender.encode(items, last=n)` runs the final block's queries,
feed-forward and output on those n positions only (keys and values still
come from every position); before, the whole window went through every
block and the output was sliced. Timed in one process, "on" against "off"
(`encode` patched to compute every position and slice, the former path),
interleaved so that drifts in machine speed hit both alike:

1. `steps`: one training step (forward, backward, Adam) of the Beauty
   per-prefix setting (`configs/sasrec_beauty.py`, exact softmax,
   `data.train_windows=prefixes`, batch 256) at fixed window widths
   (`--widths`; rows of random lengths up to the width), median of
   `--reps` after a compiling call.
2. `eval_forward`: the evaluator's forward, `encode(...)[:, -1]` with and
   without `last=1`, for ML-1M SASRec and HSTU-large (`configs/
   sasrec_ml1m.py`, `configs/hstu_ml1m.py:large`) at [256, 200].
3. `epochs`: Beauty per-prefix epochs through the real trainer (seconds per
   epoch after the first, no evaluation), on and off, `--rounds` rounds.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import bench  # pylint: disable=g-import-not-at-top
from configs import hstu_ml1m  # pylint: disable=g-import-not-at-top
from configs import sasrec_beauty  # pylint: disable=g-import-not-at-top
from configs import sasrec_ml1m  # pylint: disable=g-import-not-at-top
from recattn import models  # pylint: disable=g-import-not-at-top
from recattn import optim  # pylint: disable=g-import-not-at-top
from recattn import reporting  # pylint: disable=g-import-not-at-top
from recattn import train  # pylint: disable=g-import-not-at-top
from recattn.models import base  # pylint: disable=g-import-not-at-top

# --out, --epochs: bench.py's.
_REPS = flags.DEFINE_integer("reps", 30, "Timed calls per step setting.")
_WIDTHS = flags.DEFINE_list("widths", ["10", "20", "50"],
                            "Window widths of the timed training steps.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Interleaved rounds of trainings.")

BEAUTY_ITEMS, ML1M_ITEMS = 12101, 3706
_ENCODE = base.SequenceRecommender.encode


def _encode_every_position(self, items, *, last=None, **kwargs):
  """The former path: every position through every block, then a slice."""
  h = _ENCODE(self, items, **kwargs)
  return h if last is None else h[:, -last:]


class _Path:
  """`with _Path(on):` selects the path `encode` takes in this process."""

  def __init__(self, on: bool):
    self.on = on

  def __enter__(self):
    if not self.on:
      base.SequenceRecommender.encode = _encode_every_position

  def __exit__(self, *exc):
    base.SequenceRecommender.encode = _ENCODE


def _beauty_prefix_config():
  config = sasrec_beauty.get_config()
  config.loss.name = "softmax"
  config.data.train_windows = "prefixes"
  return config


def _median_ms(fn, args, reps: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1000 * float(np.median(times))


def _left_padded(rng, rows: int, width: int, num_items: int) -> jax.Array:
  lengths = rng.integers(1, width + 1, rows)
  items = np.zeros((rows, width), np.int32)
  for i, n in enumerate(lengths):
    items[i, width - n:] = rng.integers(1, num_items + 1, n)
  return jnp.asarray(items)


def time_step(on: bool, width: int, reps: int) -> float:
  """Milliseconds per Beauty per-prefix training step at this width."""
  config = _beauty_prefix_config()
  with _Path(on):
    model = models.create(config.model, num_items=BEAUTY_ITEMS,
                          max_len=config.data.max_len, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optim.make_optimizer(config.optimizer, 1000)
    state = {"params": params, "opt_state": tx.init(params),
             "step": jnp.zeros((), jnp.int32)}
    step = jax.jit(train.make_train_step(graphdef, tx, config.loss, None))
    rng = np.random.default_rng(width)
    batch = {"inputs": _left_padded(rng, config.batch_size, width,
                                    BEAUTY_ITEMS),
             "targets": jnp.asarray(rng.integers(
                 1, BEAUTY_ITEMS + 1, (config.batch_size, 1)), jnp.int32)}
    return _median_ms(lambda: step(state, batch, jax.random.key(0))[1], (),
                      reps)


def time_eval_forward(on: bool, config, reps: int) -> float:
  """Milliseconds per `encode(...)[:, -1]` of a [256, max_len] batch."""
  with _Path(on):
    model = models.create(config.model, num_items=ML1M_ITEMS,
                          max_len=config.data.max_len, seed=0)
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, items):
      return nnx.merge(graphdef, params).encode(items, last=1)[:, -1]

    items = _left_padded(np.random.default_rng(0), 256,
                         config.data.max_len, ML1M_ITEMS)
    return _median_ms(forward, (params, items), reps)


def time_training(on: bool, epochs: int) -> list[float]:
  with _Path(on):
    return bench.time_recattn(_beauty_prefix_config(), epochs, bucketed=True)


def main(argv):
  del argv
  results = {"env": reporting.environment(), "command": " ".join(sys.argv)}
  steps = {}
  for width in map(int, _WIDTHS.value):
    steps[width] = {name: time_step(on, width, _REPS.value)
                    for name, on in (("off", False), ("on", True))}
    print("step ms", width, steps[width], flush=True)
  results["steps_ms"] = steps
  forward = {}
  for name, config in (("sasrec_ml1m", sasrec_ml1m.get_config()),
                       ("hstu_ml1m_large", hstu_ml1m.get_config("large"))):
    forward[name] = {k: time_eval_forward(on, config, _REPS.value)
                     for k, on in (("off", False), ("on", True))}
    print("eval forward ms", name, forward[name], flush=True)
  results["eval_forward_ms"] = forward
  epochs_per_training = bench._EPOCHS.value  # pylint: disable=protected-access
  epochs = {"off": [], "on": []}
  for _ in range(_ROUNDS.value):
    for name, on in (("off", False), ("on", True)):
      epochs[name] += time_training(on, epochs_per_training)
      print(name, epochs[name], flush=True)
  results["train_epoch_s"] = epochs
  results["train_s_per_epoch"] = {k: float(np.median(v))
                                  for k, v in epochs.items()}
  print(json.dumps(results["train_s_per_epoch"], indent=1), flush=True)
  out = bench._OUT.value  # pylint: disable=protected-access
  if out:
    reporting.write_json(out, results)


if __name__ == "__main__":
  app.run(main)
