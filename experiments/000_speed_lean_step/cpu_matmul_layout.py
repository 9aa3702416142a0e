"""2-D matmuls on XLA:CPU: dense layers and the exact softmax, on and off.

  python experiments/000_speed_lean_step/cpu_matmul_layout.py \
      --out=experiments/000_speed_lean_step/cpu_matmul_layout_cpu.json

XLA:CPU lowers the backward pass of a `[B, L, D]`-input `dot_general` with a
transposed copy of the `[B, L, E]` cotangent; multiplying `[B L, D]` instead
avoids it. Timed, each "on" (2-D, the library's path now) against "off" in
the same process, interleaved:

1. `steps`: one training step (forward, backward, Adam) of each config at
   fixed [B, L] batches (`--lengths`), with `recattn.models.base.Dense`
   flattening its input (on) or multiplying as `nnx.Linear` does (off),
   median of `--reps` after a compiling call (`cpu_attention_paths._step`).
2. `softmax_loss`: forward and backward of the exact softmax loss over the
   ML-1M item count at [B, L] = [128, 200], d = 50: `losses.softmax` (one
   2-D matmul against rows 1..V) against its former form (3-D einsum over
   all V + 1 rows, column 0 masked, positive by `take_along_axis`).
3. `epochs`: ML-1M epochs of each of `--epoch_configs` through the real
   trainer (`bench.time_recattn`), dense layers on and off, interleaved.
"""

import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import bench  # pylint: disable=g-import-not-at-top
import cpu_attention_paths as paths  # pylint: disable=g-import-not-at-top
from recattn import losses  # pylint: disable=g-import-not-at-top
from recattn import reporting  # pylint: disable=g-import-not-at-top
from recattn import sweep  # pylint: disable=g-import-not-at-top
from recattn.models import base  # pylint: disable=g-import-not-at-top

# --configs, --lengths, --batch, --reps: cpu_attention_paths' flags;
# --out, --epochs: bench.py's.
_EPOCH_CONFIGS = flags.DEFINE_list(
    "epoch_configs", ["configs/sasrec_ml1m.py"],
    "Configs whose epochs are timed (empty: none).")


class _Flatten:
  """`with _Flatten(on):` traces dense layers as 2-D matmuls or not."""

  def __init__(self, on: bool):
    self.on = on

  def __enter__(self):
    self.saved = base.FLATTEN_DENSE
    base.FLATTEN_DENSE = self.on

  def __exit__(self, *exc):
    base.FLATTEN_DENSE = self.saved


def _interleaved(fns: dict, args) -> dict:
  """Median seconds of each compiled fn, calls interleaved."""
  for fn in fns.values():
    paths._time(fn, args)  # pylint: disable=protected-access
  times = {name: [] for name in fns}
  for _ in range(paths._REPS.value):  # pylint: disable=protected-access
    for name, fn in fns.items():
      times[name].append(paths._time(fn, args))  # pylint: disable=protected-access
  return {name: float(np.median(t)) for name, t in times.items()} | {
      f"{name}_times": t for name, t in times.items()}


def time_steps() -> dict:
  out = {}
  for config_name in paths._CONFIGS.value:  # pylint: disable=protected-access
    for length in map(int, paths._LENGTHS.value):  # pylint: disable=protected-access
      steps = {}
      for on in (True, False):
        with _Flatten(on):
          steps[on] = paths._step(config_name, length, True)  # pylint: disable=protected-access
      args = steps[True][1]
      row = _interleaved({"on_s": steps[True][0], "off_s": steps[False][0]},
                         args)
      row["on_over_off"] = row["on_s"] / row["off_s"]
      out[f"{config_name} L={length}"] = row
      print(config_name, length, {k: round(v, 4) for k, v in row.items()
                                  if not k.endswith("times")}, flush=True)
  return out


def _softmax_3d(h, table, targets, temperature):
  """The exact softmax loss as `losses.softmax` computed it before."""
  logits = jnp.einsum("bld,vd->blv", h, table) / temperature
  return losses.softmax_from_logits(logits, targets)


class _Table:
  """The two methods of a model that `losses.softmax` uses."""

  def __init__(self, table):
    self.table = table

  def all_item_vectors(self):
    return self.table


def time_softmax_loss() -> dict:
  b, l, d, v = 128, 200, 50, paths._NUM_ITEMS  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(v + 1, d)) / np.sqrt(d), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v + 1, (b, l)), jnp.int32)
  config = sweep.build_config("configs/sasrec_ml1m.py").loss
  new = lambda h, t: losses.softmax(_Table(t), h, targets, None, config, None)
  old = lambda h, t: _softmax_3d(h, t, targets, config.temperature)
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
  (new_loss, new_grads), (old_loss, old_grads) = (
      grad(new)(h, table), grad(old)(h, table))
  row = _interleaved({"new_s": grad(new), "old_s": grad(old)}, (h, table))
  row["new_over_old"] = row["new_s"] / row["old_s"]
  row["loss_abs_diff"] = float(abs(new_loss - old_loss))
  row["grad_max_abs_diff"] = float(max(
      jnp.max(jnp.abs(a - c)) for a, c in zip(new_grads, old_grads)))
  print("softmax_loss", {k: v for k, v in row.items()
                         if not k.endswith("times")}, flush=True)
  return {f"[{b}, {l}, {d}] x {v} items": row}


def time_epochs() -> dict:
  out = {}
  for config_name in _EPOCH_CONFIGS.value:
    times = {True: [], False: []}
    for on in (True, False, True, False):  # interleaved
      with _Flatten(on):
        times[on] += bench.time_recattn(sweep.build_config(config_name),
                                        bench._EPOCHS.value, bucketed=True)  # pylint: disable=protected-access
    row = {"on_s_per_epoch": float(np.median(times[True])),
           "off_s_per_epoch": float(np.median(times[False])),
           "on_epoch_s": times[True], "off_epoch_s": times[False]}
    row["on_over_off"] = row["on_s_per_epoch"] / row["off_s_per_epoch"]
    out[config_name] = row
    print("epochs", config_name, {k: v for k, v in row.items()
                                  if "over" in k or k.endswith("per_epoch")},
          flush=True)
  return out


def main(argv):
  del argv
  results = {"env": reporting.environment(), "command": " ".join(sys.argv),
             "batch": paths._BATCH.value,  # pylint: disable=protected-access
             "softmax_loss": time_softmax_loss(), "steps": time_steps()}
  if bench._EPOCHS.value and _EPOCH_CONFIGS.value:  # pylint: disable=protected-access
    results["epochs"] = time_epochs()
  if bench._OUT.value:  # pylint: disable=protected-access
    reporting.write_json(bench._OUT.value, results)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
