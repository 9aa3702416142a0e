"""BSARec on Amazon Beauty (S3-Rec file, leave-one-out, max_len 50).

BSARec's published Beauty run (src/output/BSARec_Beauty_best.log in
yehjin-shin/BSARec): 2 blocks, 1 head, d=64, feed-forward 256 (GELU),
dropout 0.5 on hidden states and attention weights, filter weight alpha 0.7
and c=5 (3 lowest frequencies), raw dot-product logits, cross-entropy over
all items on one row per target (`data.train_windows=prefixes`), Adam 5e-4
(betas 0.9, 0.999), batch 256, up to 200 epochs with early stopping on
validation (BSARec: 10 epochs; here 5 evaluations 2 epochs apart). Its
published test: NDCG@10 0.0611, HR@10 0.1008.

  python -m recattn.main --config=configs/bsarec_beauty.py \
      --workdir=runs/bsarec_beauty

`:attr` adds each item's S3-Rec category/brand attributes to its vector
(`model.item_features=attributes`, study 010's largest gain for SASRec).
"""

from configs import sasrec_beauty


ARGS = ("", "attr")


def get_config(arg: str | None = None):
  if arg not in (None, *ARGS):
    raise ValueError(f"configs/bsarec_beauty.py:{arg}: allowed args are "
                     "'' (default) and 'attr'")
  c = sasrec_beauty.get_config()
  c.model.name = "bsarec"
  c.model.bsarec_alpha = 0.7
  c.model.bsarec_c = 5
  c.model.ffn_dim = 256
  c.model.attn.dropout = 0.5
  c.model.l2_norm = False
  c.loss.name = "softmax"
  c.loss.temperature = 1.0
  c.data.train_windows = "prefixes"
  c.optimizer.lr = 5e-4
  c.optimizer.b2 = 0.999
  c.eval.every_epochs = 2
  c.eval.patience = 5
  c.checkpoint.every_epochs = 2
  if arg == "attr":
    c.model.item_features = "attributes"
  return c
