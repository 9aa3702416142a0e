"""Scaled dot-product attention: softmax(Q K^T / (tau sqrt(d_k))) V.

Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
Time O(B H Lq Lk d_k); memory O(B H Lq Lk) for the score matrix.

The fast path is `jax.nn.dot_product_attention`, which picks cuDNN's fused
kernel on GPU when dtype (fp16/bf16) and head size allow it and XLA
otherwise. When attention weights are requested the explicit reference path
runs instead, because the fused kernels never materialise them.
"""

import math

import jax
import jax.numpy as jnp

from recattn.attention.masks import Mask


def reference(q, k, v, mask: Mask, bias=None, *, scale: float):
  """Readable reference implementation; returns (out, weights)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if bias is not None:
    logits = logits + bias
  dense = mask.dense(q.shape[1], k.shape[1])
  if dense is not None:
    logits = jnp.where(dense, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if dense is not None:
    # Queries with no visible key (left padding) get zeros, not a uniform
    # average over padding.
    weights = jnp.where(dense, weights, 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
  return out, weights


def scaled_dot(
    q: jax.Array,  # [B, Lq, H, Dh]
    k: jax.Array,  # [B, Lk, H, Dh]
    v: jax.Array,  # [B, Lk, H, Dh]
    mask: Mask,
    bias: jax.Array | None = None,  # [B|1, H|1, Lq, Lk]
    *,
    temperature: float = 1.0,
    return_weights: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
  """Scaled dot-product attention; see the module docstring."""
  scale = 1.0 / (temperature * math.sqrt(q.shape[-1]))
  if return_weights:
    return reference(q, k, v, mask, bias, scale=scale)
  dense_mask = None
  if mask.key_valid is not None:
    dense_mask = mask.key_valid[:, None, None, :]
  out = jax.nn.dot_product_attention(
      q,
      k,
      v,
      bias=bias,
      mask=dense_mask,
      scale=scale,
      is_causal=mask.causal,
  )
  return out, None
