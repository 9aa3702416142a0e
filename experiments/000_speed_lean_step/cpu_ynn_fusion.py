"""XLA:CPU's YNNPACK fusions: all kinds (the default) against dots only.

  PYTHONPATH=. python experiments/000_speed_lean_step/cpu_ynn_fusion.py \
      --out=experiments/000_speed_lean_step/cpu_ynn_fusion/<n>_<commit>.json

jaxlib 0.10's CPU compiler hands dots, elementwise loops and reductions
to YNNPACK (`ynn_fusion` in a profile). Its reductions over a middle axis
are slow: the backward pass of DIN's `q * k` pair term (a multiply summed
over the queries or the keys) took most of a DIN layer's time. The compile
option `xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`
keeps YNNPACK for dots only. This times, in one process and interleaved,
each setting's

  * `cores`: forward + backward of `attention.layer(name, ...)` at
    Beauty's shape (B = 256, L = 50, one head of 64) and ML-1M's (B = 128,
    L = 200, one head of 50), as `variant_cores.py` does;
  * `steps`: one training step (forward, backward, Adam) of each config at
    a fixed `[B, L]` batch, as `cpu_attention_paths.py` does;

median of `--reps` calls after a compiling call. `PYTHONPATH` names the
checkout whose `recattn` and `configs` are timed (`.` for this one).
"""

import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recattn import attention
from recattn import models
from recattn import reporting
from recattn import sweep
from recattn import train
from recattn.attention.masks import Mask

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed calls per point.")
_CORES = flags.DEFINE_list("cores", ["din", "additive", "scaled_dot"],
                           "Attention variants whose core is timed.")
_SHAPES = flags.DEFINE_list("shapes", ["beauty", "ml1m"],
                            "Core shapes: beauty, ml1m.")
_STEPS = flags.DEFINE_list(
    "steps", ["configs/sasrec_ml1m.py:200", "configs/hstu_ml1m.py:large:200",
              "configs/sasrec_ml1m.py|model.attention=din:50",
              "configs/sasrec_ml1m.py|model.attention=din:100"],
    "Train steps timed, as <config>[|field=value,...]:<L> (B = 128, "
    "ML-1M's 3,706 items), e.g. 'configs/sasrec_ml1m.py|model.attention=din:50'.")

SHAPES = {"beauty": (256, 50, 1, 64), "ml1m": (128, 200, 1, 50)}
SETTINGS = {
    "default": {},
    "dots_only": {"xla_cpu_experimental_ynn_fusion_type":
                  "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}
_NUM_ITEMS = 3706


def _interleaved(fns: dict, args) -> dict:
  """Median ms per setting, the settings' calls interleaved."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))  # compiles
  times = {name: [] for name in fns}
  for _ in range(_REPS.value):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(1e3 * (time.perf_counter() - start))
  row = {f"{n}_ms": float(np.median(t)) for n, t in times.items()}
  row["dots_only_over_default"] = row["dots_only_ms"] / row["default_ms"]
  row["times_ms"] = times
  return row


def time_cores() -> dict:
  out = {}
  for shape in _SHAPES.value:
    b, length, h, d = SHAPES[shape]
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(x, (b, length, h, d)) for x in keys[:3])
    lengths = jax.random.randint(keys[3], (b,), 1, length + 1)
    mask = Mask(causal=True, key_valid=(jnp.arange(length)[None]
                                        >= (length - lengths)[:, None]))
    for name in _CORES.value:
      graph, state = nnx.split(attention.layer(name, h, d, {},
                                               rngs=nnx.Rngs(0)))

      def loss(state, q, k, v, graph=graph):
        return (nnx.merge(graph, state)(q, k, v, mask)[0] ** 2).sum()

      grad = jax.grad(loss, argnums=(0, 1, 2, 3))
      fns = {s: jax.jit(grad, compiler_options=o)
             for s, o in SETTINGS.items()}
      row = _interleaved(fns, (state, q, k, v))
      out[f"{name} {shape}"] = row
      print(name, shape, {k: round(v, 3) for k, v in row.items()
                          if not k.startswith("times")}, flush=True)
  return out


def time_steps() -> dict:
  out = {}
  for spec in _STEPS.value:
    config_name, length = spec.rsplit(":", 1)
    config_name, _, fields = config_name.partition("|")
    overrides = dict(f.split("=", 1) for f in fields.split(",") if f)
    length = int(length)
    c = sweep.build_config(config_name, overrides)
    model = models.create(c.model, num_items=_NUM_ITEMS,
                          max_len=c.data.max_len, seed=0)
    graphdef, params = nnx.split(model)
    tx = optax.adam(c.optimizer.lr)
    state = {"params": params, "opt_state": tx.init(params),
             "step": jnp.zeros((), jnp.int32)}
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.integers(1, _NUM_ITEMS + 1, (128, length)),
                         jnp.int32)
    batch = {"inputs": inputs, "targets": jnp.roll(inputs, -1, axis=1)}
    step = train.make_train_step(graphdef, tx, c.loss,
                                 jnp.zeros(_NUM_ITEMS + 1))
    fns = {s: jax.jit(step, compiler_options=o) for s, o in SETTINGS.items()}
    row = _interleaved(fns, (state, batch, jax.random.key(0)))
    out[spec] = row
    print(spec, {k: round(v, 3) for k, v in row.items()
                 if not k.startswith("times")}, flush=True)
  return out


def main(argv):
  del argv
  commit = subprocess.run(
      ["git", "-C", os.path.dirname(attention.__file__), "describe",
       "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
  results = {"env": reporting.environment(), "command": " ".join(sys.argv),
             "code_commit": commit, "settings": SETTINGS,
             "cores": time_cores(), "steps": time_steps()}
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    reporting.write_json(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
