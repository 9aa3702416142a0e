"""HSTU pointwise aggregated attention: out = silu(alpha Q K^T + rab) / n V.

Zhai et al., "Actions Speak Louder than Words: Trillion-Parameter Sequential
Transducers for Generative Recommendations", ICML 2024.

No softmax: each visible (query, key) pair gets the weight
silu(alpha q.k + rab(q, k)) / n, masked pairs get exactly 0, and the weights
of a query need not sum to 1 (the paper argues this keeps the intensity of a
user's engagement, which softmax normalises away). A query with no visible
key outputs zeros. `rab` (relative attention bias: position and time
buckets, see `relative.py`) comes through the common `bias` argument. The
HSTU block around this function (LayerNorm, the silu projection to U, V, Q,
K, the gating `U * LayerNorm(out)` and the output projection) lives in
`models/`; `v` may have a different head size than `q` and `k` (HSTU's
linear vs attention dim).

Choices, checked against facebookresearch/generative-recommenders:
  * alpha defaults to 1/sqrt(Dh) (Dh = head size of q and k), as in their
    current `STULayer` (`attn_alpha = 1 / attention_dim**0.5`). Their research
    code (`research/modeling/sequential/hstu.py`, used for the paper's
    public-dataset results) applies no scale: pass `alpha=1.0` to match it.
  * n: `normalizer="padded"` divides by the padded key length Lk, as both
    their codebases do (`silu(...) / max_seq_len`), so a short sequence's
    outputs shrink with the padding; `normalizer="true"` divides each query
    by its number of visible keys (at least 1), which makes the output
    independent of how much padding a batch has.
  * rab is added after the alpha scaling: silu(alpha q.k + rab).

Kernels (`impl`): on a GPU, `impl="auto"` runs the Pallas (Triton) kernels
of `hstu_pallas` (forward and backward, O(L) memory) whenever they support
the call (no rab bias, Lq == Lk, no window or target mask, power-of-two head
sizes; see `hstu_pallas.supported`) and no weights are asked for; elsewhere,
and always with `impl="xla"`, the XLA paths below run.

Time O(B H Lq Lk (Dh + Dv)); without weights, `by_rows` skips the keys
causal row blocks cannot see. Memory: the reference builds the
`[B, H, Lq, Lk]` weights; `block_k=T` instead scans over key blocks of T
(a plain sum, since there is no softmax to renormalise), holding
O(B H Lq T) at a time, with the block recomputed in the backward pass
(`jax.checkpoint`), so memory is O(B H Lq (T + Dv)).
"""

import math
import numbers

import jax
import jax.numpy as jnp

from recattn.attention import biases
from recattn.attention import hstu_pallas
from recattn.attention import masks
from recattn.attention import weights as weights_lib
from recattn.attention.masks import Mask

NORMALIZERS = ("padded", "true")
IMPLS = ("auto", "xla", "pallas")


def _visible_counts(allowed, q_len: int, k_len: int) -> jax.Array:
  """Visible keys per query, `[B|1, 1, Lq, 1]`, at least 1."""
  if allowed is None:
    return jnp.full((1, 1, q_len, 1), k_len)
  count = jnp.sum(allowed, axis=-1, keepdims=True)
  return jnp.maximum(count, 1)


def reference(q, k, v, mask: Mask, bias=None, *, alpha: float,
              normalizer: str = "padded"):
  """Readable reference implementation; returns (out, weights).

  Args:
    q: `[B, Lq, H, Dh]`; k: `[B, Lk, H, Dh]`; v: `[B, Lk, H, Dv]`.
    mask: which keys each query sees.
    bias: None, an array broadcastable to `[B, H, Lq, Lk]` or a `Bias`.
    alpha: scale of Q K^T.
    normalizer: "padded" (divide by Lk) or "true" (by visible keys).

  Returns:
    out `[B, Lq, H, Dv]` and weights `[B, H, Lq, Lk]`.
  """
  q_len, k_len = q.shape[1], k.shape[1]
  out, weights = _silu_tile(*_heads_first(q, k, v), mask.dense(q_len, k_len),
                            biases.dense(bias, q_len, k_len), alpha=alpha,
                            normalizer=normalizer, k_len=k_len)
  return jnp.swapaxes(out, 1, 2), weights


