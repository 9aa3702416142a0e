"""Additive attention biases that plug into every softmax-style variant.

A variant's `bias` argument is either a dense array broadcastable to
`[B, H, Lq, Lk]` or a `Bias`: an object that computes the bias for any tile of
(query, key) positions. Tiled biases keep O(L)-memory variants (blockwise,
local) at O(L) memory: they never build the `[Lq, Lk]` matrix.

Positions passed to `tile` are key coordinates: a query's position is its
index plus (Lk - Lq), as in `masks.Mask`.
"""

import jax
import jax.numpy as jnp


class Bias:
  """Base class: a bias evaluated tile by tile."""

  def tile(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Returns the bias `[B|1, H|1, Tq, Tk]` for positions `[Tq]`, `[Tk]`."""
    raise NotImplementedError


def tile(bias, q_pos: jax.Array, k_pos: jax.Array, k_len: int):
  """The bias for one tile, from a `Bias`, a dense array or None.

  A dense array is sliced (positions past `k_len` read the last key and must
  be masked by the caller).
  """
  if bias is None:
    return None
  if isinstance(bias, Bias):
    return bias.tile(q_pos, k_pos)
  q_len = bias.shape[-2]
  q_idx = jnp.clip(q_pos - (k_len - q_len), 0, q_len - 1)
  k_idx = jnp.clip(k_pos, 0, bias.shape[-1] - 1)
  return jnp.take(jnp.take(bias, q_idx, axis=-2), k_idx, axis=-1)


def dense(bias, q_len: int, k_len: int):
  """The whole `[B|1, H|1, Lq, Lk]` bias (for the quadratic variants)."""
  if bias is None or not isinstance(bias, Bias):
    return bias
  return bias.tile(jnp.arange(q_len) + (k_len - q_len), jnp.arange(k_len))


def add(logits: jax.Array, bias) -> jax.Array:
  """`logits + bias` for a dense bias broadcast over the batch, or None.

  Same value as `+`; the gradient of a bias shared by the batch (`[1, ...]`)
  is summed over the batch by a dot with ones, because XLA:CPU reduces a
  `[B, H, L, L]` cotangent over its leading axis far more slowly (at B=128,
  H=2, L=200 it cost a third of an HSTU block's training step with a
  position bias; `experiments/000_speed_lean_step/cpu_attention_paths.py`).
  """
  if bias is None:
    return logits
  bias = bias.astype(logits.dtype)
  if bias.ndim != logits.ndim or bias.shape[0] != 1 or logits.shape[0] == 1:
    return logits + bias
  batch, shape = logits.shape[0], bias.shape

  @jax.custom_vjp
  def broadcast_add(x, b):
    return x + b

  def fwd(x, b):
    return x + b, None

  def bwd(_, g):
    rows = g.reshape(batch, -1)
    summed = (jnp.ones((1, batch), g.dtype) @ rows).reshape((1,) + g.shape[1:])
    # Any other broadcast axes (e.g. one head's bias for all heads): small.
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and g.shape[a] != 1
                 and a > 0)
    return g, jnp.sum(summed, axis=axes, keepdims=True)

  broadcast_add.defvjp(fwd, bwd)
  return broadcast_add(logits, bias)
