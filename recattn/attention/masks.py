"""Mask descriptions shared by all attention variants.

A `Mask` describes which keys a query may see instead of carrying a dense
`[B, H, Lq, Lk]` boolean tensor, so variants that never materialise the score
matrix (blockwise, local, linear) honour it tile by tile through `allowed`.

Positions are aligned to the right when Lq != Lk: query i sits at key position
i + (Lk - Lq), so the last query sees every key (incremental decoding).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from recattn.attention import biases


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["key_valid"],
    meta_fields=["causal", "window", "num_targets"])
@dataclasses.dataclass(frozen=True)
class Mask:
  """Which keys each query attends to.

  Attributes:
    causal: query at position p sees key j only if j <= p; False gives
      bidirectional attention (cloze models such as BERT4Rec).
    key_valid: `[B, Lk]` bool, False for padding keys; None = all valid.
    window: if set, query p sees only keys j with p - window < j (the last
      `window` items, itself included); needs `causal`.
    num_targets: if set, the last `num_targets` positions are candidates
      (target-aware attention): a candidate sees the history and itself but
      no other candidate; history positions never see candidates.
  """

  causal: bool = True
  key_valid: jax.Array | None = None
  window: int | None = None
  num_targets: int | None = None

  def __post_init__(self):
    if self.window is not None and (not self.causal or self.window < 1):
      raise ValueError(f"Mask.window={self.window!r} needs causal=True and "
                       "window >= 1")
    if self.num_targets is not None and self.num_targets < 1:
      raise ValueError(f"Mask.num_targets={self.num_targets!r} must be >= 1")

  def allowed(self, q_pos: jax.Array, k_pos: jax.Array,
              k_len: int) -> jax.Array:
    """Visibility of keys `k_pos` from queries at key-aligned `q_pos`.

    Args:
      q_pos: `[Tq]` int, query positions already shifted to key coordinates.
      k_pos: `[Tk]` int key positions (may run past `k_len` in a padded tile;
        those are masked out).
      k_len: number of real keys.

    Returns:
      `[B|1, 1, Tq, Tk]` bool.
    """
    q = q_pos[:, None]
    k = k_pos[None, :]
    mask = None

    def both(a, b):
      return b if a is None else jnp.logical_and(a, b)

    if self.causal:
      mask = k <= q
    if self.window is not None:
      mask = both(mask, k > q - self.window)
    if self.num_targets is not None:
      first = k_len - self.num_targets
      k_cand = k >= first
      q_cand = q >= first
      # candidates: history + itself; history: never a candidate key
      mask = both(mask, jnp.where(k_cand, q_cand & (k == q), True))
    in_range = k < k_len  # tiles may run past the last key
    mask = in_range if mask is None else jnp.logical_and(mask, in_range)
    mask = mask[None, None]
    if self.key_valid is not None:
      kv = jnp.take(self.key_valid, jnp.clip(k_pos, 0, k_len - 1), axis=1)
      mask = jnp.logical_and(mask, kv[:, None, None, :])
    return mask

  def dense(self, q_len: int, k_len: int) -> jax.Array | None:
    """Returns the mask as a broadcastable `[B|1, 1, Lq, Lk]` bool, or None."""
    if (not self.causal and self.key_valid is None
        and self.num_targets is None):
      return None
    q_pos = jnp.arange(q_len) + (k_len - q_len)
    k_pos = jnp.arange(k_len)
    return self.allowed(q_pos, k_pos, k_len)


# Causal row blocks (`causal_row_blocks`): below MIN_ROWS queries a split
# does not pay for its extra small ops; MAX_ROW_BLOCKS caps the unrolled
# program (beyond it, `blockwise` is the long-sequence path).
MIN_ROWS = 48
MAX_ROW_BLOCKS = 8


def causal_row_blocks(mask: Mask, q_len: int, k_len: int, *,
                      min_rows: int | None = None
                      ) -> list[tuple[int, int, int, int]]:
  """Static query-row blocks and the keys they can see, for causal masks.

  Query rows [q0, q1) of a causal mask see no key at or past k1 (and, with a
  window, none before k0), so a dense variant can skip the score matrix's
  upper triangle: with n blocks it computes (n + 1) / 2n of it (62.5% for
  L = 200, n = 4). Not causal, or too few rows: one block, all keys.

  `min_rows` (default `MIN_ROWS`) is the fewest rows a block may have:
  variants whose score per pair costs more than a dot product split sooner.
  A block whose queries see no key (Lq > Lk) gets an empty key range.

  Returns:
    `[(q0, q1, k0, k1)]` covering queries 0..q_len in order.
  """
  min_rows = min_rows or MIN_ROWS
  n = min(MAX_ROW_BLOCKS, q_len // min_rows) if mask.causal else 1
  if n <= 1:
    return [(0, q_len, 0, k_len)]
  offset = k_len - q_len  # query i sits at key position i + offset
  cuts = [round(i * q_len / n) for i in range(n + 1)]
  out = []
  for q0, q1 in zip(cuts[:-1], cuts[1:]):
    k0 = 0 if mask.window is None else max(0, q0 + offset - mask.window + 1)
    out.append((q0, q1, k0, max(k0, min(k_len, q1 + offset))))
  return out


def causal_row_tiles(mask: Mask, bias, q_len: int, k_len: int, *,
                     min_rows: int | None = None):
  """Yields `(q0, q1, k0, k1, allowed, bias_tile)` per causal row block.

  `allowed` `[B|1, 1, q1 - q0, k1 - k0]` and the dense `bias_tile` (or None)
  cover that block's queries and keys, in key coordinates as `Mask.allowed`.
  """
  for q0, q1, k0, k1 in causal_row_blocks(mask, q_len, k_len,
                                          min_rows=min_rows):
    q_pos = jnp.arange(q0, q1) + (k_len - q_len)
    k_pos = jnp.arange(k0, k1)
    yield (q0, q1, k0, k1, mask.allowed(q_pos, k_pos, k_len),
           biases.tile(bias, q_pos, k_pos, k_len))
