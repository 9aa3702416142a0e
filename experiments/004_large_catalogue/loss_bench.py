"""Cost of the large-catalogue losses: sampled throughput, exact memory.

  python experiments/004_large_catalogue/loss_bench.py \
      --out=experiments/004_large_catalogue/results_cpu.json

(a) Throughput. For each `--samplings` strategy, a jitted step computing the
    `sampled_softmax` loss and its gradient with respect to the user states
    h `[B, L, d]` and the item table `[V + 1, d]` (`--items` = V), with the
    default config's grouping (one set of `--negatives` per row; in_batch:
    one set per batch), logQ correction on, targets uniform over the items,
    no padding. Median wall time of `--reps` runs after one warm-up run;
    steps/s and positions/s (B * L / s). A strategy whose compiled memory
    exceeds `--max_gib` is not run (its memory is still recorded).
    With `--exact_items`, one run of the exact `softmax_chunked` step
    (item_chunk 1024) at that V is timed too.
(b) Memory. XLA's compiled memory analysis (nothing runs) of the loss and
    gradient (same inputs) for `softmax` (materialises `[B, L, V + 1]`
    logits) and `softmax_chunked` at each of `--chunks`, for each of
    `--vocab_sizes`.
Writes the JSON (`--out`) and a Markdown table next to it.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from recattn import losses  # pylint: disable=g-import-not-at-top
from recattn import reporting  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_ITEMS = flags.DEFINE_integer("items", 1_000_000,
                              "Catalogue size V for the throughput part.")
_SAMPLINGS = flags.DEFINE_list("samplings", ["uniform", "in_batch",
                                             "popularity"],
                               "Sampled-softmax negative samplers to time.")
_NEGATIVES = flags.DEFINE_integer("negatives", 128, "Negatives per group.")
_BATCH = flags.DEFINE_integer("batch", 128, "Users per step (B).")
_LENGTH = flags.DEFINE_integer("length", 200, "Positions per user (L).")
_DIM = flags.DEFINE_integer("dim", 64, "Embedding size (d).")
_REPS = flags.DEFINE_integer("reps", 5, "Timed runs per point.")
_MAX_GIB = flags.DEFINE_float("max_gib", 8.0,
                              "Do not run a step whose compiled memory "
                              "exceeds this.")
_VOCABS = flags.DEFINE_list("vocab_sizes", ["100000", "1000000"],
                            "Catalogue sizes V for the memory part.")
_CHUNKS = flags.DEFINE_list("chunks", ["256", "1024", "8192"],
                            "softmax_chunked block sizes (item_chunk).")
_EXACT_ITEMS = flags.DEFINE_integer(
    "exact_items", 100_000, "Also time one softmax_chunked step (chunk "
    "1024) at this V, for scale against sampled softmax (0 = skip).")


class _Table:
  """A stand-in model whose item table is a differentiable input."""

  def __init__(self, table):
    self.table = table

  def item_vectors(self, ids):
    return self.table[ids]

  def all_item_vectors(self):
    return self.table


def _loss_config(**fields) -> ml_collections.ConfigDict:
  base = dict(num_negatives=_NEGATIVES.value, sampling="uniform",
              negatives_group=0, logq_correction=True, temperature=1.0,
              item_chunk=8192, gbce_t=0.75)
  return ml_collections.ConfigDict({**base, **fields})


def _step(name: str, cfg, log_q):
  def loss(h, table, targets, rng):
    return losses.LOSSES[name](_Table(table), h, targets, rng, cfg, log_q)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _specs(v: int):
  b, l, d = _BATCH.value, _LENGTH.value, _DIM.value
  return (jax.ShapeDtypeStruct((b, l, d), jnp.float32),
          jax.ShapeDtypeStruct((v + 1, d), jnp.float32),
          jax.ShapeDtypeStruct((b, l), jnp.int32),
          jax.random.key(0))


def _compile(step, v: int, row: dict):
  """Compiles for catalogue size v; adds compile time and memory to `row`."""
  t0 = time.time()
  try:
    compiled = step.lower(*_specs(v)).compile()
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None
  row["compile_s"] = time.time() - t0
  mem = compiled.memory_analysis()
  row["temp_bytes"] = int(mem.temp_size_in_bytes)
  row["peak_bytes"] = int(mem.argument_size_in_bytes +
                          mem.output_size_in_bytes + mem.temp_size_in_bytes)
  return compiled


def throughput(sampling: str, v: int, name: str = "sampled_softmax",
               reps: int | None = None) -> dict:
  b, l = _BATCH.value, _LENGTH.value
  reps = reps or _REPS.value
  log_q = np.full(v + 1, -np.log(v), np.float32)
  if sampling == "popularity":  # Zipf(1) popularity
    counts = 1.0 / np.arange(1, v + 2)
    log_q = np.log(counts / counts[1:].sum()).astype(np.float32)
  log_q[0] = -np.inf
  cfg = _loss_config(sampling=sampling, item_chunk=1024)
  row = {"part": "throughput", "loss": name,
         "sampling": sampling, "V": v, "B": b, "L": l, "d": _DIM.value,
         "negatives": _NEGATIVES.value}
  compiled = _compile(_step(name, cfg, jnp.asarray(log_q)), v, row)
  if compiled is None:
    return row
  if row["peak_bytes"] > _MAX_GIB.value * 2**30:
    row["skipped"] = (f"compiled memory {row['peak_bytes'] / 2**30:.1f} GiB "
                      "> --max_gib")
    return row
  keys = jax.random.split(jax.random.key(1), 3)
  h = jax.random.normal(keys[0], (b, l, _DIM.value)) * 0.1
  table = jax.random.normal(keys[1], (v + 1, _DIM.value)) * 0.1
  targets = jax.random.randint(keys[2], (b, l), 1, v + 1)
  rng = jax.random.key(0)
  t0 = time.time()
  loss, _ = jax.block_until_ready(compiled(h, table, targets, rng))
  first = time.time() - t0
  times = [] if reps > 1 else [first]  # one rep: the warm-up run is timed
  for _ in range(reps if reps > 1 else 0):
    t0 = time.time()
    loss, _ = jax.block_until_ready(compiled(h, table, targets, rng))
    times.append(time.time() - t0)
  row.update(s=float(np.median(times)), reps=reps,
             loss_value=float(loss), steps_per_s=1.0 / float(np.median(times)),
             positions_per_s=b * l / float(np.median(times)))
  return row


def memory(name: str, v: int, chunk: int | None) -> dict:
  cfg = _loss_config(item_chunk=chunk or 8192)
  row = {"part": "memory", "loss": name, "V": v, "item_chunk": chunk,
         "B": _BATCH.value, "L": _LENGTH.value, "d": _DIM.value}
  _compile(_step(name, cfg, None), v, row)
  return row


def _gib(x) -> str:
  if x is None:
    return "-"
  return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def markdown(rows) -> str:
  lines = ["| loss | sampling | V | compiled peak | s / step | steps/s | "
           "positions/s |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["part"] != "throughput":
      continue
    s = r.get("s")
    lines.append(
        f"| `{r['loss']}` | "
        + ("-" if r["loss"] in losses.EXACT else f"`{r['sampling']}`")
        + f" | {r['V']:,} | {_gib(r.get('peak_bytes'))} | "
        + ("-" if s is None else f"{s:.3g}") + " | "
        + ("-" if s is None else f"{r['steps_per_s']:.3g}") + " | "
        + ("-" if s is None else f"{r['positions_per_s']:,.0f}") + " |")
  lines += ["", "| loss | item_chunk | V | temp | peak (args + out + temp) |",
            "|---|---|---|---|---|"]
  for r in rows:
    if r["part"] != "memory":
      continue
    lines.append(f"| `{r['loss']}` | {r['item_chunk'] or '-'} | {r['V']:,} | "
                 f"{_gib(r.get('temp_bytes'))} | "
                 f"{_gib(r.get('peak_bytes'))} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  result = {"env": reporting.environment(), "command": " ".join(sys.argv),
            "rows": []}

  def record(row):
    result["rows"].append(row)
    print(json.dumps(row), flush=True)
    if _OUT.value:  # after every row: a run cut short keeps what it did
      reporting.write_json(_OUT.value, result)

  for sampling in _SAMPLINGS.value:
    record(throughput(sampling, _ITEMS.value))
  if _EXACT_ITEMS.value:
    record(throughput("uniform", _EXACT_ITEMS.value, "softmax_chunked", 1))
  for v in (int(x) for x in _VOCABS.value):
    record(memory("softmax", v, None))
    for chunk in (int(x) for x in _CHUNKS.value):
      record(memory("softmax_chunked", v, chunk))
  table = markdown(result["rows"])
  print(table)
  if _OUT.value:
    with open(_OUT.value.removesuffix(".json") + ".md", "w") as f:
      f.write(table)


if __name__ == "__main__":
  app.run(main)
