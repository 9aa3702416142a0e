"""BSARec: self-attention beside a frequency-domain filter.

Shin et al., "An Attentive Inductive Bias for Sequential Recommendation
beyond the Self-Attention", AAAI 2024. Each block mixes two views of its
input `x`, then a feed-forward layer (LayerNorm after each residual):

  low  = irfft(rfft(x)[:c])                 # the c lowest frequencies
  dsp  = LN(x + dropout(low + beta^2 * (x - low)))   # beta: [D], learned
  gsp  = LN(x + dropout(attention(x)))
  h    = alpha * dsp + (1 - alpha) * gsp
  out  = LN(h + dropout(W2 gelu(W1 h)))

with `c = bsarec_c // 2 + 1` frequency bins over the window of `max_len`
(BSARec's `--c`); the embedding is LN(item + position) with dropout. Any
registered attention variant can stand in for the attention
(`model.attention`).

The filter runs over the whole window, later items included: a state at
position t depends on items after t. BSARec therefore trains on one row per
target, scored at its last position (`data.train_windows="prefixes"`, which
the config check requires), and scores the next item at the last position,
as the evaluators and the serving engine's full-window path do. Window
positions are counted from the newest item and padding states are zero
after every block, so the filter is the fixed `[max_len, max_len]` low-pass
operator restricted to the window: the same function for every bucketed
window width. (BSARec's own padding positions carry their position
embeddings through the blocks and into the filter; here they contribute
nothing.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recattn import dropout as dropout_lib
from recattn.models import base
from recattn.models import sasrec


@functools.lru_cache(maxsize=None)
def low_pass_matrix(length: int, keep: int) -> np.ndarray:
  """`P [length, length]`: `P @ x` keeps the `keep` lowest rfft bins of x.

  `irfft(mask * rfft(x, norm="ortho"), norm="ortho")` along the sequence,
  written as the matrix it is (x's columns are independent signals).
  """
  spectrum = np.fft.rfft(np.eye(length), axis=0, norm="ortho")
  spectrum[keep:] = 0
  matrix = np.fft.irfft(spectrum, n=length, axis=0, norm="ortho")
  matrix.flags.writeable = False
  return matrix


def _dense(n_in: int, n_out: int, rngs) -> base.Dense:
  # BSARec's init (BERT's): weights N(0, 0.02), biases zero.
  return base.Dense(n_in, n_out, kernel_init=nnx.initializers.normal(0.02),
                    rngs=rngs)


def _layer_norm(dim: int, rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=1e-12, rngs=rngs)


class BSARecBlock(nnx.Module):
  """One BSARec block (see the module docstring)."""

  def __init__(self, dim, num_heads, ffn_dim, dropout, variant, *, alpha,
               keep, max_len, rngs, attn_config=None, qk_dim=0):
    self.alpha = alpha
    self.keep = keep
    self.max_len = max_len
    self.attn = sasrec.MultiHeadAttention(dim, num_heads, variant,
                                          attn_config, qk_dim=qk_dim,
                                          rngs=rngs)
    self.attn.qkv = _dense(dim, self.attn.qkv.kernel.shape[1], rngs)
    self.attn.out = _dense(self.attn.out.kernel.shape[0], dim, rngs)
    # BSARec draws sqrt(beta) from N(0, 1).
    self.sqrt_beta = nnx.Param(jax.random.normal(rngs.params(), (dim,)))
    self.ln_filter = _layer_norm(dim, rngs)
    self.ln_attn = _layer_norm(dim, rngs)
    self.ln_ffn = _layer_norm(dim, rngs)
    self.ffn_in = _dense(dim, ffn_dim, rngs)
    self.ffn_out = _dense(ffn_dim, dim, rngs)
    self.dropout = dropout_lib.Dropout(dropout)

  def _drop(self, x, rngs):
    return self.dropout(x, rngs=rngs, deterministic=rngs is None)

  def __call__(self, x, mask, bias=None, *, rngs, return_weights=False,
               last=None):
    """`x [B, L, D]` -> `[B, L, D]`, or `[B, last, D]` with `last`: only the
    last `last` positions' outputs (the filter and the attention's keys
    and values still see all of `x`)."""
    length = x.shape[1]
    if length > self.max_len:
      raise ValueError(f"BSARec block: window of {length} items exceeds "
                       f"max_len={self.max_len}")
    rows = last or length
    # Window position i is position max_len - length + i of the filter.
    p = low_pass_matrix(self.max_len, self.keep)[self.max_len - rows:,
                                                  self.max_len - length:]
    xq = x if last is None else x[:, -last:]
    low = jnp.einsum("qk,bkd->bqd", jnp.asarray(p, x.dtype), x)
    beta = self.sqrt_beta[...] ** 2
    dsp = self.ln_filter(xq + self._drop(low + beta * (xq - low), rngs))
    a, w = self.attn(xq, mask, bias, kv=None if last is None else x,
                     return_weights=return_weights, rngs=rngs)
    gsp = self.ln_attn(xq + self._drop(a, rngs))
    h = self.alpha * dsp + (1 - self.alpha) * gsp
    y = self.ffn_out(jax.nn.gelu(self.ffn_in(h), approximate=False))
    return self.ln_ffn(h + self._drop(y, rngs)), w


class BSARec(base.SequenceRecommender):
  """BSARec encoder over item sequences; `encode` gives `[B, L, D]` states
  (each may depend on the whole window: see the module docstring)."""

  # States depend on later items: train per prefix, score at the last
  # position only (`config_check` requires it).
  causal = False

  def __init__(
      self,
      *,
      num_items: int,
      max_len: int,
      dim: int,
      num_blocks: int,
      num_heads: int,
      ffn_dim: int,
      dropout: float,
      alpha: float = 0.7,
      c: int = 5,
      attention: str = "scaled_dot",
      l2_norm: bool = False,
      attn_config=None,
      rel_bias: str = "none",
      remat: bool = False,
      positions: str = "right",
      rank_head: bool = False,
      qk_dim: int = 0,
      item_attributes=None,
      rngs: nnx.Rngs,
  ):
    if positions != "right":
      raise ValueError(f"model.positions={positions!r}: BSARec's filter "
                       "works on windows aligned at the newest item; "
                       "allowed value: 'right'")
    if rank_head:
      raise ValueError("model.rank_head=True: BSARec's states depend on "
                       "later items, so candidates cannot be scored after "
                       "a cached history; allowed value: False")
    if not 0.0 <= alpha <= 1.0:
      raise ValueError(f"model.bsarec_alpha={alpha!r}: must be in [0, 1]")
    if c < 1:
      raise ValueError(f"model.bsarec_c={c!r}: must be >= 1")
    super().__init__(num_items=num_items, max_len=max_len, dim=dim,
                     dropout=dropout, l2_norm=l2_norm, num_heads=num_heads,
                     rel_bias=rel_bias, remat=remat, positions=positions,
                     item_attributes=item_attributes, rngs=rngs)
    self.emb_ln = _layer_norm(dim, rngs)
    self.blocks = nnx.List([
        BSARecBlock(dim, num_heads, ffn_dim, dropout, attention, alpha=alpha,
                    keep=c // 2 + 1, max_len=max_len, rngs=rngs,
                    attn_config=attn_config, qk_dim=qk_dim)
        for _ in range(num_blocks)
    ])

  @classmethod
  def from_config(cls, model_config, *, num_items, max_len, rngs,
                  item_attributes=None):
    get = model_config.get
    return cls(num_items=num_items, max_len=max_len,
               **cls.common_kwargs(model_config),
               item_attributes=item_attributes,
               ffn_dim=get("ffn_dim", 0) or 4 * model_config.dim,
               alpha=get("bsarec_alpha", 0.7), c=get("bsarec_c", 5),
               qk_dim=get("qk_dim", 0), rngs=rngs)

  def embed(self, items: jax.Array, rngs: nnx.Rngs | None):
    """LN(item + position) with dropout (no sqrt(d) scale), zero at padding.

    Returns `(x [B, L, D], valid [B, L] bool)`.
    """
    valid = items > 0
    table = self.pos_embedding.embedding[...]
    x = self.item_rows(items) + table[table.shape[0] - items.shape[1]:]
    x = self.dropout(self.emb_ln(x), rngs=rngs, deterministic=rngs is None)
    return x * valid[..., None].astype(x.dtype), valid
