"""Blockwise (flash-style) exact attention in O(L) memory.

Computes exactly the scaled dot-product attention

  out = softmax(Q K^T / (tau sqrt(d_k)) + bias) V

without ever building the `[Lq, Lk]` score matrix. Queries are cut into blocks
of `block_q` rows that are processed one after another; for each query block
the key blocks are visited in turn and an online softmax keeps, per query, the
running maximum m, the running sum l of exp(s - m) and the running
unnormalised output acc (Milakov & Gimelshein's online normaliser):

  m' = max(m, rowmax(S_j));  l' = e^(m - m') l + rowsum(e^(S_j - m'))
  acc' = e^(m - m') acc + e^(S_j - m') V_j;  out = acc / l.

The backward pass is hand written (jax.custom_vjp) in the style of
FlashAttention-2: the forward saves only `out` and the per-query log-sum-exp
L = m + log l, and the backward recomputes each tile P = exp(S - L) to form

  dV += P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(dO * O));
  dQ += scale dS K;  dK += scale dS^T Q.

Key blocks are the outer loop of the backward (dK, dV of a key block are the
loop carry) and dQ is accumulated in place, so the backward recomputes every
tile once. Masks and biases are evaluated per tile (`Mask.allowed`,
`biases.tile`); tiles entirely hidden by a causal or sliding-window mask are
skipped through per-block loop bounds.

Complexity: time O(B H Lq Lk d_k) (about half for causal masks, O(B H Lq w d_k)
for a window w); memory O(B H (Lq + Lk) d_k) plus one `[block_q, block_k]`
tile per head, for both the forward and the backward pass.

Gradients flow to q, k, v and to the array leaves of a `biases.Bias` pytree
(e.g. a learned relative-position table): the backward recomputes the bias
tile with `jax.vjp` and accumulates the cotangent of its leaves. A dense bias
array is a constant: differentiating through it raises a ValueError (pass a
`biases.Bias` instead). Temperature and block sizes are static Python numbers.

Papers: Rabe & Staats, "Self-attention Does Not Need O(n^2) Memory", arXiv
2112.05682, 2021; Dao, Fu, Ermon, Rudra & Re, "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness", NeurIPS 2022; Dao,
"FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", ICLR 2024. This is a pure-JAX (XLA loops) version of the
algorithm, not a fused kernel: it buys memory, not speed.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recattn.attention import biases
from recattn.attention.masks import Mask


def reference(q, k, v, mask: Mask, bias=None, *, temperature: float = 1.0):
  """Readable quadratic-memory reference of the same function; returns out."""
  lq, lk = q.shape[1], k.shape[1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / (
      temperature * math.sqrt(q.shape[-1]))
  b = biases.dense(bias, lq, lk)
  if b is not None:
    logits = logits + b
  allowed = mask.allowed(jnp.arange(lq) + (lk - lq), jnp.arange(lk), lk)
  logits = jnp.where(allowed, logits, -jnp.inf)
  weights = jnp.exp(logits - jnp.max(logits, -1, keepdims=True))
  weights = jnp.where(allowed, weights, 0.0)  # rows with no visible key -> 0
  denom = jnp.sum(weights, -1, keepdims=True)
  weights = weights / jnp.where(denom > 0, denom, 1.0)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the custom-vjp core needs that is not an array."""
  scale: float
  block_q: int
  block_k: int
  q_len: int
  k_len: int
  causal: bool
  window: int | None
  num_targets: int | None
  bias_kind: str  # "none" | "dense" | "tree" (array leaves) | "opaque"
  bias_treedef: Any = None
  bias_opaque: Any = None  # a non-pytree Bias, used as a constant

  @property
  def nq(self):
    return -(-self.q_len // self.block_q)

  @property
  def nk(self):
    return -(-self.k_len // self.block_k)

  @property
  def offset(self):  # query index -> key coordinates
    return self.k_len - self.q_len


@jax.custom_vjp
def _no_bias_grad(bias):
  return bias


def _no_bias_grad_fwd(bias):
  return bias, None


def _no_bias_grad_bwd(_, g):
  raise ValueError(
      "blockwise: gradients with respect to a dense bias array are not "
      "supported (they would be O(Lq*Lk)); pass a biases.Bias pytree whose "
      "tile() computes the bias, and its array leaves get gradients")


_no_bias_grad.defvjp(_no_bias_grad_fwd, _no_bias_grad_bwd)


def _bias_tile(st: _Static, leaves, q_pos, k_pos):
  """The `[B|1, H|1, Tq, Tk]` bias tile, or None."""
  if st.bias_kind == "none":
    return None
  if st.bias_kind == "dense":
    return biases.tile(leaves[0], q_pos, k_pos, st.k_len)
  if st.bias_kind == "opaque":
    return biases.tile(st.bias_opaque, q_pos, k_pos, st.k_len)
  bias = jax.tree_util.tree_unflatten(st.bias_treedef, leaves)
  return biases.tile(bias, q_pos, k_pos, st.k_len)


def _allowed(st: _Static, key_valid, q_pos, k_pos):
  """`[B|1, 1, Tq, Tk]` visibility; padded queries see nothing."""
  mask = Mask(causal=st.causal, key_valid=key_valid, window=st.window,
              num_targets=st.num_targets)
  allowed = mask.allowed(q_pos, k_pos, st.k_len)
  q_real = (q_pos - st.offset < st.q_len)[:, None]
  return jnp.logical_and(allowed, q_real)


def _positions(st: _Static, i, j):
  q_pos = i * st.block_q + jnp.arange(st.block_q) + st.offset
  k_pos = j * st.block_k + jnp.arange(st.block_k)
  return q_pos, k_pos


def _key_range(st: _Static, i):
  """Key blocks [lo, hi) that query block i can see at all."""
  lo, hi = jnp.int32(0), jnp.int32(st.nk)
  q_min = i * st.block_q + st.offset
  q_max = q_min + st.block_q - 1
  if st.causal:
    hi = jnp.clip(jnp.floor_divide(q_max, st.block_k) + 1, 0, st.nk)
  if st.window is not None:
    lo = jnp.clip(jnp.floor_divide(q_min - st.window + 1, st.block_k), 0,
                  st.nk)
  return lo, jnp.maximum(hi, lo)


def _query_range(st: _Static, j):
  """Query blocks [lo, hi) that can see some key of key block j."""
  lo, hi = jnp.int32(0), jnp.int32(st.nq)
  k_min = j * st.block_k
  k_max = k_min + st.block_k - 1
  if st.causal:  # need q_max >= k_min
    lo = jnp.clip(jnp.floor_divide(k_min - st.offset, st.block_q), 0, st.nq)
  if st.window is not None:  # need q_min - window + 1 <= k_max
    hi = jnp.clip(
        jnp.floor_divide(k_max + st.window - 1 - st.offset, st.block_q) + 1,
        0, st.nq)
  return lo, jnp.maximum(hi, lo)


def _logits(st, q_blk, k_blk, key_valid, leaves, q_pos, k_pos):
  """Masked float32 logits `[B, H, Tq, Tk]` of one tile and the mask."""
  s = jnp.einsum("bhqd,bhkd->bhqk", q_blk, k_blk,
                 preferred_element_type=jnp.float32) * st.scale
  b = _bias_tile(st, leaves, q_pos, k_pos)
  if b is not None:
    s = s + b.astype(jnp.float32)
  allowed = _allowed(st, key_valid, q_pos, k_pos)
  return jnp.where(allowed, s, -jnp.inf), allowed


def _blocks(x, n, block):
  """`[B, L, H, D]` -> zero-padded `[n, B, H, block, D]`."""
  b, l, h, d = x.shape
  x = jnp.pad(x, ((0, 0), (0, n * block - l), (0, 0), (0, 0)))
  return x.reshape(b, n, block, h, d).transpose(1, 0, 3, 2, 4)


def _unblocks(x, length):
  """`[n, B, H, block, D]` -> `[B, length, H, D]`."""
  n, b, h, block, d = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(b, n * block, h, d)[:, :length]


def _forward(st: _Static, q, k, v, key_valid, leaves):
  """Returns out `[B, Lq, H, Dh]` and lse `[nq, B, H, block_q]` (float32)."""
  qb = _blocks(q, st.nq, st.block_q)
  kb = _blocks(k, st.nk, st.block_k)
  vb = _blocks(v, st.nk, st.block_k)
  b, h, dv = qb.shape[1], qb.shape[2], vb.shape[4]  # values' size may differ

  def query_block(args):
    i, q_blk = args

    def key_block(j, carry):
      m, l, acc = carry
      k_blk = jax.lax.dynamic_index_in_dim(kb, j, keepdims=False)
      v_blk = jax.lax.dynamic_index_in_dim(vb, j, keepdims=False)
      s, allowed = _logits(st, q_blk, k_blk, key_valid, leaves,
                           *_positions(st, i, j))
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # nothing seen yet
      p = jnp.where(allowed, jnp.exp(s - m_safe[..., None]), 0.0)
      corr = jnp.exp(m - m_safe)
      l = l * corr + jnp.sum(p, axis=-1)
      acc = acc * corr[..., None] + jnp.einsum(
          "bhqk,bhkd->bhqd", p.astype(v_blk.dtype), v_blk,
          preferred_element_type=jnp.float32)
      return m_new, l, acc

    init = (jnp.full((b, h, st.block_q), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, st.block_q), jnp.float32),
            jnp.zeros((b, h, st.block_q, dv), jnp.float32))
    lo, hi = _key_range(st, i)
    m, l, acc = jax.lax.fori_loop(lo, hi, key_block, init)
    seen = l > 0  # queries with no visible key output zeros
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
    return out.astype(q.dtype), lse

  out, lse = jax.lax.map(query_block, (jnp.arange(st.nq), qb))
  return _unblocks(out, st.q_len), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st, q, k, v, key_valid, leaves):
  return _forward(st, q, k, v, key_valid, leaves)[0]


