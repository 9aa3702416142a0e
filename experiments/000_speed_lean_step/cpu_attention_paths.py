"""Two XLA:CPU attention paths, each timed on and off in the same run.

  python experiments/000_speed_lean_step/cpu_attention_paths.py \
      --out=experiments/000_speed_lean_step/cpu_attention_paths_cpu.json

1. Causal row blocks: off the GPU, `scaled_dot`/`dot` and `hstu` compute
   attention one block of query rows at a time over the keys those rows can
   see (`recattn.attention.masks.causal_row_blocks`); "off" sets
   `masks.MAX_ROW_BLOCKS = 1` (the whole score matrix, as before). Timed as
   * `steps`: one training step (forward, backward, Adam) of each config at
     fixed [B, L] batches, L in `--lengths` (the lengths the ML-1M trainer's
     buckets produce), median of `--reps` after a compiling call;
   * `epochs`: ML-1M epochs of `configs/sasrec_ml1m.py` through the real
     trainer (`bench.time_recattn`, length-bucketed), median of 2 x
     `--epochs` after a warm-up epoch per run (`--epochs=0` skips it).
2. `bias_grad`: the gradient of a relative bias shared by the batch,
   `[1, H, L, L]` added to `[B, H, L, L]` logits, with a plain `+` (XLA
   reduces the cotangent over the batch axis) and with `biases.add` (a dot
   with ones), median of `--reps`.
On and off are interleaved, so both see the same machine.
"""

import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import bench  # pylint: disable=g-import-not-at-top
from configs import sasrec_ml1m  # pylint: disable=g-import-not-at-top
from recattn import models  # pylint: disable=g-import-not-at-top
from recattn import reporting  # pylint: disable=g-import-not-at-top
from recattn import sweep  # pylint: disable=g-import-not-at-top
from recattn import train  # pylint: disable=g-import-not-at-top
from recattn.attention import biases  # pylint: disable=g-import-not-at-top
from recattn.attention import masks  # pylint: disable=g-import-not-at-top

# --out and --epochs are bench.py's flags (importing it defines them).
_OUT = bench._OUT  # pylint: disable=protected-access
_EPOCHS = bench._EPOCHS  # pylint: disable=protected-access
_CONFIGS = flags.DEFINE_list(
    "configs", ["configs/sasrec_ml1m.py", "configs/hstu_ml1m.py:large"],
    "Configs whose train step is timed.")
_LENGTHS = flags.DEFINE_list("lengths", ["50", "100", "150", "200"],
                             "Window lengths L of the timed steps.")
_BATCH = flags.DEFINE_integer("batch", 128, "Users per step.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed steps per setting.")
_NUM_ITEMS = 3706  # ML-1M


class _RowBlocks:
  """`with _RowBlocks(on):` traces attention with or without row blocks."""

  def __init__(self, on: bool):
    self.on = on

  def __enter__(self):
    self.saved = masks.MAX_ROW_BLOCKS
    if not self.on:
      masks.MAX_ROW_BLOCKS = 1

  def __exit__(self, *exc):
    masks.MAX_ROW_BLOCKS = self.saved


def _step(config_name: str, length: int, on: bool):
  """A compiled train step and its arguments at [batch, length]."""
  c = sweep.build_config(config_name)
  model = models.create(c.model, num_items=_NUM_ITEMS,
                        max_len=c.data.max_len, seed=0)
  graphdef, params = nnx.split(model)
  tx = optax.adam(c.optimizer.lr)
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.integers(1, _NUM_ITEMS + 1,
                                    (_BATCH.value, length)), jnp.int32)
  batch = {"inputs": inputs, "targets": jnp.roll(inputs, -1, axis=1)}
  with _RowBlocks(on):
    step = jax.jit(train.make_train_step(graphdef, tx, c.loss,
                                         jnp.zeros(_NUM_ITEMS + 1)))
    compiled = step.lower(state, batch, jax.random.key(0)).compile()
  return compiled, (state, batch, jax.random.key(0))


def _time(fn, args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def time_steps() -> dict:
  out = {}
  for config_name in _CONFIGS.value:
    for length in map(int, _LENGTHS.value):
      steps = {on: _step(config_name, length, on) for on in (True, False)}
      for fn, args in steps.values():
        _time(fn, args)  # first call
      times = {True: [], False: []}
      for _ in range(_REPS.value):
        for on, (fn, args) in steps.items():
          times[on].append(_time(fn, args))
      row = {"on_s": float(np.median(times[True])),
             "off_s": float(np.median(times[False])),
             "on_times": times[True], "off_times": times[False]}
      row["on_over_off"] = row["on_s"] / row["off_s"]
      out[f"{config_name} L={length}"] = row
      print(config_name, length, {k: round(v, 4) for k, v in row.items()
                                  if not k.endswith("times")}, flush=True)
  return out


def time_bias_grad() -> dict:
  out = {}
  rng = np.random.default_rng(0)
  for length in map(int, _LENGTHS.value):
    shape = (_BATCH.value, 2, length, length)
    logits = jnp.asarray(rng.normal(size=shape), jnp.float32)
    weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
    bias = jnp.zeros((1,) + shape[1:], jnp.float32)
    fns = {name: jax.jit(jax.grad(
        lambda b, x, w, add=add: jnp.sum(add(x, b) * w)))
           for name, add in (("plus", jnp.add), ("biases_add", biases.add))}
    args = (bias, logits, weights)
    times = {name: [] for name in fns}
    for fn in fns.values():
      _time(fn, args)
    for _ in range(_REPS.value):
      for name, fn in fns.items():
        times[name].append(_time(fn, args))
    row = {f"{name}_s": float(np.median(t)) for name, t in times.items()}
    row["biases_add_over_plus"] = row["biases_add_s"] / row["plus_s"]
    out[f"[{_BATCH.value}, 2, {length}, {length}]"] = row
    print("bias_grad", length, row, flush=True)
  return out


def time_epochs() -> dict:
  times = {True: [], False: []}
  for on in (True, False, True, False):  # interleaved
    with _RowBlocks(on):
      times[on] += bench.time_recattn(sasrec_ml1m.get_config(), _EPOCHS.value,
                                      bucketed=True)
  row = {"on_s_per_epoch": float(np.median(times[True])),
         "off_s_per_epoch": float(np.median(times[False])),
         "on_epoch_s": times[True], "off_epoch_s": times[False]}
  row["on_over_off"] = row["on_s_per_epoch"] / row["off_s_per_epoch"]
  print("epochs", {k: v for k, v in row.items() if "over" in k or
                   k.endswith("per_epoch")}, flush=True)
  return {"configs/sasrec_ml1m.py": row}


def main(argv):
  del argv
  results = {"env": reporting.environment(), "command": " ".join(sys.argv),
             "batch": _BATCH.value, "steps": time_steps(),
             "bias_grad": time_bias_grad()}
  if _EPOCHS.value:
    results["epochs"] = time_epochs()
  if _OUT.value:
    reporting.write_json(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
