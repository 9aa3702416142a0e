"""Study 009: algorithm parameters of the two best attention variants.

  python -m recattn.sweep --sweep=experiments/009_algorithm_parameters/sweep.py

Issue 4's study 002. Starts from study 003's ML-1M rows (every attention
variant in SASRec's model, and the HSTU model): the two with the highest
seed-0 validation full NDCG@10 are the variants studied here, so study 003's
ML-1M runs at seed 0 must be finished first (except its rows that are slow
on a CPU, `additive` and `din`, which count once they exist). For each, one
parameter at a time moves to a smaller and a larger value, everything else
as the variant's run in study 003 (stage 1, seed 0):

  heads         model.num_heads: the nearest divisors of model.dim
  d_k           model.qk_dim: half and twice the query/key size per head
  scale         the attention's own scale, halved and doubled:
                model.attn.temperature (softmax variants) or model.attn.alpha
                (hstu); variants without one skip this axis
  temperature   loss.temperature (the output logits'), halved and doubled
  dropout       model.dropout: half, and twice (at most 0.8)
  depth         model.num_blocks: half (at least 1) and twice
  lr            optimizer.lr: x0.3 and x3

plus the variant's own point, so that a stage's rows share one code
version. Stage 2 appears when a variant's stage 1 has finished: its point
with the best seed-0 validation NDCG@10 gets seeds 1 and 2. Selection reads
validation metrics only (`recattn.sweep.best`).
"""

import math
import os

from recattn import attention
from recattn import sweep as sweep_lib

NAME = "009_algorithm_parameters"
HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS_SWEEP = os.path.relpath(
    os.path.join(HERE, "..", "003_attention_variants", "sweep.py"))
ML1M_CONFIGS = ("configs/sasrec_ml1m.py", "configs/hstu_ml1m.py:large")
SELECT = "valid/full/ndcg@10"
NUM_VARIANTS = 2
# Study 003's rows that change these fields are reference rows (the loss,
# item side information), not attention variants.
REFERENCE_FIELDS = ("loss.", "model.item_features")
CHOSEN_SEEDS = [1, 2]


def _round(x: float) -> float:
  return float(f"{x:.3g}")


def _neighbours(values: list[int], base: int) -> list[int]:
  """The two members of sorted `values` nearest to `base`, one per side if
  both sides have one."""
  below = [v for v in values if v < base]
  above = [v for v in values if v > base]
  if below and above:
    return [below[-1], above[0]]
  return (below[-2:] if below else above[:2])


def axes(config: str, overrides: dict) -> dict[str, list[dict]]:
  """Axis name -> the overrides of its points, each on top of `overrides`."""
  c = sweep_lib.build_config(config, overrides)
  m = c.model
  head = m.qk_dim or m.dim // m.num_heads
  divisors = [h for h in range(1, m.dim + 1) if m.dim % h == 0]
  out = {
      "heads": [{"model.num_heads": h}
                for h in _neighbours(divisors, m.num_heads)],
      "d_k": [{"model.qk_dim": d} for d in (max(1, head // 2), 2 * head)],
      "temperature": [{"loss.temperature": _round(c.loss.temperature * f)}
                      for f in (0.5, 2.0)],
      "dropout": [{"model.dropout": _round(d)} for d in (
          (m.dropout / 2, min(2 * m.dropout, 0.8)) if m.dropout else
          (0.1, 0.2))],
      "depth": [{"model.num_blocks": n}
                for n in (max(1, m.num_blocks // 2), 2 * m.num_blocks)],
      "lr": [{"optimizer.lr": _round(c.optimizer.lr * f)}
             for f in (0.3, 3.0)],
  }
  options = attention.get(m.attention).options
  if "temperature" in options:
    out["scale"] = [{"model.attn.temperature": _round(m.attn.temperature * f)}
                    for f in (0.5, 2.0)]
  elif "alpha" in options:
    alpha = m.attn.alpha if m.attn.alpha is not None else 1 / math.sqrt(head)
    out["scale"] = [{"model.attn.alpha": _round(alpha * f)}
                    for f in (0.5, 2.0)]
  return {k: [{**overrides, **p} for p in points]
          for k, points in sorted(out.items())}


def best_variants(variant_runs: list[sweep_lib.Run]) -> list[sweep_lib.Run]:
  """Study 003's ML-1M seed-0 attention rows, best first on validation
  NDCG@10 (its reference rows, with another loss or with item side
  information, are not variants)."""
  rows = [r for r in variant_runs
          if r.config in ML1M_CONFIGS and r.seed == 0
          and not any(k.startswith(REFERENCE_FIELDS) for k in r.overrides)]
  # Study 003's rows that are slow on a CPU count once they exist; until
  # then the choice is among the others. Every expansion re-plans, so such a
  # row that later ranks in the top two brings its own points into the study.
  slow = sweep_lib.load_module(VARIANTS_SWEEP).SLOW_ON_CPU
  rows = [r for r in rows if r.finished() or r.name not in slow]
  missing = [r.name for r in rows if not r.finished()]
  if missing:
    raise sweep_lib.SweepError(
        f"{len(missing)} of study 003's {len(rows)} ML-1M seed-0 runs are "
        f"not finished ({', '.join(missing[:3])}"
        f"{', ...' if len(missing) > 3 else ''}); this study starts from "
        f"their validation results: run `python -m recattn.sweep "
        f"--sweep={VARIANTS_SWEEP}` first")
  return sweep_lib.best(rows, SELECT)


def plan(variant_runs: list[sweep_lib.Run], root: str) -> list[dict]:
  """Stage 1 for the two best variants, and stage 2 where stage 1 is done."""
  groups = []
  for chosen in best_variants(variant_runs)[:NUM_VARIANTS]:
    points = [dict(chosen.overrides)] + [
        p for ps in axes(chosen.config, chosen.overrides).values()
        for p in ps]
    group = {"name": NAME, "configs": [chosen.config], "overrides": points,
             "seeds": [0]}
    groups.append(group)
    runs = sweep_lib.load_runs_from_groups([group], root)
    if all(r.finished() for r in runs):
      top = sweep_lib.best(runs, SELECT)[0]
      groups.append({**group, "overrides": [top.overrides],
                     "seeds": CHOSEN_SEEDS})
  return groups


def get_sweep(root):
  return plan(sweep_lib.load_runs(VARIANTS_SWEEP), root)
