"""SASRec+ with Polyak averaging of its parameters (issue 4's SASRec bar).

  python -m recattn.sweep --sweep=experiments/001_sasrec_ml1m/sweep_ema.py

Study 003's best SASRec, `configs/sasrec_ml1m.py:plus` (0.1578 ± 0.0020 /
0.2807 ± 0.0061), selects its checkpoint on a validation curve that is flat
and noisy after epoch ~40 (one evaluation every 5 epochs, 48 steps each).
Here validation, selection and test use an exponential moving average of
the parameters (`optimizer.ema_decay`, `recattn.optim.params_ema`); the
training steps are the same. Decay 0.998 averages about the last 500 steps
(10 epochs, two evaluations), 0.995 about 200. Seed 0 each first, against
study 003's `sasrec_ml1m_plus__seed0` (test 0.1598 / 0.2871); seeds 1-2 for
the better decay on validation.
"""


def get_sweep():
  return {"name": "001_ema",
          "configs": ["configs/sasrec_ml1m.py:plus"],
          "overrides": [{"optimizer.ema_decay": 0.998},
                        {"optimizer.ema_decay": 0.995}],
          "seeds": [0]}
