"""SASRec on ML-100K (`ml-100k`: GroupLens ratings with timestamps).

The ML-1M default's model and loss (2 blocks, 1 head, d=50, sampled softmax
with 128 uniform negatives, unit-norm vectors, temperature 0.05, Adam 1e-3,
batch 128), max_len 200, 200 epochs (943 users: 8 steps per epoch).

  python -m recattn.main --config=configs/sasrec_ml100k.py \
      --workdir=runs/sasrec_ml100k

`:stream` is the serving study's setting (experiments/007_serving): the
newest 10% of all interactions are held out of training and evaluation for
a streaming replay (`python -m recattn.serving.stream`), and positions are
counted from the window's first item (`model.positions=left`) so that an
event updates a cached state instead of re-encoding the window.

  python -m recattn.main --config=configs/sasrec_ml100k.py:stream \
      --workdir=experiments/007_serving/runs/sasrec_ml100k_stream
  python -m recattn.serving.stream \
      --workdir=experiments/007_serving/runs/sasrec_ml100k_stream
"""

from configs import base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  c.data.name = "ml-100k"
  c.data.max_len = 200
  c.model.num_blocks = 2
  c.model.num_heads = 1
  c.model.dim = 50
  c.model.dropout = 0.2
  c.model.l2_norm = True
  c.loss.name = "sampled_softmax"
  c.loss.num_negatives = 128
  c.loss.temperature = 0.05
  c.batch_size = 128
  c.optimizer.lr = 1e-3
  c.num_epochs = 200
  c.eval.every_epochs = 10
  c.eval.filter_seen = True
  if arg == "stream":
    c.model.positions = "left"
    c.data.stream_holdout = 0.1
  elif arg:
    raise ValueError(f"configs/sasrec_ml100k.py:{arg}: allowed args are "
                     "'' (default) and 'stream'")
  return c