def _attention_fwd(st, q, k, v, key_valid, leaves):
  out, lse = _forward(st, q, k, v, key_valid, leaves)
  return out, (q, k, v, key_valid, leaves, out, lse)


def _unbroadcast(x, shape):
  """Sums `x` down to a broadcast-compatible `shape`."""
  x = jnp.sum(x, axis=tuple(range(x.ndim - len(shape))))
  axes = tuple(a for a, n in enumerate(shape) if n == 1 and x.shape[a] != 1)
  return jnp.sum(x, axis=axes, keepdims=True)


def _attention_bwd(st, res, d_out):
  q, k, v, key_valid, leaves, out, lse = res
  qb = _blocks(q, st.nq, st.block_q)
  kb = _blocks(k, st.nk, st.block_k)
  vb = _blocks(v, st.nk, st.block_k)
  dob = _blocks(d_out, st.nq, st.block_q)
  # delta_i = rowsum(dO * O) = sum_j P_ij dP_ij, the softmax Jacobian term.
  delta = jnp.sum(dob.astype(jnp.float32) *
                  _blocks(out, st.nq, st.block_q).astype(jnp.float32), -1)
  tree_grads = st.bias_kind == "tree"
  diff_leaves = [jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves]

  def key_block(carry, args):
    dq, d_leaves = carry
    j, k_blk, v_blk = args
    k_pos = j * st.block_k + jnp.arange(st.block_k)

    def query_block(i, carry):
      dq, d_leaves, dk, dv = carry
      q_blk, do_blk, lse_i, delta_i = (
          jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
          for x in (qb, dob, lse, delta))
      q_pos = i * st.block_q + jnp.arange(st.block_q) + st.offset
      s, allowed = _logits(st, q_blk, k_blk, key_valid, leaves, q_pos, k_pos)
      p = jnp.where(allowed, jnp.exp(s - lse_i[..., None]), 0.0)
      dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p.astype(do_blk.dtype), do_blk,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bhqd,bhkd->bhqk", do_blk, v_blk,
                      preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i[..., None])  # d loss / d logits
      if tree_grads:
        tile, tile_vjp = jax.vjp(
            lambda lv: _bias_tile(st, lv, q_pos, k_pos), leaves)
        (g,) = tile_vjp(_unbroadcast(ds, tile.shape).astype(tile.dtype))
        d_leaves = [a + b.astype(a.dtype) if ok else a
                    for a, b, ok in zip(d_leaves, g, diff_leaves)]
      ds = (ds * st.scale).astype(q_blk.dtype)
      dq_i = jnp.einsum("bhqk,bhkd->bhqd", ds, k_blk,
                        preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_index_in_dim(
          dq, jax.lax.dynamic_index_in_dim(dq, i, keepdims=False) + dq_i, i,
          axis=0)
      dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, q_blk,
                           preferred_element_type=jnp.float32)
      return dq, d_leaves, dk, dv

    lo, hi = _query_range(st, j)
    dq, d_leaves, dk, dv = jax.lax.fori_loop(
        lo, hi, query_block,
        (dq, d_leaves, jnp.zeros(k_blk.shape, jnp.float32),
         jnp.zeros(v_blk.shape, jnp.float32)))
    return (dq, d_leaves), (dk, dv)

  d_leaves0 = [jnp.zeros(x.shape, jnp.float32 if not ok else x.dtype)
               for x, ok in zip(leaves, diff_leaves)] if tree_grads else []
  (dq, d_leaves), (dk, dv) = jax.lax.scan(
      key_block, (jnp.zeros(qb.shape, jnp.float32), d_leaves0),
      (jnp.arange(st.nk), kb, vb))
  dq = _unblocks(dq, st.q_len).astype(q.dtype)
  dk = _unblocks(dk, st.k_len).astype(k.dtype)
  dv = _unblocks(dv, st.k_len).astype(v.dtype)
  if tree_grads:
    d_leaves = [g if ok else np.zeros(x.shape, jax.dtypes.float0)
                for g, x, ok in zip(d_leaves, leaves, diff_leaves)]
  else:  # dense bias: a constant (guarded by _no_bias_grad)
    d_leaves = [jnp.zeros_like(x) for x in leaves]
  d_key_valid = (None if key_valid is None else
                 np.zeros(key_valid.shape, jax.dtypes.float0))
  return dq, dk, dv, d_key_valid, d_leaves


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise(
    q: jax.Array,  # [B, Lq, H, Dh]
    k: jax.Array,  # [B, Lk, H, Dh]
    v: jax.Array,  # [B, Lk, H, Dh]
    mask: Mask,
    bias=None,  # None | [B|1, H|1, Lq, Lk] array | biases.Bias
    *,
    temperature: float = 1.0,
    block_q: int = 128,
    block_k: int = 128,
    return_weights: bool = False,
) -> tuple[jax.Array, None]:
  """Exact softmax attention in O(L) memory; see the module docstring.

  Args:
    q: `[B, Lq, H, Dh]` queries.
    k: `[B, Lk, H, Dh]` keys.
    v: `[B, Lk, H, Dh]` values.
    mask: which keys each query sees; queries that see no key output zeros.
    bias: None, a dense additive bias broadcastable to `[B, H, Lq, Lk]`
      (a constant for differentiation), or a `biases.Bias` evaluated per tile
      (its array leaves get gradients when it is a registered pytree).
    temperature: logits are divided by `temperature * sqrt(Dh)`.
    block_q: query rows per block (capped at Lq); Lq is padded to a multiple.
    block_k: keys per block (capped at Lk); Lk is padded to a multiple.
    return_weights: must be False: blockwise never materialises the weights.

  Returns:
    (out `[B, Lq, H, Dh]` in q's dtype, None).
  """
  if return_weights:
    raise ValueError(
        "blockwise never materialises the [B, H, Lq, Lk] attention weights; "
        "use scaled_dot(..., return_weights=True) to get them")
  if block_q < 1 or block_k < 1:
    raise ValueError(f"blockwise: block_q={block_q} and block_k={block_k} "
                     "must be >= 1")
  lq, lk = q.shape[1], k.shape[1]
  if bias is None:
    kind, treedef, opaque, leaves = "none", None, None, []
  elif isinstance(bias, biases.Bias):
    leaves, treedef = jax.tree_util.tree_flatten(bias)
    if all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves):
      kind, opaque = "tree", None
    else:  # not a registered pytree: evaluated as a constant
      kind, treedef, opaque, leaves = "opaque", None, bias, []
  else:
    kind, treedef, opaque = "dense", None, None
    leaves = [_no_bias_grad(jnp.asarray(bias))]
  st = _Static(
      scale=1.0 / (float(temperature) * math.sqrt(q.shape[-1])),
      block_q=min(block_q, lq), block_k=min(block_k, lk), q_len=lq, k_len=lk,
      causal=mask.causal, window=mask.window, num_targets=mask.num_targets,
      bias_kind=kind, bias_treedef=treedef, bias_opaque=opaque)
  out = _attention(st, q, k, v, mask.key_valid, leaves)
  return out, None
