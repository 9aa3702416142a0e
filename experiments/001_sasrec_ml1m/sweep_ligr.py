"""SASRec+ with eSASRec's layer (issue 4's SASRec bar).

  python -m recattn.sweep --sweep=experiments/001_sasrec_ml1m/sweep_ligr.py

eSASRec (Tikhonov et al., RecSys 2025) replaces SASRec's block with
LinkedIn's LiGR layer: pre-norm, a sigmoid gate computed from the
un-normalised stream on each residual branch, and a SwiGLU feed-forward
layer of 4 d units (`model.norm=ligr, model.ffn_act=swiglu`,
`recattn/models/sasrec.py`). Its authors report +5% NDCG@10 over SASRec
with sampled softmax on ML-1M (0.1772 against 0.1684, their data and
tuning). Here the layer alone changes, on study 003's best SASRec,
`configs/sasrec_ml1m.py:plus` (exact softmax, d = 64, dropout 0.1;
0.1578 ± 0.0020 / 0.2807 ± 0.0061 over seeds 0-2): seed 0 first, against
study 003's `sasrec_ml1m_plus__seed0` (validation 0.1586, test 0.1598 /
0.2871); then seeds 1-2 (`--jobs=2` trains them side by side). Results:
the study's README, "SASRec+ with eSASRec's layer".
"""


def get_sweep():
  return {"name": "001_ligr",
          "configs": ["configs/sasrec_ml1m.py:plus"],
          "overrides": [{"model.norm": "ligr", "model.ffn_act": "swiglu",
                         "model.ffn_dim": 256}],
          "seeds": [0, 1, 2]}
