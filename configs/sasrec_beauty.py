"""SASRec on Amazon Beauty (S3-Rec file, leave-one-out, max_len 50).

The setting of the BSARec / FMLP-Rec line of work on this file (d=64,
2 blocks, dropout 0.5, max_len 50, batch 256, Adam 1e-3, seen items removed
from full ranking, early stopping on validation), trained with
generative-recommenders' sampled softmax (128 negatives, unit-norm vectors,
temperature 0.05) instead of full softmax, which is too slow over 12k items
on a 2-core CPU.

  python -m recattn.main --config=configs/sasrec_beauty.py \
      --workdir=runs/sasrec_beauty

Result (seed 0, 2-core CPU, jax 0.10.2, 2026-11-28; records in
experiments/003_attention_variants/prelim/sasrec_beauty): selected on
validation at epoch 80, test full ranking (seen items removed) HR@10
0.0785, NDCG@10 0.0464; test sampled-100 NDCG@10 0.3072; 14.2 s per
epoch, 30 min in all.

`configs/sasrec_beauty.py:softmax_prefix_attr` is the setting study 010
selected on validation (study 003's Beauty rows): the exact softmax over
all items, one training row per prefix (`data.train_windows=prefixes`)
and each item's S3-Rec category/brand attributes fused into its vector
(`model.item_features=attributes`). Seed 0 (study 010, 2026-12-01):
validation full NDCG@10 0.0748, test full NDCG@10 0.0587, HR@10 0.0983.
"""

from configs import base


ARGS = ("", "softmax_prefix_attr")


def get_config(arg: str | None = None):
  if arg not in (None, *ARGS):
    raise ValueError(f"configs/sasrec_beauty.py:{arg}: allowed args are "
                     "'' (default) and 'softmax_prefix_attr'")
  c = base.get_base_config()
  c.data.name = "beauty"
  c.data.max_len = 50
  # Beauty's windows are short (5.7 targets on average): cutting them to a
  # multiple of 2 instead of 10 leaves 69% of the computed positions real
  # instead of 42% (same batches; left padding does not change the model's
  # outputs), at the price of 9 compiled window widths instead of 3.
  c.data.bucket_step = 2
  c.model.num_blocks = 2
  c.model.num_heads = 1
  c.model.dim = 64
  c.model.dropout = 0.5
  c.model.l2_norm = True
  c.loss.name = "sampled_softmax"
  c.loss.num_negatives = 128
  c.loss.temperature = 0.05
  c.batch_size = 256
  c.optimizer.lr = 1e-3
  c.num_epochs = 200
  c.eval.every_epochs = 5
  c.eval.patience = 6
  c.eval.filter_seen = True
  if arg == "softmax_prefix_attr":
    c.loss.name = "softmax"
    c.data.train_windows = "prefixes"
    c.model.item_features = "attributes"
  return c
