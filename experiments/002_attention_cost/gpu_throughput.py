"""Attention throughput on a GPU against cuDNN, measured in the same process.

  python experiments/002_attention_cost/gpu_throughput.py \
      --out=experiments/002_attention_cost/gpu_throughput_h100.json

For each L (B = tokens / L, causal, bf16, one head size), times forward +
backward of:
  * `cudnn`: `jax.nn.dot_product_attention(..., implementation="cudnn")`
    called directly (the yardstick);
  * `xla`: the same call with `implementation="xla"`;
  * every recattn variant in `--variants`, through the registry.
Throughput counts the FLOPs of causal softmax attention for every row
(forward 2 matmuls, backward 5, each 2 B H L^2 d, halved by the causal
mask), so rows are comparable whatever a variant does internally; the
`vs_cudnn` column is time(cudnn) / time(variant). The issue's bars: softmax
attention at L >= 2048 within 80% of cuDNN, `hstu` within 50% at L = 8192.

On a machine without cuDNN (CPU) the `cudnn` row records the error and the
others still run, so the script can be smoke-tested anywhere.
"""

import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from recattn import attention  # pylint: disable=g-import-not-at-top
from recattn import reporting  # pylint: disable=g-import-not-at-top
import timing  # pylint: disable=g-import-not-at-top,g-bad-import-order

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_LENGTHS = flags.DEFINE_list("lengths", ["2048", "4096", "8192"], "Lengths.")
_TOKENS = flags.DEFINE_integer("tokens", 65536, "Tokens per batch (B * L).")
_HEADS = flags.DEFINE_integer("heads", 8, "Heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head size.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["scaled_dot", "blockwise", "hstu"], "recattn variants.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed runs per point.")


def _time(fn, *args) -> float:
  return timing.median_time(fn, *args, reps=_REPS.value)


def main(argv):
  del argv
  h, d = _HEADS.value, _HEAD_DIM.value
  rows = []
  for length in (int(x) for x in _LENGTHS.value):
    b = max(1, _TOKENS.value // length)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, cot = (jax.random.normal(key, (b, length, h, d), jnp.bfloat16)
                    for key in keys)
    flops = 7 * 2 * b * h * length * length * d / 2
    fns = {}
    for impl in ("cudnn", "xla"):
      fns[impl] = timing.grad_fn(
          lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
              q, k, v, is_causal=True, implementation=impl))
    mask = attention.Mask(causal=True)
    for name in _VARIANTS.value:
      core = attention.layer(name, h, d, rngs=nnx.Rngs(0))
      fns[name] = timing.grad_fn(
          lambda q, k, v, core=core: core(q, k, v, mask)[0])
    base = None
    for name, fn in fns.items():
      row = {"name": name, "L": length, "B": b, "H": h, "head_dim": d,
             "dtype": "bfloat16"}
      try:
        row["s"] = _time(fn, q, k, v, cot)
        row["tflops"] = flops / row["s"] / 1e12
        if name == "cudnn":
          base = row["s"]
        if base is not None:
          row["vs_cudnn"] = base / row["s"]
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      rows.append(row)
      print(f"L={length:>6} {name:>12} "
            f"{row.get('tflops', float('nan')):8.1f} TFLOP/s "
            f"vs cudnn {row.get('vs_cudnn', float('nan')):.2f} "
            f"{row.get('error', '')}", flush=True)
  if _OUT.value:
    reporting.write_json(_OUT.value, {"env": reporting.environment(),
                                      "command": " ".join(sys.argv),
                                      "rows": rows})


if __name__ == "__main__":
  app.run(main)
