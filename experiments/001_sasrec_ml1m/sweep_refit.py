"""SASRec+ under generative-recommenders' protocol: the validation item
trained on (issue 4's SASRec bar).

  python -m recattn.sweep --sweep=experiments/001_sasrec_ml1m/sweep_refit.py

Issue 4's SASRec bar (0.160 / 0.285) is generative-recommenders' published
SASRec row, trained on every item but the last. Study 003's best SASRec,
`configs/sasrec_ml1m.py:plus`, holds the validation item out and selects its
checkpoint on it (0.1578 ± 0.0020 / 0.2807 ± 0.0061). Here the same setting
is retrained with the validation item as one more training target, for 50
epochs, the median of the epochs validation selected in study 003's seeds
0-2 (40, 50, 80), and the last epoch is tested once: nothing is chosen on
test, and the runs' tables stay apart from held-out-validation ones (the
table tool refuses to mix them). As study 010's refit of Beauty's best row.
"""

# Epochs that validation selected for `configs/sasrec_ml1m.py:plus` in
# study 003 (runs/sasrec_ml1m_plus__seed{0,1,2}/final_metrics.json).
PLUS_BEST_EPOCHS = (40, 50, 80)


def get_sweep():
  epochs = sorted(PLUS_BEST_EPOCHS)[len(PLUS_BEST_EPOCHS) // 2]
  return {"name": "001_refit",
          "configs": ["configs/sasrec_ml1m.py:plus"],
          "overrides": [{"data.train_on_valid": True,
                         "eval.select_metric": "none",
                         "num_epochs": epochs}],
          "seeds": [0, 1, 2]}
