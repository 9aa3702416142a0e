"""Study 008's setting (time-aware attention) on a timestamped dataset.

`configs/sasrec_ml1m.py`'s model and loss, as `configs/sasrec_ml100k.py`
(2 blocks, d=50, sampled softmax with 128 negatives, unit-norm vectors /
temperature 0.05, max_len 200, seen items removed), on `<data>`; `,hstu`
swaps the block for HSTU's (configs/hstu_ml1m.py: pointwise SiLU attention,
2 heads of 25).
`model.rel_bias` (none | position | time | position+time) is the study's
variable, set by experiments/008_time_aware/sweep.py.

  python -m recattn.main --config=configs/time_aware.py:ml-100k,hstu \
      --config.model.rel_bias=position+time --workdir=runs/ta

Results: experiments/008_time_aware/README.md.
"""

from configs import hstu_ml1m
from configs import sasrec_ml1m

EPOCHS = {"ml-100k": 200, "ml-1m-partial": 100, "synthetic": 100}
MODELS = ("sasrec", "hstu")


def get_config(arg: str | None = None):
  data, _, model = (arg or "").partition(",")
  model = model or "sasrec"
  if data not in EPOCHS or model not in MODELS:
    raise ValueError(f"configs/time_aware.py:{arg}: the arg is <data>[,<model>]"
                     f" with data one of {sorted(EPOCHS)} and model one of "
                     f"{list(MODELS)}")
  # sasrec_ml100k's and hstu_ml1m's configs are sasrec_ml1m's plus their data
  # or their block; this takes the block and sets the data.
  c = (hstu_ml1m if model == "hstu" else sasrec_ml1m).get_config()
  c.data.name = data
  c.num_epochs = EPOCHS[data]
  c.eval.every_epochs = 10 if data == "ml-100k" else 5
  c.model.rel_bias = "none"
  return c
