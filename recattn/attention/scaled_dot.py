"""Softmax attention: `dot` (unscaled) and `scaled_dot`.

  scaled_dot: softmax(Q K^T / (tau sqrt(d_k)) + bias) V
              (Vaswani et al., "Attention Is All You Need", NeurIPS 2017);
  dot:        softmax(Q K^T + bias) V (Luong et al., "Effective Approaches to
              Attention-based Neural Machine Translation", EMNLP 2015).

Time O(B H Lq Lk d_k); memory O(B H Lq Lk) for the score matrix (see
`blockwise` for the O(L)-memory form of the same function).

Kernel choice happens here, in one place:
* GPU: `jax.nn.dot_product_attention` with cuDNN's fused kernel when dtype
  (fp16/bf16), head size (<= 128, multiple of 8), mask and options allow it;
  otherwise XLA, with a one-time log line that says why.
* attention weights or attention-weight dropout: the explicit `reference`
  (einsums in `[B, H, L, D]` layout: on XLA:CPU about 10% faster than
  `jax.nn.dot_product_attention`'s XLA path at SASRec shapes; the fused
  kernels never materialise weights).
* CPU/TPU otherwise: `by_rows`, the reference one causal row block at a
  time, skipping keys no query of the block can see.
"""

import math

from absl import logging
import jax
import jax.numpy as jnp

from recattn import dropout as dropout_lib
from recattn.attention import biases
from recattn.attention import masks
from recattn.attention import weights as weights_lib
from recattn.attention.masks import Mask

_warned: set[str] = set()


def _softmax_tile(qh, kh, vh, allowed, bias, dropout_rate=0.0,
                  dropout_rng=None):
  """softmax attention in `[B, H, L, D]` layout; returns (out, weights).

  `qh` is already scaled; `allowed` `[B|1, 1, Tq, Tk]` or None; `bias` dense.
  """
  logits = biases.add(jnp.einsum("bhqd,bhkd->bhqk", qh, kh), bias)
  if allowed is not None:
    logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if allowed is not None:
    # Queries with no visible key (left padding) get zeros, not a uniform
    # average over padding.
    weights = jnp.where(allowed, weights, 0.0)
  if dropout_rate:
    weights = dropout_lib.apply(weights, dropout_rate, dropout_rng)
  out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(vh.dtype), vh)
  return out, weights


def _heads_first(q, k, v, scale):
  return (jnp.swapaxes(q, 1, 2) * jnp.asarray(scale, q.dtype),
          jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))


def reference(q, k, v, mask: Mask, bias=None, *, scale: float,
              dropout_rate: float = 0.0, dropout_rng=None):
  """Readable reference implementation; returns (out, weights).

  Computed in `[B, H, L, D]` layout, which XLA:CPU runs faster than
  `[B, L, H, D]`; unused weights are dropped by the compiler.
  """
  qh, kh, vh = _heads_first(q, k, v, scale)
  out, weights = _softmax_tile(
      qh, kh, vh, mask.dense(q.shape[1], k.shape[1]),
      biases.dense(bias, q.shape[1], k.shape[1]), dropout_rate, dropout_rng)
  return jnp.swapaxes(out, 1, 2), weights


def by_rows(q, k, v, mask: Mask, bias=None, *, scale: float) -> jax.Array:
  """`reference`'s output, one causal row block at a time (no weights).

  Skips the keys a block of queries cannot see (`masks.causal_row_blocks`):
  on XLA:CPU at L = 200 the attention's forward and backward take about
  0.6x the time of the whole score matrix.
  """
  qh, kh, vh = _heads_first(q, k, v, scale)
  q_len, k_len = q.shape[1], k.shape[1]
  outs = [_softmax_tile(qh[:, :, q0:q1], kh[:, :, k0:k1], vh[:, :, k0:k1],
                        allowed, tile)[0]
          for q0, q1, k0, k1, allowed, tile in masks.causal_row_tiles(
              mask, bias, q_len, k_len)]
  return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2)


