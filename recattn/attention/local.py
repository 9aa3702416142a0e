"""Local (sliding-window) attention: each query sees its last `window` items.

  out_p = sum_{p - w < j <= p} softmax_j(q_p . k_j / (tau sqrt(d_k)) + b_pj) v_j

over visible keys (causal, not padding, and whatever else the `Mask` says).
The sequence is cut into blocks of `w` queries; block b only needs key blocks
b - 1 and b, so each query block attends to a `[w, 2w]` tile, masked by
`Mask.allowed` (with the window) and biased by `biases.tile`:

  time O(B H L w d_k), memory O(B H L w) (forward and backward),

instead of the O(L^2) of full attention. With `return_weights=True` the
dense path (`scaled_dot.reference` with the windowed mask) runs instead,
after `weights.check_fits`: O(L^2), for interpretability only.

Sliding-window attention goes back to Child et al., "Generating Long Sequences
with Sparse Transformers" (arXiv 2019) and Beltagy et al., "Longformer: The
Long-Document Transformer" (arXiv 2020); in recommendation, He et al.,
"Locker: Locally Constrained Self-Attentive Sequential Recommendation"
(CIKM 2021) restrict attention to recent items the same way.

Lq != Lk is supported: queries sit at key positions i + (Lk - Lq) as in
`masks.Mask`, and only the keys the last Lq queries can see are touched, so
decoding one query costs O(w).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from recattn.attention import biases
from recattn.attention import weights as weights_lib
from recattn.attention.masks import Mask
from recattn.attention.scaled_dot import reference as dense_reference


def _window_mask(mask: Mask, window: int | None) -> Mask:
  """The mask with the effective window (the tighter of the two)."""
  if window is None and mask.window is None:
    raise ValueError("local: set a window, either local(..., window=w) or "
                     "Mask(window=w); both are None")
  if not mask.causal:
    raise ValueError("local: sliding-window attention is causal; got "
                     "Mask(causal=False)")
  if window is not None and window < 1:
    raise ValueError(f"local: window={window!r} must be >= 1")
  w = min(x for x in (window, mask.window) if x is not None)
  return dataclasses.replace(mask, window=w)


def _key_blocks(x, start: int, num_blocks: int, w: int):
  """`x[:, start + t]` for t in [0, num_blocks * w), zero outside [0, Lk).

  Args:
    x: `[B, Lk, ...]`.
    start: key position of the first row (may be negative).
    num_blocks: number of blocks of `w` rows to return.
    w: block size.

  Returns:
    `[B, num_blocks, w, ...]`.
  """
  n = num_blocks * w
  left = max(0, -start)
  x = x[:, max(0, start):]
  right = max(0, n - left - x.shape[1])
  pad = [(0, 0)] * x.ndim
  pad[1] = (left, right)
  x = jnp.pad(x, pad)[:, :n]
  return x.reshape(x.shape[0], num_blocks, w, *x.shape[2:])


def local(
    q: jax.Array,  # [B, Lq, H, Dh]
    k: jax.Array,  # [B, Lk, H, Dh]
    v: jax.Array,  # [B, Lk, H, Dh]
    mask: Mask,
    bias=None,  # None | [B|1, H|1, Lq, Lk] | biases.Bias
    *,
    window: int | None = None,
    temperature: float = 1.0,
    return_weights: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
  """Causal sliding-window softmax attention; see the module docstring.

  Args:
    q: queries `[B, Lq, H, Dh]`.
    k: keys `[B, Lk, H, Dh]`.
    v: values `[B, Lk, H, Dh]`.
    mask: must be causal; its `key_valid` and `num_targets` are honoured.
    bias: additive bias, dense or a `biases.Bias` (evaluated per tile).
    window: number of most recent items each query sees (itself included);
      None uses `mask.window`. If both are set the smaller one wins.
    temperature: logits are divided by `temperature * sqrt(Dh)`.
    return_weights: also return dense `[B, H, Lq, Lk]` weights (O(L^2)).

  Returns:
    `(out [B, Lq, H, Dh], weights or None)`. Queries with no visible key
    output zeros.
  """
  mask = _window_mask(mask, window)
  w = mask.window
  b, lq, h, dh = q.shape
  lk = k.shape[1]
  scale = 1.0 / (temperature * math.sqrt(dh))
  if return_weights:
    weights_lib.check_fits("local", b, h, lq, lk)
    return dense_reference(q, k, v, mask, biases.dense(bias, lq, lk),
                           scale=scale)

  off = lk - lq  # key position of query 0
  nq = -(-lq // w)
  # Query block i holds query positions off + i w + [0, w); it needs keys
  # off + i w - w + [1, 2w), i.e. key blocks i and i + 1 of a key sequence
  # that starts at position off - w.
  qb = jnp.pad(q, [(0, 0), (0, nq * w - lq), (0, 0), (0, 0)])
  qb = qb.reshape(b, nq, w, h, dh)
  kb = _key_blocks(k, off - w, nq + 1, w)
  vb = _key_blocks(v, off - w, nq + 1, w)
  kb = jnp.concatenate([kb[:, :-1], kb[:, 1:]], axis=2)  # [B, nq, 2w, H, Dh]
  vb = jnp.concatenate([vb[:, :-1], vb[:, 1:]], axis=2)

  def tile(i):
    q_pos = off + i * w + jnp.arange(w)
    k_pos = off - w + i * w + jnp.arange(2 * w)
    # Positions before the first key are padding; `allowed` only clips them.
    allowed = jnp.logical_and(mask.allowed(q_pos, k_pos, lk), k_pos >= 0)
    return allowed, biases.tile(bias, q_pos, k_pos, lk)

  allowed, tile_bias = jax.vmap(tile)(jnp.arange(nq))
  allowed = jnp.moveaxis(allowed, 0, 1)  # [B|1, nq, 1, w, 2w]

  logits = jnp.einsum("bnqhd,bnkhd->bnhqk", qb, kb,
                      preferred_element_type=jnp.float32) * scale
  if tile_bias is not None:
    logits = biases.add(logits, jnp.moveaxis(tile_bias, 0, 1))
  logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  m = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
  p = jnp.where(allowed, jnp.exp(logits - m), 0.0)
  denom = p.sum(axis=-1)  # [B, nq, H, w]
  out = jnp.einsum("bnhqk,bnkhd->bnqhd", p.astype(v.dtype), vb,
                   preferred_element_type=jnp.float32)
  denom = jnp.moveaxis(denom, 2, 3)[..., None]  # [B, nq, w, H, 1]
  out = out / jnp.where(denom > 0, denom, 1.0)
  out = out.reshape(b, nq * w, h, -1)[:, :lq]  # values may differ from Dh
  return out.astype(q.dtype), None
