"""HSTU on Amazon Beauty (S3-Rec file, leave-one-out, max_len 50).

Study 003's HSTU row on Beauty: the setting of every other Beauty row
(`configs/sasrec_beauty.py:softmax_prefix_attr`: exact softmax over all
items, one training row per prefix, S3-Rec's category and brand ids as item
attributes, d=64, dropout 0.5, batch 256, Adam 1e-3, early stopping on
validation) with HSTU blocks in place of SASRec's. The block follows
`configs/hstu_ml1m.py` (generative-recommenders' research code): 2 heads,
Q/K and U/V of 32 per head (d / heads, as 25 is for d=50), no 1/sqrt(d)
scale inside silu (alpha = 1), division by the padded length, and a
relative position bias (the S3-Rec file has no timestamps). Depth 2, as
SASRec's Beauty rows: with Beauty's short windows (8.9 items on average)
there is no published deeper setting to follow, and an HSTU block (no
feed-forward layer) has fewer parameters than SASRec's.

  python -m recattn.main --config=configs/hstu_beauty.py \
      --workdir=runs/hstu_beauty
"""

from configs import hstu_ml1m
from configs import sasrec_beauty


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"configs/hstu_beauty.py:{arg}: takes no arg")
  return hstu_ml1m.use_hstu_block(
      sasrec_beauty.get_config("softmax_prefix_attr"))
