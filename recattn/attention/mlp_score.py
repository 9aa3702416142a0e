"""Attention scored by a small network: Bahdanau's and DIN's.

  additive: e_ij = v_a^T tanh(W_q q_i + W_k k_j),
            out_i = sum_j softmax_j(e_ij) v_j
            (Bahdanau, Cho & Bengio, "Neural Machine Translation by Jointly
            Learning to Align and Translate", ICLR 2015);
  din:      e_ij = MLP([q_i, k_j, q_i - k_j, q_i * k_j]),
            out_i = sum_j w_ij v_j with w = e (DIN's sum pooling, no
            normalisation) or softmax_j(e)
            (Zhou et al., "Deep Interest Network for Click-Through Rate
            Prediction", KDD 2018), the form used for target attention: the
            candidate item is the query, the behaviour history the keys.

Both are evaluated per head (parameters carry a leading head axis), so the
multi-head wrapper applies to them like to any other variant.
Time O(B H Lq Lk d_k d_a). Memory O(B H Lq Lk) for `additive`, which
runs over its hidden units one at a time from `_MIN_ROWS` queries on
(`tanh_scores`), and O(B H Lq Lk d_a) for DIN's hidden layers: use DIN
for target attention (few queries) or short sequences. Causal
self-attention scores one row block at a time and skips the keys a block
cannot see (`masks.causal_row_blocks`, from 8 rows per block: about 0.56
of the pairs at L = 50).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from recattn.attention import biases
from recattn.attention import masks
from recattn.attention import weights as weights_lib
from recattn.attention.masks import Mask


# A pair's score is a hidden layer here, not one dot product, so skipping
# the causal mask's upper triangle pays from a few rows per block on.
_MIN_ROWS = 8


def _pool(scores, v, allowed, bias, normalize: bool):
  """Weights from scores (softmax or DIN's raw), then the weighted values."""
  if normalize:
    scores = biases.add(scores, bias)
    if allowed is not None:
      scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    w = jax.nn.softmax(scores, axis=-1)
  else:
    w = scores
  if allowed is not None:
    w = jnp.where(allowed, w, 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", w, v), w


def _by_rows(score, v, mask, bias, q_len, *, normalize, return_weights):
  """Pooled output, scored one causal row block at a time.

  Args:
    score: `score(q0, q1, k0, k1)` -> `[B, H, q1 - q0, k1 - k0]` scores.
    v: `[B, Lk, H, Dv]` values.
    mask, bias: as for every variant.
    q_len: number of queries.
    normalize: softmax over keys, or raw weights.
    return_weights: one block over all keys, weights returned.

  Returns:
    `(out [B, Lq, H, Dv], weights [B, H, Lq, Lk] or None)`.
  """
  k_len = v.shape[1]
  if return_weights:
    w_all = _pool(score(0, q_len, 0, k_len), v, mask.dense(q_len, k_len),
                  biases.dense(bias, q_len, k_len), normalize)
    return w_all
  outs = []
  for q0, q1, k0, k1, allowed, tile in masks.causal_row_tiles(
      mask, bias, q_len, k_len, min_rows=_MIN_ROWS):
    if k1 == k0:  # these queries see no key
      outs.append(jnp.zeros((v.shape[0], q1 - q0) + v.shape[2:], v.dtype))
      continue
    outs.append(_pool(score(q0, q1, k0, k1), v[:, k0:k1], allowed, tile,
                      normalize)[0])
  return jnp.concatenate(outs, axis=1), None


def _accumulate(dtype):
  return jnp.promote_types(dtype, jnp.float32)


@jax.custom_vjp
def tanh_scores(qa, ka, v_a):
  """Bahdanau's scores sum_a v_a[h, a] tanh(qa[b, h, a, i] + ka[b, h, a, j]).

  One hidden unit `a` at a time (a loop over `Da`), so neither pass holds
  the `[B, H, Lq, Lk, Da]` hidden layer: the forward pass adds `Da`
  `[B, H, Lq, Lk]` terms and the backward pass recomputes each unit's tanh.
  Written as a product and a sum over `a`, XLA:CPU turns the score into a
  matrix-vector product over the materialised hidden layer, 3-4 times
  slower at L = 200 (experiments/000_speed_lean_step/README.md).

  Args:
    qa: `[B, H, Da, Lq]` projected queries (hidden unit first).
    ka: `[B, H, Da, Lk]` projected keys.
    v_a: `[H, Da]` output weights.

  Returns:
    `[B, H, Lq, Lk]` scores in `qa`'s dtype (accumulated in at least f32).
  """
  return _tanh_scores_fwd(qa, ka, v_a)[0]


def _unit(qa, ka, a):
  return jnp.tanh(qa[:, :, a, :, None].astype(_accumulate(qa.dtype))
                  + ka[:, :, a, None, :].astype(_accumulate(ka.dtype)))


def _tanh_scores_fwd(qa, ka, v_a):
  b, h, units, q_len = qa.shape
  acc = jnp.zeros((b, h, q_len, ka.shape[-1]), _accumulate(qa.dtype))

  def add_unit(a, acc):
    return acc + v_a[None, :, a, None, None] * _unit(qa, ka, a)

  out = jax.lax.fori_loop(0, units, add_unit, acc)
  return out.astype(qa.dtype), (qa, ka, v_a)


def _tanh_scores_bwd(res, g):
  qa, ka, v_a = res
  g = g.astype(_accumulate(g.dtype))

  def unit_grads(a, grads):
    d_qa, d_ka, d_va = grads
    t = _unit(qa, ka, a)
    d_hidden = g * v_a[None, :, a, None, None] * (1 - t * t)
    return (d_qa.at[:, :, a].set(d_hidden.sum(3).astype(d_qa.dtype)),
            d_ka.at[:, :, a].set(d_hidden.sum(2).astype(d_ka.dtype)),
            d_va.at[:, a].set((g * t).sum((0, 2, 3)).astype(d_va.dtype)))

  return jax.lax.fori_loop(
      0, qa.shape[2], unit_grads,
      (jnp.zeros_like(qa), jnp.zeros_like(ka), jnp.zeros_like(v_a)))


tanh_scores.defvjp(_tanh_scores_fwd, _tanh_scores_bwd)


def additive(q, k, v, mask: Mask, bias=None, *, w_q, w_k, v_a,
             return_weights: bool = False):
  """Bahdanau attention; see the module docstring.

  Args:
    q, k, v: `[B, Lq, H, Dh]`, `[B, Lk, H, Dh]`, `[B, Lk, H, Dh]`.
    mask, bias: as for every variant.
    w_q, w_k: `[H, Dh, Da]` projections; v_a: `[H, Da]`.
    return_weights: also return the `[B, H, Lq, Lk]` weights.
  """
  if return_weights:
    weights_lib.check_fits("additive", q.shape[0], q.shape[2], q.shape[1],
                           k.shape[1])
  if q.shape[1] >= _MIN_ROWS:
    qa = jnp.einsum("bqhd,hda->bhaq", q, w_q)
    ka = jnp.einsum("bkhd,hda->bhak", k, w_k)

    def score(q0, q1, k0, k1):
      return tanh_scores(qa[..., q0:q1], ka[..., k0:k1], v_a)
  else:
    # Few queries (target attention, the last block of a per-prefix row):
    # the hidden layer is small and the loop's fixed cost would dominate.
    qa = jnp.einsum("bqhd,hda->bhqa", q, w_q)
    ka = jnp.einsum("bkhd,hda->bhka", k, w_k)

    def score(q0, q1, k0, k1):
      hidden = jnp.tanh(qa[:, :, q0:q1, None] + ka[:, :, None, k0:k1])
      return jnp.einsum("bhqka,ha->bhqk", hidden, v_a)

  return _by_rows(score, v, mask, bias, q.shape[1], normalize=True,
                  return_weights=return_weights)


def din(q, k, v, mask: Mask, bias=None, *, layers, normalize: bool = False,
        return_weights: bool = False):
  """DIN's activation unit; see the module docstring.

  Args:
    q, k, v: `[B, Lq, H, Dh]`, `[B, Lk, H, Dh]`, `[B, Lk, H, Dh]`.
    mask, bias: as for every variant (`bias` only with `normalize`).
    layers: list of `(w, b)`: the first `w` is `[H, 4 Dh, A1]` over
      `[q, k, q - k, q * k]`, the hidden ones `[H, A_i, A_i+1]`, the last
      maps to 1; sigmoid between layers (the paper uses PReLU/Dice).
    normalize: softmax over keys (True) or DIN's raw weights (False).
    return_weights: also return the `[B, H, Lq, Lk]` weights.
  """
  if return_weights:
    weights_lib.check_fits("din", q.shape[0], q.shape[2], q.shape[1],
                           k.shape[1])
  if bias is not None and not normalize:
    raise ValueError("din: bias needs normalize=True (a bias on unnormalised "
                     "weights has no meaning)")
  dh = q.shape[-1]
  (w1, b1), rest = layers[0], layers[1:]
  wq, wk, wd, wp = (w1[:, i * dh:(i + 1) * dh] for i in range(4))
  # Heads first, pairs flattened: every layer is one `[pairs, A] @ [A, C]`
  # matmul per head, whose operands XLA:CPU does not transpose (the
  # three-operand einsum over `[B, H, q, k, A]` copied each of them). The
  # backward pass of `q * k` sums over queries or keys, a middle axis: on
  # CPU the variant's train step compiles with YNNPACK for dots only
  # (`attention.compiler_options`), 1.4-1.7x faster than before both.
  qh, kh = jnp.moveaxis(q, 2, 0), jnp.moveaxis(k, 2, 0)  # [H, B, L, Dh]
  # [q, k, q - k, q * k] @ W1 without building the concatenation.
  qw = (jnp.einsum("hbqd,hda->hbqa", qh, wq + wd)
        + b1[:, None, None, :])
  kw = jnp.einsum("hbkd,hda->hbka", kh, wk - wd)

  def score(q0, q1, k0, k1):
    heads, batch = qh.shape[:2]
    pair_shape = (heads, batch, q1 - q0, k1 - k0)
    pairs = qh[:, :, q0:q1, None] * kh[:, :, None, k0:k1]
    hidden = jnp.einsum("hnd,hda->hna", pairs.reshape(heads, -1, dh), wp)
    hidden = (hidden.reshape(pair_shape + (-1,))
              + qw[:, :, q0:q1, None] + kw[:, :, None, k0:k1])
    for w, b in rest:
      hidden = jax.nn.sigmoid(hidden).reshape(heads, -1, hidden.shape[-1])
      hidden = (jnp.einsum("hna,hac->hnc", hidden, w)
                + b[:, None, :]).reshape(pair_shape + (-1,))
    return jnp.swapaxes(hidden[..., 0], 0, 1)  # [B, H, q, k]

  return _by_rows(score, v, mask, bias, q.shape[1], normalize=normalize,
                  return_weights=return_weights)


class Additive(nnx.Module):
  """Parameters of `additive` for `num_heads` heads of size `head_dim`."""

  def __init__(self, num_heads: int, head_dim: int, *, hidden: int = 0,
               rngs: nnx.Rngs):
    hidden = hidden or head_dim
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal",
                                             in_axis=-2, out_axis=-1)
    self.w_q = nnx.Param(init(rngs.params(), (num_heads, head_dim, hidden)))
    self.w_k = nnx.Param(init(rngs.params(), (num_heads, head_dim, hidden)))
    self.v_a = nnx.Param(
        jax.random.normal(rngs.params(), (num_heads, hidden)) / hidden**0.5)

  def __call__(self, q, k, v, mask, bias=None, *, return_weights=False):
    return additive(q, k, v, mask, bias, w_q=self.w_q[...], w_k=self.w_k[...],
                    v_a=self.v_a[...], return_weights=return_weights)


class DIN(nnx.Module):
  """Parameters of `din`: an MLP over `[q, k, q - k, q * k]` per head."""

  def __init__(self, num_heads: int, head_dim: int, *,
               hidden: tuple[int, ...] = (80, 40), normalize: bool = False,
               rngs: nnx.Rngs):
    self.normalize = normalize
    sizes = (4 * head_dim, *hidden, 1)
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal",
                                             in_axis=-2, out_axis=-1)
    pairs = list(zip(sizes[:-1], sizes[1:]))
    self.kernels = nnx.List([
        nnx.Param(init(rngs.params(), (num_heads, a, b))) for a, b in pairs])
    self.biases = nnx.List([
        nnx.Param(jnp.zeros((num_heads, b))) for _, b in pairs])

  def __call__(self, q, k, v, mask, bias=None, *, return_weights=False):
    layers = [(w[...], b[...]) for w, b in zip(self.kernels, self.biases)]
    return din(q, k, v, mask, bias, layers=layers, normalize=self.normalize,
               return_weights=return_weights)
