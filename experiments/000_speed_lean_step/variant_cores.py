"""Each attention variant's core at Beauty's per-prefix shape, on this CPU.

  python experiments/000_speed_lean_step/variant_cores.py \
      --out=experiments/000_speed_lean_step/variant_cores_cpu.json

Times forward + backward (gradients with respect to q, k, v and the
variant's parameters) of `attention.layer(name, ...)` at B = 256, Lk = 50,
one head of 64 (`configs/sasrec_beauty.py`), keys right-aligned with random
lengths 1..50, for Lq = 50 (every block but the last) and Lq = 1 (the last
block of a per-prefix row, `encode(last=1)`). `--shape=ml1m` times ML-1M's
shape instead (B = 128, L = 200, one head of 50: `configs/sasrec_ml1m.py`).
Median of `--reps` after a compiling call. `--variants` picks a subset;
`local` uses window 10, as in study 003. Run it with
`PYTHONPATH=<another checkout>` to time that checkout's code with the same
script.
"""

import json
import os
import platform
import subprocess
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from flax import nnx

from recattn import attention
from recattn.attention.masks import Mask

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_REPS = flags.DEFINE_integer("reps", 15, "Timed calls per point.")
_VARIANTS = flags.DEFINE_list("variants", None,
                              "Variants to time (default: all registered).")
_SHAPE = flags.DEFINE_enum("shape", "beauty", ["beauty", "ml1m"],
                           "beauty: B=256, L=50, Dh=64; ml1m: B=128, L=200, "
                           "Dh=50.")
SHAPES = {"beauty": (256, 50, 1, 64), "ml1m": (128, 200, 1, 50)}
OPTIONS = {"local": {"window": 10}}


def _time(name: str, lq: int, q, k, v, mask: Mask) -> float:
  _, _, h, d = q.shape
  core = attention.layer(name, h, d, OPTIONS.get(name, {}),
                         rngs=nnx.Rngs(0))
  graph, state = nnx.split(core)

  def loss(state, q, k, v):
    return (nnx.merge(graph, state)(q, k, v, mask)[0] ** 2).sum()

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  q = q[:, -lq:]
  jax.block_until_ready(step(state, q, k, v))
  times = []
  for _ in range(_REPS.value):
    start = time.perf_counter()
    jax.block_until_ready(step(state, q, k, v))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def main(argv):
  del argv
  B, L, H, D = SHAPES[_SHAPE.value]  # pylint: disable=invalid-name
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(x, (B, L, H, D)) for x in keys[:3])
  lengths = jax.random.randint(keys[3], (B,), 1, L + 1)
  mask = Mask(causal=True,
              key_valid=jnp.arange(L)[None] >= (L - lengths)[:, None])
  rows = []
  for name in _VARIANTS.value or list(attention.REGISTRY):
    for lq in (L, 1):
      ms = 1e3 * _time(name, lq, q, k, v, mask)
      rows.append({"variant": name, "lq": lq, "fwd_bwd_ms": round(ms, 2)})
      print(f"{name:12s} Lq={lq:3d} fwd+bwd {ms:8.2f} ms", flush=True)
  root = os.path.dirname(attention.__file__)
  commit = subprocess.run(["git", "-C", root, "describe", "--always",
                           "--dirty"], capture_output=True, text=True)
  result = {"shape": {"name": _SHAPE.value, "B": B, "Lk": L, "H": H,
                      "Dh": D},
            "reps": _REPS.value, "rows": rows,
            "commit": commit.stdout.strip() or "unknown",
            "jax": jax.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)
      f.write("\n")


if __name__ == "__main__":
  app.run(main)
