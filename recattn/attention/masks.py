"""Mask descriptions shared by all attention variants.

A `Mask` describes which keys a query may see instead of carrying a dense
`[B, H, Lq, Lk]` boolean tensor, so variants that never materialise the score
matrix (blockwise, linear) can honour it too.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Mask:
  """Which keys each query attends to.

  Attributes:
    causal: query i sees key j only if j <= i (aligned to the right when
      Lq != Lk, so the last query sees every key).
    key_valid: `[B, Lk]` bool, False for padding keys; None = all valid.
  """

  causal: bool = True
  key_valid: jax.Array | None = None

  def dense(self, q_len: int, k_len: int) -> jax.Array | None:
    """Returns the mask as a broadcastable `[B|1, 1, Lq, Lk]` bool, or None."""
    mask = None
    if self.causal:
      q_pos = jnp.arange(q_len)[:, None] + (k_len - q_len)
      mask = (jnp.arange(k_len)[None, :] <= q_pos)[None, None]
    if self.key_valid is not None:
      kv = self.key_valid[:, None, None, :]
      mask = kv if mask is None else jnp.logical_and(mask, kv)
    return mask
