"""Study 008: time-aware attention (issue 4's third study).

  python -m recattn.sweep --sweep=experiments/008_time_aware/sweep.py

`configs/time_aware.py` (SASRec's and HSTU's block) with four relative
biases on the attention logits: none, relative position (T5 buckets),
time-interval buckets, and both. Timestamped data only: `ml-100k`,
`synthetic` and `ml-1m-partial` (users 1-2,999 of ratings.dat, the half
staged with timestamps). Seed 0 of every point first; the ml-100k seeds 1
and 2 last.
"""

BIASES = [{"model.rel_bias": b}
          for b in ("none", "position", "time", "position+time")]


def _group(data, seeds=(0,)):
  return {"name": "008_time_aware",
          "configs": [f"configs/time_aware.py:{data}",
                      f"configs/time_aware.py:{data},hstu"],
          "overrides": BIASES, "seeds": list(seeds)}


# Generative-recommenders' HSTU measures the time intervals from the time
# of the prediction (the next item's timestamp; at evaluation the held-out
# item's), not from the query item's own: model.time_query="next".
REQUEST_TIME = [{"model.rel_bias": "position+time", "model.time_query": "next"}]


def get_sweep():
  return [_group("ml-100k"), _group("synthetic"), _group("ml-1m-partial"),
          _group("ml-100k", seeds=(1, 2)),
          {**_group("ml-1m-partial"), "overrides": REQUEST_TIME}]
