"""HSTU attention on a GPU: the Pallas kernels against cuDNN and XLA.

  python experiments/002_attention_cost/hstu_pallas_bench.py \
      --out=experiments/002_attention_cost/hstu_pallas_h100.json

For each L (B = tokens / L, H = 8, head size 64, bf16, causal), times
forward + backward (`jit(grad)` of sum(out * cot) in q, k, v) of:
  * `cudnn`: `jax.nn.dot_product_attention(..., implementation="cudnn")`;
  * `hstu_xla`: `hstu(..., impl="xla")`, the reference (builds the weights);
  * `hstu_xla_scan128`: the same with `block_k=128` (the XLA key-block scan);
  * `hstu_pallas`: `hstu(..., impl="pallas")`, the kernels' defaults;
then, at `--sweep_length`, the Pallas kernels under several tile sizes and
Triton launch parameters (`sweep/...` rows), to pick the defaults from one
run. Throughput counts the FLOPs of causal attention for every row, 7 matmuls
of 2 B H L^2 d halved by the mask, as gpu_throughput.py does; `vs_cudnn` is
time(cudnn) / time(row). The bar: `hstu_pallas` >= 0.5 at L = 8192. Rows
also carry the forward alone (`fwd_s`).

Each row is wrapped in try/except: a failure records its error and the rest
still run. On CPU (smoke test: `--lengths=64 --tokens=128 --sweep_length=64
--reps=1`) the cudnn row records an error and the Pallas rows run in the
interpreter.
"""

import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from recattn import reporting  # pylint: disable=g-import-not-at-top
import timing  # pylint: disable=g-import-not-at-top,g-bad-import-order
from recattn.attention import hstu_pallas  # pylint: disable=g-import-not-at-top
from recattn.attention.hstu import hstu  # pylint: disable=g-import-not-at-top
from recattn.attention.masks import Mask  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_LENGTHS = flags.DEFINE_list("lengths", ["2048", "4096", "8192"], "Lengths.")
_TOKENS = flags.DEFINE_integer("tokens", 65536, "Tokens per batch (B * L).")
_HEADS = flags.DEFINE_integer("heads", 8, "Heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head size.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed runs per point.")
_SWEEP_LENGTH = flags.DEFINE_integer(
    "sweep_length", 8192, "L of the Pallas tile sweep; 0 = no sweep.")

# Keyword arguments of hstu_pallas.attention; {} = its defaults.
_FWD = ("block_q", "block_k", "num_warps", "num_stages")
_BWD = ("bwd_block_outer", "bwd_block_inner", "bwd_num_warps",
        "bwd_num_stages")
SWEEP = (
    [dict(zip(_FWD, c)) for c in [(128, 64, 4, 3), (128, 32, 4, 3),
                                  (64, 64, 4, 2), (64, 32, 4, 3),
                                  (128, 128, 8, 3), (64, 128, 4, 3)]]
    + [dict(zip(_BWD, c)) for c in [(128, 32, 4, 2), (64, 32, 4, 3),
                                    (64, 64, 4, 2), (64, 64, 4, 4),
                                    (64, 128, 4, 3), (128, 64, 8, 3),
                                    (32, 64, 4, 3)]]
    + [dict(fast_sigmoid=False)])


def _time(fn, *args) -> float:
  return timing.median_time(fn, *args, reps=_REPS.value)


def _fns(attend):
  """(forward, forward + backward), jitted."""
  return (jax.jit(lambda q, k, v, cot: attend(q, k, v)),
          timing.grad_fn(attend))


def _row(name, attend, args, flops, base, extra=None):
  b, length, h, d = args[0].shape
  row = {"name": name, "L": length, "B": b, "H": h, "head_dim": d,
         "dtype": "bfloat16", **(extra or {})}
  try:
    fwd, fwd_bwd = _fns(attend)
    row["s"] = _time(fwd_bwd, *args)
    row["fwd_s"] = _time(fwd, *args)
    row["tflops"] = flops / row["s"] / 1e12
    if base is not None:
      row["vs_cudnn"] = base / row["s"]
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
  print(f"L={length:>6} {name:>24} {row.get('tflops', float('nan')):7.1f} "
        f"TFLOP/s  fwd+bwd {row.get('s', float('nan')) * 1e3:8.2f} ms  "
        f"fwd {row.get('fwd_s', float('nan')) * 1e3:7.2f} ms  vs cudnn "
        f"{row.get('vs_cudnn', float('nan')):.2f} {row.get('error', '')}",
        flush=True)
  return row


def _inputs(length):
  h, d = _HEADS.value, _HEAD_DIM.value
  b = max(1, _TOKENS.value // length)
  keys = jax.random.split(jax.random.key(0), 4)
  args = tuple(jax.random.normal(key, (b, length, h, d), jnp.bfloat16)
               for key in keys)
  return args, 7 * 2 * b * h * length * length * d / 2


def main(argv):
  del argv
  mask = Mask(causal=True)
  interpret = jax.default_backend() != "gpu"
  rows, cudnn_s = [], {}
  variants = {
      "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn"),
      "hstu_xla": lambda q, k, v: hstu(q, k, v, mask, impl="xla")[0],
      "hstu_xla_scan128": lambda q, k, v: hstu(
          q, k, v, mask, block_k=128, impl="xla")[0],
      "hstu_pallas": lambda q, k, v: hstu(q, k, v, mask, impl="pallas")[0],
  }
  for length in (int(x) for x in _LENGTHS.value):
    args, flops = _inputs(length)
    for name, attend in variants.items():
      rows.append(_row(name, attend, args, flops, cudnn_s.get(length)))
      if name == "cudnn" and "s" in rows[-1]:
        cudnn_s[length] = rows[-1]["s"]
  if _SWEEP_LENGTH.value:
    length = _SWEEP_LENGTH.value
    args, flops = _inputs(length)
    if length not in cudnn_s:
      rows.append(_row("cudnn", variants["cudnn"], args, flops, None))
      cudnn_s[length] = rows[-1].get("s")
    alpha = 1.0 / np.sqrt(_HEAD_DIM.value)
    for kwargs in SWEEP:
      attend = (lambda q, k, v, kw=kwargs: hstu_pallas.attention(
          q, k, v, alpha=alpha, causal=True, interpret=interpret, **kw))
      name = "sweep/" + ",".join(f"{k}={v}" for k, v in kwargs.items())
      rows.append(_row(name, attend, args, flops, cudnn_s.get(length),
                       {"kwargs": kwargs}))
  if _OUT.value:
    reporting.write_json(_OUT.value, {"env": reporting.environment(),
                                      "command": " ".join(sys.argv),
                                      "rows": rows})


if __name__ == "__main__":
  app.run(main)
