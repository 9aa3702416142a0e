"""SASRec on ML-1M (`ml-1m-seq`, leave-one-out, max_len 200).

Default (generative-recommenders' SASRec setting): 2 blocks, 1 head, d=50,
dropout 0.2, sampled softmax with 128 uniform negatives, unit-norm vectors
with temperature 0.05, Adam lr 1e-3, batch 128, 101 epochs.

  python -m recattn.main --config=configs/sasrec_ml1m.py \
      --workdir=runs/sasrec_ml1m

`:paper` is the SASRec paper setting: BCE with one negative per position,
dropout 0.2, lr 1e-3, batch 128, 200 epochs.

  python -m recattn.main --config=configs/sasrec_ml1m.py:paper \
      --workdir=runs/sasrec_ml1m_paper

`:plus` is SASRec+ (Klenitskiy & Vasilev, "Turning Dross Into Gold Loss",
RecSys 2023), their ML-1M setting on the same BERT4Rec file: the exact
softmax over every item on raw dot products (no unit norm, no temperature),
d=64, dropout 0.1, 2 blocks, 1 head, Adam 1e-3, batch 128, at most 100
epochs, stopped once validation NDCG@10 has not improved for 15 epochs.
The softmax is computed over blocks of 256 items (`softmax_chunked`: the
same values and gradients as `softmax`, never the [B, L, V] logits).

  python -m recattn.main --config=configs/sasrec_ml1m.py:plus \
      --workdir=runs/sasrec_ml1m_plus

Result of the default (commit 3abcc44, 2-core CPU, jax 0.10.2, 2026-11-27;
records in experiments/001_sasrec_ml1m/runs/sasrec_ml1m): selected on
validation at epoch 80, test full ranking (seen items filtered) HR@10 0.2680,
NDCG@10 0.1482; test sampled_uniform100 NDCG@10 0.6020; 18.1 s per epoch,
33.5 min in all. `:paper` (same commit, machine and date): test
sampled_uniform100 NDCG@10 0.5885, HR@10 0.8147 (selected on validation at
epoch 200); 16.4 s per epoch (experiments/000_speed_lean_step).
"""

from configs import base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  c.data.name = "ml-1m-seq"
  c.data.max_len = 200
  c.model.num_blocks = 2
  c.model.num_heads = 1
  c.model.dim = 50
  c.model.dropout = 0.2
  c.batch_size = 128
  c.optimizer.lr = 1e-3
  c.eval.every_epochs = 5
  # generative-recommenders ranks all items except the user's history
  # (its eval's filter_invalid_ids=True); ML-1M has no repeat interactions.
  c.eval.filter_seen = True
  if not arg:
    c.num_epochs = 101
    c.model.l2_norm = True
    c.loss.name = "sampled_softmax"
    c.loss.num_negatives = 128
    c.loss.temperature = 0.05
  elif arg == "paper":
    c.num_epochs = 200
    c.model.l2_norm = False
    c.loss.name = "bce"
    c.loss.num_negatives = 1
    c.eval.every_epochs = 20
    c.eval.select_metric = "valid/sampled_uniform100/ndcg@10"
  elif arg == "plus":
    c.num_epochs = 100
    c.model.dim = 64
    c.model.dropout = 0.1
    c.model.l2_norm = False
    c.loss.name = "softmax_chunked"
    c.loss.item_chunk = 256
    c.loss.temperature = 1.0
    c.eval.patience = 3
  else:
    raise ValueError(f"configs/sasrec_ml1m.py:{arg}: allowed args are "
                     "'' (default), 'paper' and 'plus'")
  return c
