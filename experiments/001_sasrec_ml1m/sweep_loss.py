"""The loss ablations that moved ML-1M quality, as full runs (issue 2).

  python -m recattn.sweep --sweep=experiments/001_sasrec_ml1m/sweep_loss.py \
      --jobs=4

Exact softmax and per-position negatives lifted the validation curve 4-6%
at equal steps in short runs (README, "On a GPU"); this sweep runs them to
the end, three seeds each (the default's three seeds are study 003's headline
runs). Too slow for the 2-core CPU (exact softmax and per-position
negatives cost several times the default's epoch there): meant for a GPU
session (`experiments/gpu_checks.sh` runs it first in its shared phase).
"""


def get_sweep():
  return {"name": "001_loss",
          "configs": ["configs/sasrec_ml1m.py"],
          "overrides": [{"loss.name": "softmax"},
                        {"loss.negatives_group": 1}],
          "seeds": [0, 1, 2]}
