"""The numpy statement of `Mask`, shared by the attention tests.

Written from the `recattn.attention.masks.Mask` docstring, not its code, so
the variants are checked against an independent rule.
"""

import numpy as np


def visible(lq, lk, *, causal=True, key_valid=None, window=None,
            num_targets=None):
  """`[B|1, Lq, Lk]` bool: which keys each (right-aligned) query sees."""
  qp = np.arange(lq)[:, None] + (lk - lq)
  kp = np.arange(lk)[None, :]
  ok = np.ones((lq, lk), bool)
  if causal:
    ok &= kp <= qp
  if window is not None:
    ok &= kp > qp - window
  if num_targets is not None:
    first = lk - num_targets
    # a candidate key is seen only by the candidate itself
    ok &= np.where(kp >= first, (qp >= first) & (kp == qp), True)
  ok = ok[None]
  if key_valid is not None:
    ok = ok & np.asarray(key_valid, bool)[:, None, :]
  return ok
