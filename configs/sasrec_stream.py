"""SASRec for streaming evaluation and serving (experiments/007_serving).

The ML-1M default's model and loss (2 blocks, 1 head, d=50, sampled softmax
with 128 uniform negatives, unit-norm vectors, temperature 0.05, Adam 1e-3,
batch 128, max_len 200), trained without the newest 10% of all interactions
(`data.stream_holdout=0.1`, held out for `python -m recattn.serving.stream`)
and with positions counted from the window's first item
(`model.positions=left`), so that an event updates a cached state.

The arg names a timestamped dataset: `ml-100k`, `ml-1m-partial` (the
timestamped first half of ML-1M's ratings.dat) or `synthetic` (5,000 users,
5,000 items, 40 events per user on average). `<dataset>,ranker` adds the
target-aware ranking head (`model.rank_head`, trained with
`loss.rank_weight=1`, 16 negatives), evaluated as `ranker_uniform100`.

  python -m recattn.main --config=configs/sasrec_stream.py:ml-1m-partial \
      --workdir=experiments/007_serving/runs/sasrec_ml1m_partial_stream
  python -m recattn.serving.stream \
      --workdir=experiments/007_serving/runs/sasrec_ml1m_partial_stream
"""

from configs import sasrec_ml1m

EPOCHS = {"ml-100k": 200, "ml-1m-partial": 100, "synthetic": 100}


def get_config(arg: str | None = None):
  dataset, *options = (arg or "").split(",")
  if dataset not in EPOCHS or options not in ([], ["ranker"]):
    raise ValueError(f"configs/sasrec_stream.py:{arg}: the arg is a dataset "
                     f"of {sorted(EPOCHS)}, optionally followed by "
                     "',ranker'")
  c = sasrec_ml1m.get_config()  # model, loss, optimizer, batch, max_len
  c.data.name = dataset
  c.data.stream_holdout = 0.1
  c.model.positions = "left"
  c.num_epochs = EPOCHS[dataset]
  c.eval.every_epochs = 10
  if dataset == "synthetic":
    c.data.synthetic_num_users = 5000
    c.data.synthetic_num_items = 5000
    c.data.synthetic_mean_len = 40
  if options:
    c.model.rank_head = True
    c.loss.rank_weight = 1.0
  return c
