"""Forward+backward time and peak memory of every attention variant.

  python experiments/002_attention_cost/bench.py \
      --out=experiments/002_attention_cost/results_cpu.json

For each registered variant and each sequence length L, at a fixed number of
tokens per batch (B = tokens / L), it compiles the gradient of a scalar loss
of the attention output with respect to q, k and v (causal mask, padded
batch with no padding keys, H heads of size d/H) and reports:
  * peak memory: XLA's compiled memory analysis (arguments + outputs +
    temporaries; nothing is run for this number);
  * time: median wall time of `--reps` runs after one warm-up run, skipped
    (null) when the compiled memory exceeds `--max_gib` or the estimated
    time of one run exceeds `--max_s`.
Variant parameters (additive, din, low_rank) are created at their defaults.
A Markdown table (`time / peak memory` per variant and length) is printed
and written next to the JSON.
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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from recattn import attention  # pylint: disable=g-import-not-at-top
from recattn import reporting  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_VARIANTS = flags.DEFINE_list("variants", None,
                              "Variants to time (default: all registered).")
_LENGTHS = flags.DEFINE_list("lengths", ["50", "200", "1024", "4096", "16384"],
                             "Sequence lengths.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "Tokens per batch (B * L).")
_DIM = flags.DEFINE_integer("dim", 64, "Model dimension (all heads).")
_HEADS = flags.DEFINE_integer("heads", 1, "Number of heads.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Input dtype.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed runs per point.")
_MAX_GIB = flags.DEFINE_float("max_gib", 12.0,
                              "Skip running points whose compiled memory "
                              "exceeds this.")
_MAX_S = flags.DEFINE_float("max_s", 60.0,
                            "Skip the timed runs when the warm-up run took "
                            "longer than this.")
_BATCH = flags.DEFINE_integer("batch", 0, "Fixed batch size instead of "
                               "--tokens / L (0 = use --tokens).")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "Memory analysis only, no timed runs.")
# Benchmark rows: label -> (registry name, `config.model.attn` overrides).
# Every registered variant runs at its defaults under its own name.
EXTRA = {
    "local": ("local", {"window": 64}),
    "hstu_tiled": ("hstu", {"hstu_block_k": 512}),
    "blockwise": ("blockwise", {"block_q": 512, "block_k": 512}),
}


def measure(label: str, length: int) -> dict:
  b = _BATCH.value or max(1, _TOKENS.value // length)
  h = _HEADS.value
  dh = _DIM.value // h
  dtype = jnp.dtype(_DTYPE.value)
  name, options = EXTRA.get(label, (label, {}))
  core = attention.layer(name, h, dh, options, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(core)
  shape = (b, length, h, dh)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, cot = (jax.random.normal(key, shape, dtype) for key in keys)
  valid = jnp.ones((b, length), bool)

  def loss(q, k, v):
    fn = nnx.merge(graphdef, state)
    mask = attention.Mask(causal=True, key_valid=valid,
                          window=options.get("window"))
    out, _ = fn(q, k, v, mask)
    return jnp.sum((out * cot).astype(jnp.float32))

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  row = {"variant": label, "L": length, "B": b, "H": h, "head_dim": dh,
         "dtype": _DTYPE.value, "options": options}
  try:
    t0 = time.time()
    compiled = step.lower(q, k, v).compile()
    row["compile_s"] = time.time() - t0
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes +
          mem.temp_size_in_bytes)
  row["peak_bytes"] = int(peak)
  row["temp_bytes"] = int(mem.temp_size_in_bytes)
  if _COMPILE_ONLY.value:
    return row
  if peak > _MAX_GIB.value * 2**30:
    row["skipped"] = f"compiled memory {peak / 2**30:.1f} GiB > --max_gib"
    return row
  t0 = time.time()
  jax.block_until_ready(compiled(q, k, v))
  first = time.time() - t0
  if first > _MAX_S.value:
    row["s"] = first
    row["reps"] = 1
    return row
  times = []
  for _ in range(_REPS.value):
    t0 = time.time()
    jax.block_until_ready(compiled(q, k, v))
    times.append(time.time() - t0)
  row["s"] = float(np.median(times))
  row["reps"] = _REPS.value
  # FLOP count of causal softmax attention fwd+bwd (for throughput figures):
  # 2 matmuls fwd, 5 bwd (with recomputation), each 2 B H L^2 d, halved.
  row["causal_softmax_flops"] = 7 * 2 * b * h * length * length * dh / 2
  return row


def markdown(rows, lengths) -> str:
  """Variant x length table of `time s / peak MiB`."""
  head = "| variant | " + " | ".join(f"L={n}" for n in lengths) + " |"
  lines = [head, "|---" * (len(lengths) + 1) + "|"]
  for name in dict.fromkeys(r["variant"] for r in rows):
    cells = []
    for n in lengths:
      r = next((r for r in rows if r["variant"] == name and r["L"] == n), {})
      mem = r.get("peak_bytes")
      if mem is None:
        cells.append("error" if "error" in r else "")
        continue
      t = r.get("s")
      cells.append(("-" if t is None else f"{t:.3g} s") +
                   f" / {mem / 2**20:.0f} MiB")
    lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  names = _VARIANTS.value or sorted(set(attention.REGISTRY) | set(EXTRA))
  lengths = [int(x) for x in _LENGTHS.value]
  result = {"env": reporting.environment(),
            "command": " ".join(sys.argv),
            "tokens": _TOKENS.value, "batch": _BATCH.value, "dim": _DIM.value,
            "heads": _HEADS.value, "rows": []}
  for name in names:
    for length in lengths:
      row = measure(name, length)
      result["rows"].append(row)
      mem = row.get("peak_bytes")
      print(f"{name:>12} L={length:>6} B={row['B']:>4} "
            f"mem={'-' if mem is None else f'{mem / 2**20:9.1f} MiB'} "
            f"s={row.get('s', '-')} {row.get('skipped', row.get('error', ''))}",
            flush=True)
      if _OUT.value:  # after every row: a run cut short keeps what it did
        reporting.write_json(_OUT.value, result)
  table = markdown(result["rows"], lengths)
  print(table)
  if _OUT.value:
    with open(_OUT.value.removesuffix(".json") + ".md", "w") as f:
      f.write(table)


if __name__ == "__main__":
  app.run(main)
