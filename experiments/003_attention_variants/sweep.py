"""Study 003: every attention variant in the same SASRec-style model.

  python -m recattn.sweep --sweep=experiments/003_attention_variants/sweep.py

ML-1M (`ml-1m-seq`, max_len 200) and Beauty (max_len 50), full ranking with
seen items removed and sampled-100 ranking, selection on validation.
Beauty's rows use the setting study 010 selected on validation
(`configs/sasrec_beauty.py:softmax_prefix_attr`: exact softmax, one
training row per prefix, item attributes), and HSTU's model on each
(`configs/hstu_ml1m.py:large`, `configs/hstu_beauty.py`). Cheap
variants first: on a 2-core CPU an ML-1M run takes about half an hour with
softmax attention and several hours with `additive` or `din` (their score
network is evaluated for every (query, key) pair), so those come last.
Reference rows beside the variants: the exact softmax (Beauty, ML-1M) and
ML-1M's movie genres and release decade as item attributes (SASRec,
HSTU-large).
"""

VARIANTS = [
    {"model.attention": "dot"},
    {"model.attention": "blockwise"},
    {"model.attention": "local", "model.attn.window": 50},
    {"model.attention": "linear"},
    {"model.attention": "linear", "model.attn.linear_feature": "l2"},
    {"model.attention": "low_rank"},
    {"model.attention": "hstu"},
    {"model.attention": "scaled_dot", "model.rel_bias": "position"},
    {"model.attention": "additive"},
    {"model.attention": "din"},
]

# On Beauty (max_len 50) a window of 50 is the whole window: `local` keeps
# the last 10 items instead (about a user's mean length, 8.9).
BEAUTY_VARIANTS = [
    {"model.attention": "local", "model.attn.window": 10} if v.get(
        "model.attention") == "local" else v for v in VARIANTS]


# Rows slow on this project's 2-core CPU: their score network runs for every
# (query, key) pair at L = 200. din's [B, L, L, hidden] layers made it about
# 12 hours a run here, 7-9 since its train step is 1.4-1.7x faster
# (../000_speed_lean_step/README.md, "YNNPACK fusions"); additive, one
# hidden unit at a time since commit
# 4a94208, trained in 100 minutes beside other work (this study's README).
# A lent GPU runs them (experiments/gpu_checks.sh runs this sweep); study
# 009 does not wait for them (see its sweep file).
SLOW_ON_CPU = ("sasrec_ml1m__model.attention=additive__seed0",
               "sasrec_ml1m__model.attention=din__seed0")


def get_sweep():
  headline = {
      "name": "003_attention_variants",
      "configs": ["configs/sasrec_ml1m.py", "configs/hstu_ml1m.py:large",
                  "configs/sasrec_beauty.py:softmax_prefix_attr",
                  "configs/hstu_beauty.py"],
      "overrides": [{}],
      "seeds": [0, 1, 2],
  }
  # The training objective as a reference row: the exact softmax over every
  # item (BSARec's and FMLP-Rec's loss on Beauty) instead of 128 sampled
  # negatives; about twice an epoch's CPU time. On ML-1M it runs over
  # blocks of 256 items (`softmax_chunked`: the same values and gradients,
  # without the [B, L, V] logits; about 30 s an epoch on this CPU against
  # 46 s for the dense `softmax`, study 001).
  exact = {
      "name": "003_attention_variants",
      "configs": ["configs/sasrec_beauty.py"],
      "overrides": [{"loss.name": "softmax"}],
      "seeds": [0],
  }
  exact_ml1m = {
      "name": "003_attention_variants",
      "configs": ["configs/sasrec_ml1m.py"],
      "overrides": [{"loss.name": "softmax_chunked", "loss.item_chunk": 256}],
      "seeds": [0],
  }
  variants = {
      "name": "003_attention_variants",
      "configs": ["configs/sasrec_ml1m.py"],
      "overrides": VARIANTS,
      "seeds": [0],
  }
  beauty_variants = {
      "name": "003_attention_variants",
      "configs": ["configs/sasrec_beauty.py:softmax_prefix_attr"],
      "overrides": BEAUTY_VARIANTS,
      "seeds": [0],
  }
  # Item side information as a reference row: ML-1M's genres and release
  # decade (movies.dat) added to every item vector, as Beauty's rows add
  # S3-Rec's category and brand ids.
  side_info = {
      "name": "003_attention_variants",
      "configs": ["configs/sasrec_ml1m.py", "configs/hstu_ml1m.py:large"],
      "overrides": [{"model.item_features": "attributes"}],
      "seeds": [0],
  }
  # The training recipe as a reference row: SASRec+ (Klenitskiy & Vasilev,
  # RecSys 2023; configs/sasrec_ml1m.py:plus): the exact softmax on raw dot
  # products, d=64, dropout 0.1, early stopping.
  recipe = {
      "name": "003_attention_variants",
      "configs": ["configs/sasrec_ml1m.py:plus"],
      "overrides": [{}],
      "seeds": [0, 1, 2],
  }
  return [headline, exact, exact_ml1m, variants, beauty_variants, side_info,
          recipe]
