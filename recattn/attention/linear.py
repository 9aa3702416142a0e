"""Kernelised linear attention: softmax(q.k) replaced by a feature map phi.

  out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i),
  S_i = sum_{j visible from i} phi(k_j) v_j^T   [Dh, Dh],
  z_i = sum_{j visible from i} phi(k_j)          [Dh].

Because the sums do not depend on i except through which keys are visible,
attention costs O(L Dh^2) instead of O(L^2 Dh).

Feature maps (`feature=`):

* "elu": phi(x) = elu(x) + 1, with the normaliser above. Katharopoulos,
  Vyas, Pappas, Fleuret, "Transformers are RNNs: Fast Autoregressive
  Transformers with Linear Attention", ICML 2020.
* "l2": LinRec. Liu et al., "LinRec: Linear Attention Mechanism for
  Long-term Sequential Recommender Systems", SIGIR 2023. Queries and keys go
  through elu, then L2 normalisation, and there is no softmax and no
  normaliser: out_i = rho(elu(q_i))^T S_i / sqrt(Dh), S_i built from
  rho(elu(k_j)). The paper describes the query normalisation as row-wise and
  the key normalisation as column-wise; read as columns of K in R^{L x Dh},
  that normalises each feature over the whole sequence, which in causal
  (next-item) training lets every position see the norm of future keys. The
  authors' released code (Applied-Machine-Learning-Lab/LinRec, layers.py)
  holds keys transposed, [Dh, L], so its "column" is one item: every key is
  normalised over its own head dimension, exactly like the queries. We do
  the same, in both the causal and the bidirectional form: it is the
  released behaviour and it is causal. The released code also ignores the
  attention mask (its SASRec-style training sees the future); here the mask
  is honoured. The 1/sqrt(Dh) scale is the released code's.

Causal form (chunked prefix sums): the sequence is cut into chunks of `chunk`
positions; inside a chunk the quadratic masked form phi(Q) phi(K)^T runs on a
[chunk, chunk] tile, and across chunks an exclusive cumulative sum of the
per-chunk states phi(K_c)^T V_c carries the past. This is a parallel prefix
over L/chunk states rather than a sequential `lax.scan`, with the same
memory:

  time O(B H L (chunk + Dh) Dh), memory O(B H (L chunk + L Dh + (L/chunk) Dh^2))

(never a [B, L, H, Dh, Dh] per-position cumsum). With at most `chunk`
queries (short sequences, or a last block that scores only the final
positions) the whole computation is that one masked quadratic tile over the
queries asked for: O(B H Lq Lk Dh) time, no states. Bidirectional form
(`mask.causal` False): one global S and z, O(B H L Dh^2) time, O(B H L Dh)
memory. Padding keys (`key_valid` False) get phi(k) = 0 and v = 0.

Not expressible (ValueError): an additive `bias` (there are no logits),
`Mask.window` and `Mask.num_targets` (visibility is not a prefix).
`return_weights=True` returns the implied weights phi(q_i)^T phi(k_j) /
normaliser over visible keys ("l2": divided by sqrt(Dh), unnormalised and
possibly negative) from a dense O(L^2) reference.
"""

import math

import jax
import jax.numpy as jnp

from recattn.attention import weights as weights_lib
from recattn.attention.masks import Mask

FEATURES = ("elu", "l2")
_L2_EPS = 1e-12


def feature_map(x: jax.Array, feature: str) -> jax.Array:
  """phi(x) over the last axis, in float32."""
  x = x.astype(jnp.float32)
  if feature == "elu":
    return jax.nn.elu(x) + 1.0
  if feature == "l2":
    y = jax.nn.elu(x)
    return y * jax.lax.rsqrt(jnp.sum(y * y, axis=-1, keepdims=True) + _L2_EPS)
  raise ValueError(f"linear: feature={feature!r}; valid: {FEATURES}")


def check_mask(variant: str, mask: Mask, bias) -> None:
  """Raises ValueError for options a prefix-sum variant cannot express."""
  if bias is not None:
    raise ValueError(
        f"{variant}: an additive attention bias is not supported (no "
        "per-pair logits are formed); pass bias=None")
  if mask.window is not None:
    raise ValueError(
        f"{variant}: Mask.window={mask.window} is not supported (visibility "
        "must be a prefix); use the 'local' variant for windows")
  if mask.num_targets is not None:
    raise ValueError(
        f"{variant}: Mask.num_targets={mask.num_targets} (target-aware "
        "attention) is not supported")


def square_up(q, k, v, key_valid):
  """Left-pads the shorter of queries / keys so that Lq == Lk.

  With right-aligned positions (`masks.Mask`) this changes no query's
  visible set: padded queries are extra rows to drop (`out[:, -Lq:]`),
  padded keys are marked invalid.

  Returns:
    `(q, k, v, key_valid)`, `key_valid` possibly None.
  """
  lq, lk = q.shape[1], k.shape[1]

  def left(x, n):
    return jnp.pad(x, [(0, 0), (n, 0)] + [(0, 0)] * (x.ndim - 2))

  if lq < lk:
    q = left(q, lk - lq)
  elif lk < lq:
    if key_valid is None:
      key_valid = jnp.ones(k.shape[:2], bool)
    k, v, key_valid = (left(x, lq - lk) for x in (k, v, key_valid))
  return q, k, v, key_valid


