"""HSTU: Hierarchical Sequential Transduction Units.

Zhai et al., "Actions Speak Louder than Words: Trillion-Parameter Sequential
Transducers for Generative Recommendations", ICML 2024. One block:

  U, V, Q, K = split(silu(LN(x) W_uvqk))
  A          = attention(Q, K, V, mask, rab)      # `hstu`: silu(QK^T + rab)/n
  x'         = x + W_o dropout(U * LN(A))

The block replaces the transformer's attention + feed-forward pair: the
gating by U does the feed-forward's work. LayerNorms carry no parameters and
W_uvqk has no bias, as in generative-recommenders' research code (which this
follows for initialisation too: W_uvqk ~ N(0, 0.02), W_o Xavier-uniform).
Any registered variant can stand in for `hstu` (model.attention), e.g. to
compare pointwise with softmax aggregation inside the same block.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from recattn import attention
from recattn import dropout as dropout_lib
from recattn.models import base


def _layer_norm(x, eps=1e-6):
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.var(x, -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


class HSTUBlock(nnx.Module):
  """One HSTU layer (see the module docstring)."""

  def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int,
               dropout: float, variant: str, attn_config=None, *,
               rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.qk_dim = qk_dim
    self.v_dim = v_dim
    self.uvqk = base.Dense(
        dim, num_heads * (2 * v_dim + 2 * qk_dim), use_bias=False,
        kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.out = base.Dense(num_heads * v_dim, dim,
                          kernel_init=nnx.initializers.xavier_uniform(),
                          rngs=rngs)
    self.core = attention.layer(variant, num_heads, qk_dim, attn_config,
                                rngs=rngs)
    self.dropout = dropout_lib.Dropout(dropout)

  def __call__(self, x, mask, bias=None, *, rngs, return_weights=False,
               last=None):
    """`x [B, L, D]` -> `[B, L, D]`, or `[B, last, D]` with `last`: only the
    last `last` positions as queries (keys and values from all of `x`)."""
    b, l, _ = x.shape
    h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
    xn = _layer_norm(x)
    if last is None:
      uvqk = jax.nn.silu(self.uvqk(xn))
      u, v, q, k = jnp.split(uvqk, [h * dv, 2 * h * dv, 2 * h * dv + h * dq],
                             axis=-1)
      lq = l
    else:
      # Columns [u | v | q | k]: u, q for the queries, v, k for all keys.
      kernel = self.uvqk.kernel[...]
      u_cols, v_cols = kernel[:, :h * dv], kernel[:, h * dv:2 * h * dv]
      q_cols = kernel[:, 2 * h * dv:2 * h * dv + h * dq]
      k_cols = kernel[:, -h * dq:]
      uq = jax.nn.silu(base.matmul(xn[:, -last:], jnp.concatenate(
          [u_cols, q_cols], axis=1)))
      vk = jax.nn.silu(base.matmul(xn, jnp.concatenate(
          [v_cols, k_cols], axis=1)))
      u, q = jnp.split(uq, [h * dv], axis=-1)
      v, k = jnp.split(vk, [h * dv], axis=-1)
      x, lq = x[:, -last:], last
    a, w = self.core(q.reshape(b, lq, h, dq), k.reshape(b, l, h, dq),
                     v.reshape(b, l, h, dv), mask, bias,
                     return_weights=return_weights)
    y = u * _layer_norm(a.reshape(b, lq, h * dv))
    y = self.dropout(y, rngs=rngs, deterministic=rngs is None)
    return x + self.out(y), w


class HSTU(base.SequenceRecommender):
  """HSTU encoder over item sequences; `encode` gives `[B, L, D]` states."""

  def __init__(
      self,
      *,
      num_items: int,
      max_len: int,
      dim: int,
      num_blocks: int,
      num_heads: int,
      dropout: float,
      qk_dim: int = 0,
      v_dim: int = 0,
      attention: str = "hstu",
      l2_norm: bool = True,
      attn_config=None,
      rel_bias: str = "position",
      remat: bool = False,
      positions: str = "right",
      rank_head: bool = False,
      item_attributes=None,
      rngs: nnx.Rngs,
  ):
    super().__init__(num_items=num_items, max_len=max_len, dim=dim,
                     dropout=dropout, l2_norm=l2_norm, num_heads=num_heads,
                     rel_bias=rel_bias, remat=remat,
                     positions=positions, rank_head=rank_head,
                     item_attributes=item_attributes, rngs=rngs)
    qk_dim = qk_dim or dim // num_heads
    v_dim = v_dim or dim // num_heads
    self.blocks = nnx.List([
        HSTUBlock(dim, num_heads, qk_dim, v_dim, dropout, attention,
                  attn_config, rngs=rngs)
        for _ in range(num_blocks)
    ])

  @classmethod
  def from_config(cls, model_config, *, num_items, max_len, rngs,
                  item_attributes=None):
    get = model_config.get
    return cls(num_items=num_items, max_len=max_len,
               **cls.common_kwargs(model_config),
               item_attributes=item_attributes,
               qk_dim=get("qk_dim", 0), v_dim=get("v_dim", 0), rngs=rngs)