def cudnn_status(q: jax.Array, k: jax.Array, mask: Mask,
                 bias) -> str | None:
  """None when cuDNN's fused attention applies to these inputs, else why not."""
  if jax.default_backend() != "gpu":
    return f"backend is {jax.default_backend()}"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (cuDNN needs bf16 or fp16)"
  d = q.shape[-1]
  if d > 128 or d % 8:
    return f"head size {d} (cuDNN needs <= 128 and a multiple of 8)"
  if mask.num_targets is not None:
    return "target-aware mask (needs a dense mask)"
  if mask.causal and q.shape[1] != k.shape[1]:
    return "causal with Lq != Lk (cuDNN aligns the mask top-left)"
  if isinstance(bias, biases.Bias):
    return "tiled bias"
  return None


def _note_fallback(reason: str) -> None:
  if reason not in _warned:
    _warned.add(reason)
    logging.warning("scaled_dot: XLA attention instead of cuDNN: %s", reason)


def _cudnn(q, k, v, mask: Mask, bias, *, scale: float) -> jax.Array:
  """cuDNN's fused attention through `jax.nn.dot_product_attention`."""
  key_valid = None
  if mask.key_valid is not None:
    # jax hands cuDNN the mask as a bias, which must have the full
    # [B, 1, Lq, Lk] sequence dims (a [B, 1, 1, Lk] one is refused). Padding
    # is on the left of recattn's windows, so sequence lengths cannot say it.
    key_valid = jnp.broadcast_to(mask.key_valid[:, None, None, :],
                                 (q.shape[0], 1, q.shape[1], k.shape[1]))
  if bias is not None:
    bias = jnp.broadcast_to(bias, bias.shape[:2] + (q.shape[1], k.shape[1]))
  window = None if mask.window is None else (mask.window - 1, 0)
  return jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=key_valid, scale=scale, is_causal=mask.causal,
      local_window_size=window, implementation="cudnn")


def _attention(q, k, v, mask, bias, *, scale, return_weights, dropout_rate,
               dropout_rng, name):
  if return_weights:
    weights_lib.check_fits(name, q.shape[0], q.shape[2], q.shape[1],
                           k.shape[1])
  if return_weights or dropout_rate:
    out, weights = reference(q, k, v, mask, bias, scale=scale,
                             dropout_rate=dropout_rate,
                             dropout_rng=dropout_rng)
    return out, (weights if return_weights else None)
  if jax.default_backend() != "gpu":
    return by_rows(q, k, v, mask, bias, scale=scale), None
  reason = cudnn_status(q, k, mask, bias)
  if reason is None:
    try:
      return _cudnn(q, k, v, mask, bias, scale=scale), None
    except ValueError as e:  # shapes cuDNN refuses at trace time
      reason = f"cuDNN refused the call: {str(e).splitlines()[0][:200]}"
  _note_fallback(reason)
  return reference(q, k, v, mask, bias, scale=scale)[0], None


def scaled_dot(
    q: jax.Array,  # [B, Lq, H, Dh]
    k: jax.Array,  # [B, Lk, H, Dh]
    v: jax.Array,  # [B, Lk, H, Dh]
    mask: Mask,
    bias=None,  # [B|1, H|1, Lq, Lk] array or biases.Bias
    *,
    temperature: float = 1.0,
    return_weights: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """softmax(Q K^T / (temperature sqrt(d_k)) + bias) V; see module docstring.

  `dropout_rate` > 0 (with `dropout_rng`) drops attention weights, as
  PyTorch's MultiheadAttention(dropout=...) used by SASRec implementations.
  """
  scale = 1.0 / (temperature * math.sqrt(q.shape[-1]))
  return _attention(q, k, v, mask, bias, scale=scale,
                    return_weights=return_weights, dropout_rate=dropout_rate,
                    dropout_rng=dropout_rng, name="scaled_dot")


def dot(q, k, v, mask: Mask, bias=None, *, return_weights: bool = False,
        dropout_rate: float = 0.0, dropout_rng=None):
  """softmax(Q K^T + bias) V: `scaled_dot` without the 1/sqrt(d_k) scale."""
  return _attention(q, k, v, mask, bias, scale=1.0,
                    return_weights=return_weights, dropout_rate=dropout_rate,
                    dropout_rng=dropout_rng, name="dot")