def _causal_sums(fq, fk, v, chunk):
  """sum_{j <= i} (fq_i . fk_j) v_j for every i, chunk by chunk.

  Args:
    fq, fk: `[B, L, H, F]` features (padding keys already zeroed).
    v: `[B, L, H, D]`.
    chunk: chunk length.

  Returns:
    `[B, L, H, D]` float32.
  """
  b, l, h, f = fq.shape
  c = min(chunk, l)
  n = -(-l // c)

  def chunks(x):
    x = jnp.pad(x, [(0, 0), (0, n * c - l), (0, 0), (0, 0)])
    return x.reshape(b, n, c, h, x.shape[-1])

  fq, fk, v = chunks(fq), chunks(fk), chunks(v)
  state = jnp.einsum("bnchf,bnchd->bnhfd", fk, v)  # per chunk [F, D]
  state = jnp.cumsum(state, axis=1)
  past = jnp.concatenate([jnp.zeros_like(state[:, :1]), state[:, :-1]], 1)
  inter = jnp.einsum("bnihf,bnhfd->bnihd", fq, past)
  scores = jnp.einsum("bnihf,bnjhf->bnhij", fq, fk)
  scores = jnp.where(jnp.tril(jnp.ones((c, c), bool)), scores, 0.0)
  intra = jnp.einsum("bnhij,bnjhd->bnihd", scores, v)
  return (inter + intra).reshape(b, n * c, h, -1)[:, :l]


def reference(q, k, v, mask: Mask, *, feature: str = "elu"):
  """Readable dense O(L^2) form; returns (out, weights [B, H, Lq, Lk])."""
  fq, fk = feature_map(q, feature), feature_map(k, feature)
  a = jnp.einsum("bqhf,bkhf->bhqk", fq, fk)
  dense = mask.dense(q.shape[1], k.shape[1])
  if dense is not None:
    a = jnp.where(dense, a, 0.0)
  if feature == "elu":
    den = a.sum(axis=-1, keepdims=True)
    w = a / jnp.where(den > 0, den, 1.0)
  else:
    w = a / math.sqrt(q.shape[-1])
  out = jnp.einsum("bhqk,bkhd->bqhd", w, v.astype(jnp.float32))
  return out.astype(q.dtype), w


def linear(
    q: jax.Array,  # [B, Lq, H, Dh]
    k: jax.Array,  # [B, Lk, H, Dh]
    v: jax.Array,  # [B, Lk, H, Dh]
    mask: Mask,
    bias=None,
    *,
    feature: str = "elu",
    chunk: int = 64,
    return_weights: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
  """Linear attention; see the module docstring.

  Args:
    q: queries `[B, Lq, H, Dh]`.
    k: keys `[B, Lk, H, Dh]`.
    v: values `[B, Lk, H, Dh]`.
    mask: `causal` and `key_valid` are honoured; `window` and
      `num_targets` raise ValueError.
    bias: must be None (ValueError otherwise).
    feature: "elu" (Katharopoulos et al.) or "l2" (LinRec).
    chunk: chunk length of the causal prefix sums.
    return_weights: also return the implied dense `[B, H, Lq, Lk]` weights.

  Returns:
    `(out [B, Lq, H, Dh], weights or None)`; queries with no visible key
    output zeros.
  """
  if feature not in FEATURES:
    raise ValueError(f"linear: feature={feature!r}; valid: {FEATURES}")
  check_mask(f"linear(feature={feature!r})", mask, bias)
  if chunk < 1:
    raise ValueError(f"linear: chunk={chunk!r} must be >= 1")
  b, lq, h, dh = q.shape
  if return_weights:
    weights_lib.check_fits("linear", b, h, lq, k.shape[1])
    return reference(q, k, v, mask, feature=feature)

  if mask.causal and lq <= chunk:
    # Every query fits in one tile: the masked quadratic form costs
    # O(Lq Lk Dh), less than building [Dh, Dh] states, and runs only the Lq
    # queries asked for (a model's last block may ask for one).
    out, _ = reference(q, k, v, mask, feature=feature)
    return out, None

  key_valid = mask.key_valid
  if mask.causal:
    q, k, v, key_valid = square_up(q, k, v, key_valid)
  fq, fk = feature_map(q, feature), feature_map(k, feature)
  v = v.astype(jnp.float32)
  if key_valid is not None:
    fk = jnp.where(key_valid[:, :, None, None], fk, 0.0)
    v = jnp.where(key_valid[:, :, None, None], v, 0.0)
  if feature == "elu":
    # A column of ones in v turns the last output column into phi(q)^T z.
    v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)

  if mask.causal:
    num = _causal_sums(fq, fk, v, chunk)[:, -lq:]
  else:
    num = jnp.einsum("bqhf,bhfd->bqhd", fq,
                     jnp.einsum("bkhf,bkhd->bhfd", fk, v))

  if feature == "elu":
    num, den = num[..., :-1], num[..., -1:]
    out = num / jnp.where(den > 0, den, 1.0)
  else:
    out = num / math.sqrt(dh)
  return out.astype(q.dtype), None
