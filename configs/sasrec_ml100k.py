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

from configs import sasrec_ml1m


def get_config(arg: str | None = None):
  if arg not in (None, "", "stream"):
    raise ValueError(f"configs/sasrec_ml100k.py:{arg}: allowed args are "
                     "'' (default) and 'stream'")
  c = sasrec_ml1m.get_config()  # model, loss, optimizer, batch, max_len
  c.data.name = "ml-100k"
  c.num_epochs = 200
  c.eval.every_epochs = 10
  if arg == "stream":
    c.model.positions = "left"
    c.data.stream_holdout = 0.1
  return c
