"""Tiny synthetic run for tests and smoke checks: seconds on a CPU.

  python -m recattn.main --config=configs/test.py --workdir=/tmp/recattn_test
"""

from configs import base


def get_config():
  c = base.get_base_config()
  c.data.name = "synthetic"
  c.data.max_len = 20
  c.data.synthetic_num_users = 200
  c.data.synthetic_num_items = 100
  c.data.synthetic_mean_len = 15
  c.model.dim = 16
  c.model.num_heads = 2
  c.model.dropout = 0.1
  c.loss.num_negatives = 16
  c.batch_size = 32
  c.num_epochs = 4
  c.eval.every_epochs = 2
  c.eval.batch_size = 64
  c.eval.num_negatives = 20
  c.checkpoint.every_epochs = 1
  c.progress = False
  return c
