"""HSTU on ML-1M (`ml-1m-seq`, leave-one-out, max_len 200).

generative-recommenders' ML-1M HSTU settings: `:large` is its
hstu-sampled-softmax-n128-large config (8 blocks), the default its
hstu-sampled-softmax-n128 one (2 blocks); both 2 heads, d=50, Q/K and U/V of
25 per head, dropout 0.2, sampled softmax with 128 negatives, unit-norm
vectors with temperature 0.05, Adam 1e-3, batch 128, 101 epochs. Their
research code applies no 1/sqrt(d) scale inside silu (alpha = 1) and
divides by the padded length; its relative bias mixes positions and time,
but `ml-1m-seq` has no timestamps, so only the position part is used here.

  python -m recattn.main --config=configs/hstu_ml1m.py:large \
      --workdir=runs/hstu_ml1m_large

Result of `:large`, seed 0 (2-core CPU, 2026-11-30; records in
experiments/003_attention_variants/runs/hstu_ml1m_large__seed0): selected on
validation at epoch 100, test full ranking (seen items removed) NDCG@10
0.1614, HR@10 0.2925. generative-recommenders' time bias measures from the
time of the prediction (`model.time_query=next`), worth +13% NDCG@10 to
HSTU on the timestamped half of ML-1M (experiments/008_time_aware); the
published 0.1893 includes it.
"""

from configs import sasrec_ml1m


def use_hstu_block(c):
  """Swaps `c`'s model for HSTU's, as generative-recommenders' research code
  sets it: 2 heads with Q/K and U/V of dim / 2 each, alpha 1, the
  padded-length normaliser and a relative position bias."""
  c.model.name = "hstu"
  c.model.attention = "hstu"
  c.model.rel_bias = "position"
  c.model.num_heads = 2
  c.model.qk_dim = c.model.dim // 2
  c.model.v_dim = c.model.dim // 2
  c.model.attn.alpha = 1.0
  c.model.attn.normalizer = "padded"
  return c


def get_config(arg: str | None = None):
  c = use_hstu_block(sasrec_ml1m.get_config())
  if not arg:
    c.model.num_blocks = 2
  elif arg == "large":
    c.model.num_blocks = 8
  else:
    raise ValueError(f"configs/hstu_ml1m.py:{arg}: allowed args are "
                     "'' (default) and 'large'")
  return c