def _heads_first(*xs):
  """`[B, L, H, D]` -> `[B, H, L, D]`: one transpose per tensor, instead of
  one per row block and einsum (XLA:CPU copies each slice it contracts)."""
  return tuple(jnp.swapaxes(x, 1, 2) for x in xs)


def _silu_tile(qh, kh, vh, allowed, bias, *, alpha, normalizer, k_len):
  """silu attention of queries over keys in `[B, H, L, D]` layout; returns
  (out `[B, H, Tq, Dv]`, weights).

  `allowed` `[B|1, 1, Tq, Tk]` or None and `bias` (dense) cover these
  queries and keys; `k_len` is the whole sequence's key count ("padded").
  """
  logits = biases.add(jnp.einsum("bhqd,bhkd->bhqk", qh, kh) * alpha, bias)
  weights = jax.nn.silu(logits)
  if allowed is not None:
    weights = jnp.where(allowed, weights, 0.0)
  if normalizer == "padded":  # a product: XLA:CPU divides elementwise
    weights = weights * (1.0 / k_len)
  else:
    weights = weights * (1.0 / _visible_counts(
        allowed, qh.shape[2], kh.shape[2]).astype(weights.dtype))
  out = jnp.einsum("bhqk,bhkd->bhqd", weights, vh)
  return out, weights


def by_rows(q, k, v, mask: Mask, bias=None, *, alpha: float,
            normalizer: str = "padded") -> jax.Array:
  """`reference`'s output, one causal row block at a time (no weights).

  Skips the keys a block of queries cannot see (`masks.causal_row_blocks`);
  a row's visible keys all lie in its block's key range, so the "true"
  normaliser's counts are unchanged.
  """
  q_len, k_len = q.shape[1], k.shape[1]
  qh, kh, vh = _heads_first(q, k, v)
  outs = [_silu_tile(qh[:, :, q0:q1], kh[:, :, k0:k1], vh[:, :, k0:k1],
                     allowed, tile, alpha=alpha, normalizer=normalizer,
                     k_len=k_len)[0]
          for q0, q1, k0, k1, allowed, tile in masks.causal_row_tiles(
              mask, bias, q_len, k_len)]
  return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2)


