"""One full SASRec training step at long sequence length, per variant.

  python experiments/002_attention_cost/long_step.py \
      --out=experiments/002_attention_cost/long_step_cpu.json

The recattn trainer's own step (`train.make_train_step`: encode, sampled
softmax with 128 negatives per row, Adam update) on random item sequences of
length `--lengths` (default 16,384) with batch 8, d=64, 2 blocks, 1 head. For
each variant it reports the compiled step's memory (XLA memory analysis:
arguments + outputs + temporaries) and the wall time of two steps after the
compiling one. Variants whose compiled memory exceeds `--max_gib` are not run.
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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from configs import base  # pylint: disable=g-import-not-at-top
from recattn import models  # pylint: disable=g-import-not-at-top
from recattn import reporting  # pylint: disable=g-import-not-at-top
from recattn import train  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["blockwise", "local", "linear", "low_rank", "hstu_tiled",
                 "scaled_dot"], "Variants (hstu_tiled = hstu with key tiles).")
_LENGTHS = flags.DEFINE_list("lengths", ["16384"], "Sequence lengths.")
_REMAT = flags.DEFINE_bool("remat", False,
                           "Recompute each block in the backward pass "
                           "(`model.remat`).")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "Memory analysis only, no timed steps.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_DIM = flags.DEFINE_integer("dim", 64, "Model dimension.")
_ITEMS = flags.DEFINE_integer("items", 20000, "Catalogue size.")
_MAX_GIB = flags.DEFINE_float("max_gib", 20.0, "Run only below this memory.")


def config_for(variant: str):
  c = base.get_base_config()
  c.model.dim = _DIM.value
  c.model.remat = _REMAT.value
  c.model.num_blocks = 2
  c.model.num_heads = 1
  c.model.dropout = 0.2
  c.model.attn.window = 64
  c.model.attn.block_q = 512
  c.model.attn.block_k = 512
  if variant == "hstu_tiled":
    c.model.name = "hstu"
    c.model.attention = "hstu"
    c.model.rel_bias = "none"
    c.model.attn.hstu_block_k = 512
  else:
    c.model.attention = variant
  return c


def measure(variant: str, length: int) -> dict:
  c = config_for(variant)
  batch = _BATCH.value
  model = models.create(c.model, num_items=_ITEMS.value, max_len=length,
                        seed=0)
  graphdef, params = nnx.split(model)
  tx = optax.adam(1e-3)
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  log_q = jnp.full((_ITEMS.value + 1,), -np.log(_ITEMS.value), jnp.float32)
  step = jax.jit(train.make_train_step(graphdef, tx, c.loss, log_q),
                 donate_argnums=0)
  r = np.random.default_rng(0)
  seq = r.integers(1, _ITEMS.value + 1, size=(batch, length + 1))
  data = {"inputs": jnp.asarray(seq[:, :-1], jnp.int32),
          "targets": jnp.asarray(seq[:, 1:], jnp.int32)}
  row = {"variant": variant, "L": length, "B": batch, "dim": _DIM.value,
         "blocks": 2, "heads": 1, "remat": _REMAT.value}
  t0 = time.time()
  compiled = step.lower(state, data, jax.random.key(0)).compile()
  row["compile_s"] = time.time() - t0
  mem = compiled.memory_analysis()
  row["peak_bytes"] = int(mem.argument_size_in_bytes +
                          mem.output_size_in_bytes + mem.temp_size_in_bytes)
  if _COMPILE_ONLY.value:
    return row
  if row["peak_bytes"] > _MAX_GIB.value * 2**30:
    row["skipped"] = "compiled memory above --max_gib"
    return row
  times, loss = [], None
  for i in range(3):
    t0 = time.time()
    state, loss = compiled(state, data, jax.random.key(i))
    loss = float(loss)
    times.append(time.time() - t0)
  row["step_s"] = float(np.median(times[1:]))
  row["loss"] = loss
  row["finite"] = bool(np.isfinite(loss))
  return row


def main(argv):
  del argv
  rows = []
  for variant in _VARIANTS.value:
    for length in (int(x) for x in _LENGTHS.value):
      row = measure(variant, length)
      rows.append(row)
      print(f"{variant:>12} L={length:>6} mem="
            f"{row['peak_bytes'] / 2**30:6.2f} GiB "
            f"step={row.get('step_s', '-')} {row.get('skipped', '')}",
            flush=True)
  if _OUT.value:
    reporting.write_json(_OUT.value, {"env": reporting.environment(),
                                      "command": " ".join(sys.argv),
                                      "rows": rows})


if __name__ == "__main__":
  app.run(main)
