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
from configs import sasrec_stream


def get_config(arg: str | None = None):
  if arg not in (None, "", "stream"):
    raise ValueError(f"configs/sasrec_ml100k.py:{arg}: allowed args are "
                     "'' (default) and 'stream'")
  if arg == "stream":  # the one definition of the serving study's setting
    return sasrec_stream.get_config("ml-100k")
  c = sasrec_ml1m.get_config()  # model, loss, optimizer, batch, max_len
  c.data.name = "ml-100k"
  c.num_epochs = sasrec_stream.EPOCHS["ml-100k"]
  c.eval.every_epochs = 10
  return c