def blockwise(q, k, v, mask: Mask, bias=None, *, alpha: float,
              normalizer: str = "padded", block_k: int = 128):
  """O(L)-memory path: a scan over key blocks of `block_k`; returns out."""
  batch, q_len, heads, _ = q.shape
  k_len, dv = k.shape[1], v.shape[-1]
  num_blocks = -(-k_len // block_k)
  pad = num_blocks * block_k - k_len

  def blocks(x):  # [B, Lk, H, D] -> [num_blocks, B, block_k, H, D]
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    x = x.reshape(batch, num_blocks, block_k, heads, x.shape[-1])
    return jnp.moveaxis(x, 1, 0)

  q_pos = jnp.arange(q_len) + (k_len - q_len)
  acc_dtype = jnp.promote_types(v.dtype, jnp.float32)

  @jax.checkpoint
  def step(carry, xs):
    acc, count = carry
    k_blk, v_blk, start = xs
    k_pos = start + jnp.arange(block_k)
    allowed = mask.allowed(q_pos, k_pos, k_len)  # [B|1, 1, Lq, T]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k_blk) * alpha
    logits = biases.add(logits, biases.tile(bias, q_pos, k_pos, k_len))
    w = jnp.where(allowed, jax.nn.silu(logits), 0.0)
    acc = acc + jnp.einsum("bhqk,bkhd->bqhd", w, v_blk,
                           preferred_element_type=acc_dtype)
    count = count + jnp.sum(allowed, axis=-1)  # [B, 1, Lq]
    return (acc, count), None

  init = (jnp.zeros((batch, q_len, heads, dv), acc_dtype),
          jnp.zeros((batch, 1, q_len), jnp.int32))
  starts = jnp.arange(num_blocks) * block_k
  (acc, count), _ = jax.lax.scan(step, init, (blocks(k), blocks(v), starts))
  if normalizer == "padded":
    out = acc / k_len
  else:
    count = jnp.maximum(count, 1)[:, 0, :, None, None]  # [B, Lq, 1, 1]
    out = acc / count.astype(acc_dtype)
  return out.astype(v.dtype)


def hstu(
    q: jax.Array,  # [B, Lq, H, Dh]
    k: jax.Array,  # [B, Lk, H, Dh]
    v: jax.Array,  # [B, Lk, H, Dv]
    mask: Mask,
    bias=None,  # None | [B|1, H|1, Lq, Lk] | biases.Bias
    *,
    alpha: float | None = None,
    normalizer: str = "padded",
    block_k: int | None = None,
    return_weights: bool = False,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array | None]:
  """HSTU pointwise attention; see the module docstring.

  Args:
    q, k, v: projected heads; v may have its own head size Dv.
    mask: which keys each query sees (causal, padding, window, targets).
    bias: rab, dense or a `biases.Bias` (e.g. `relative.combine(...)`).
    alpha: scale of Q K^T; None = 1/sqrt(Dh).
    normalizer: "padded" divides by Lk (generative-recommenders), "true" by
      each query's number of visible keys (at least 1).
    block_k: if set, scan over key blocks of this size (O(L) memory)
      instead of building the `[B, H, Lq, Lk]` weights.
    return_weights: also return the weights A `[B, H, Lq, Lk]` (through the
      reference, whatever `block_k`).
    impl: "auto" runs the Pallas kernels (`hstu_pallas`) on a GPU when they
      support the call and `return_weights` is False, else the XLA paths;
      "xla" always the XLA paths (`by_rows`, the reference one causal row
      block at a time, or the `block_k` scan);
      "pallas" requires the kernels (ValueError with the reason otherwise;
      on CPU they run in Pallas' interpreter, for tests). The kernels ignore
      `block_k`.

  Returns:
    (out `[B, Lq, H, Dv]`, weights or None).
  """
  if normalizer not in NORMALIZERS:
    raise ValueError(f"hstu: normalizer={normalizer!r}; valid: {NORMALIZERS}")
  if block_k is not None and block_k < 1:
    raise ValueError(f"hstu: block_k={block_k!r} must be >= 1")
  if impl not in IMPLS:
    raise ValueError(f"hstu: impl={impl!r}; valid: {IMPLS}")
  if alpha is None:
    alpha = 1.0 / math.sqrt(q.shape[-1])
  on_gpu = jax.default_backend() == "gpu"
  if impl == "pallas" or (impl == "auto" and on_gpu):
    reason = hstu_pallas.supported(q, k, v, mask, bias, interpret=not on_gpu)
    if return_weights:
      reason = "return_weights needs the XLA reference"
    elif not isinstance(alpha, numbers.Real):
      reason = f"alpha must be a Python number, got {type(alpha).__name__}"
    if reason is None:
      return hstu_pallas.attention(
          q, k, v, alpha=alpha, normalizer=normalizer, causal=mask.causal,
          key_valid=mask.key_valid, interpret=not on_gpu), None
    if impl == "pallas":
      raise ValueError(f"hstu: impl='pallas' cannot run: {reason}")
  if return_weights:
    weights_lib.check_fits("hstu", q.shape[0], q.shape[2], q.shape[1],
                           k.shape[1])
    return reference(q, k, v, mask, bias, alpha=alpha, normalizer=normalizer)
  if block_k is not None:
    return blockwise(q, k, v, mask, bias, alpha=alpha, normalizer=normalizer,
                     block_k=block_k), None
  return by_rows(q, k, v, mask, bias, alpha=alpha, normalizer=normalizer), None
