r"""Where the catalogue scan's time goes: 10^6 items x 64 dims, one user.

Times each part of `engine.top_k` alone (jitted, results waited for, 300
calls after one warm-up): the int8 and float32 dot products, `lax.top_k`
against `engine.block_top_k` for the top-256 of 10^6 scores, and the whole
`top_k` (k = 128: the engine's bucket for top-100) on both tables.

  python experiments/007_serving/scan_parts.py \
      --out=experiments/007_serving/scan_parts_cpu.json
"""

import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from recattn import reporting  # pylint: disable=g-import-not-at-top
from recattn.serving import engine as engine_lib

flags.DEFINE_integer("num_items", 1_000_000, "catalogue size V")
flags.DEFINE_integer("dim", 64, "vector size")
flags.DEFINE_integer("calls", 300, "timed calls per part")
flags.DEFINE_string("out", "", "results JSON ('' = print only)")
FLAGS = flags.FLAGS


def _time(fn, *args) -> dict:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(FLAGS.calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  ts = np.asarray(ts) * 1e3
  return {"p50_ms": float(np.percentile(ts, 50)),
          "p99_ms": float(np.percentile(ts, 99))}


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  vectors = rng.standard_normal((FLAGS.num_items + 1, FLAGS.dim), np.float32)
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  exact = engine_lib.scoring_table(jnp.asarray(vectors), "exact")
  quant = engine_lib.scoring_table(jnp.asarray(vectors), "int8")
  h = jnp.asarray(vectors[:1] + 0.1 * rng.standard_normal((1, FLAGS.dim)),
                  jnp.float32)
  seen = jnp.asarray(rng.integers(1, FLAGS.num_items, (1, 1024)), jnp.int32)
  scores = h @ exact["vectors"].T
  parts = {
      "dot_int8": _time(lambda q, h: h @ q.astype(jnp.float32).T,
                        quant["q"], h),
      "dot_float32": _time(lambda v, h: h @ v.T, exact["vectors"], h),
      "lax_top_k_256": _time(lambda s: jax.lax.top_k(s, 256), scores),
      "block_top_k_256": _time(lambda s: engine_lib.block_top_k(s, 256),
                               scores),
      "top_k_int8_k128": _time(
          lambda t, h, s: engine_lib.top_k(t, h, s, 128), quant, h, seen),
      "top_k_float32_k128": _time(
          lambda t, h, s: engine_lib.top_k(t, h, s, 128), exact, h, seen),
  }
  for name, row in parts.items():
    print(f"{name:20s} p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms")
  if FLAGS.out:
    reporting.write_json(FLAGS.out, {
        "setup": {"num_items": FLAGS.num_items, "dim": FLAGS.dim,
                  "calls": FLAGS.calls},
        "parts": parts, "env": reporting.environment(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python experiments/007_serving/scan_parts.py " +
                   " ".join(sys.argv[1:])})


if __name__ == "__main__":
  app.run(main)
