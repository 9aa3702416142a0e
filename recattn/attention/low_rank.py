"""Low-rank attention over r latent interests (LightSANs).

Fan, Liu, Zhu, Wang, Chen, Guo, Yu, "Lighter and Better: Low-Rank Decomposed
Self-Attention Networks for Next-Item Recommendation", SIGIR 2021.

Item-to-interest aggregation pools the keys (and values) of the visible items
into r latent interests; each query then attends over the r latents:

  w_jm     = softmax_j (k_j . pool[h, :, m])      over visible keys j
  K~_m     = sum_j w_jm k_j,   V~_m = sum_j w'_jm v_j
  a_m      = softmax_m (q . K~_m / (tau sqrt(Dh)))
  out      = sum_m a_m V~_m

`w'` uses the same weights as `w` unless `value_pool` is given: LightSANs has
separate aggregation parameters for keys and values, scored on the values
themselves (w'_jm = softmax_j (v_j . value_pool[h, :, m])). The implied item
weights are sum_m a_m w'_jm (`return_weights=True`).

Differences from the paper's released code (RecBole's LightSANs): there the
aggregation matrix acts on the whole hidden vector and is shared by all
heads; here it is per head, `pool: [H, Dh, r]`. The released code normalises
the query-to-latent scores with a softmax over the *queries* (dim=-2); we use
the softmax over latents written in the paper. The decoupled position
encoding of LightSANs is a separate term and not part of this function.

Compare Linformer (Wang, Li, Khabsa, Fang, Ma, "Linformer: Self-Attention with
Linear Complexity", arXiv 2020), which projects keys and values along the
length axis with fixed learned [r, L] matrices: position-based, tied to a
maximum length, and mixing all positions, so it has no causal form. LightSANs'
pooling is content-based (a softmax over items), which is what makes the
prefix form below possible.

Bidirectional form (`mask.causal` False): one global pooling per sequence,
time O(B H L r Dh), memory O(B H (L r + r Dh)). This is the paper's form: in
next-item training it would let every position see the future.

Causal form: query p pools only its visible prefix j <= p, so the latents
differ per position. Materialising them would cost O(B H L r Dh); instead the
sequence is cut into chunks of `chunk` items (default 64). Sums over earlier
chunks are carried by a `lax.scan`, referenced to the running max of the
scores (per latent) and rescaled as it grows. Inside a chunk, two forms:

* matmul (the usual one): every weight of chunk n is taken against the
  chunk's max M_n, one reference for all its queries, so it factors out of
  the pairs and the prefix sums are masked [chunk, chunk] matmuls, as in
  softmax attention:

    q_p . K~_m(p) = (q_p . P_m e^{P - M} + ((Q K^T * tril) E)_pm) / Z_m(p),
    E_jm = e^{s_jm - M_m};

  the output is `((G E^T) * tril) V` plus the carried part.
* pairs: every query p takes its own running max R_p through p, so every
  exponent is <= 0 and its top item contributes exactly 1: sums cannot
  underflow whatever the score range; it needs a per-latent [chunk, chunk]
  tile of exp(s_jm - R_pm), several times slower.

The matmul form loses a query's weights to underflow only if its prefix max
sits far (`_MAX_GAP` = 60) below its chunk's max, i.e. a later item of the
same chunk outscores all of the query's items by e^60; a batch where that
happens takes the pairs form (one `lax.cond` forward and one backward, which
recomputes the chosen form). The check is a few reductions (each sequence's
visible scores spanning at most 60 rules a gap out); only a batch with a
wider span computes the per-position running max:

  time O(B H L chunk (Dh + r) + B H L r Dh),
  memory O(B H (L chunk + L r + (L/chunk) r Dh)), pairs form L chunk r.

Memory is linear in L; `chunk` trades the L chunk tiles against the
(L/chunk) r Dh carried sums. With few queries (Lq at most half a chunk, e.g.
a last block that scores only the final position) the dense form over those
queries, O(B H Lq Lk r), replaces the prefix pass over all Lk positions.
Computation is in float32 whatever the input dtype.

Padding keys get zero pooling weight. An additive `bias`, `Mask.window` and
`Mask.num_targets` are not supported (ValueError). Queries with no visible
key output zeros.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from recattn.attention import weights as weights_lib
from recattn.attention.linear import check_mask
from recattn.attention.linear import square_up
from recattn.attention.masks import Mask

_LOW = float(jnp.finfo(jnp.float32).min)
# The matmul form measures a chunk's weights against the chunk's max score;
# a query whose own prefix max sits more than this below it would lose its
# weights to underflow (float32's smallest normal is about exp(-87)), so the
# batch then takes the pairwise form.
_MAX_GAP = 60.0


def _masked_softmax(logits, visible, axis):
  """Softmax over `axis` of the visible entries; all-hidden rows give 0."""
  logits = jnp.where(visible, logits, _LOW)
  m = jax.lax.stop_gradient(logits.max(axis=axis, keepdims=True))
  e = jnp.where(visible, jnp.exp(logits - m), 0.0)
  z = e.sum(axis=axis, keepdims=True)
  return e / jnp.where(z > 0, z, 1.0)


def _scores(x, pool):
  """Item-to-interest scores `[B, L, H, r]` in float32."""
  return jnp.einsum("blhd,hdr->blhr", x.astype(jnp.float32),
                    pool.astype(jnp.float32))


def reference(q, k, v, mask: Mask, *, pool, value_pool=None, scale):
  """Readable dense form, O(B H Lq Lk r) memory.

  Returns:
    `(out [B, Lq, H, Dh], weights [B, H, Lq, Lk])`.
  """
  lq, lk = q.shape[1], k.shape[1]
  visible = mask.dense(lq, lk)
  if visible is None:
    visible = jnp.ones((1, 1, lq, lk), bool)
  visible = visible[..., None]  # [B|1, 1, Lq, Lk, 1]

  def item_weights(x, p):  # [B, H, Lq, Lk, r]: softmax over visible items
    s = jnp.moveaxis(_scores(x, p), 1, 2)[:, :, None]  # [B, H, 1, Lk, r]
    return _masked_softmax(s, visible, axis=3)

  wk = item_weights(k, pool)
  wv = wk if value_pool is None else item_weights(v, value_pool)
  latent_k = jnp.einsum("bhqkr,bkhd->bhqrd", wk, k.astype(jnp.float32))
  logits = jnp.einsum("bqhd,bhqrd->bhqr", q.astype(jnp.float32),
                      latent_k) * scale
  a = _masked_softmax(logits, visible.any(axis=3), axis=-1)  # [B, H, Lq, r]
  w = jnp.einsum("bhqr,bhqkr->bhqk", a, wv)
  out = jnp.einsum("bhqk,bkhd->bqhd", w, v.astype(jnp.float32))
  return out.astype(q.dtype), w


def _global(q, k, v, key_valid, pool, value_pool, scale):
  """Bidirectional form: one pooling over all valid keys."""
  valid = (jnp.ones(k.shape[:2], bool) if key_valid is None
           else key_valid)[:, :, None, None]
  wk = _masked_softmax(_scores(k, pool), valid, axis=1)  # [B, Lk, H, r]
  wv = (wk if value_pool is None
        else _masked_softmax(_scores(v, value_pool), valid, axis=1))
  latent_k = jnp.einsum("bkhr,bkhd->bhrd", wk, k.astype(jnp.float32))
  latent_v = jnp.einsum("bkhr,bkhd->bhrd", wv, v.astype(jnp.float32))
  logits = jnp.einsum("bqhd,bhrd->bqhr", q.astype(jnp.float32),
                      latent_k) * scale
  any_valid = valid.any(axis=1, keepdims=True)  # [B, 1, 1, 1]
  a = _masked_softmax(logits, any_valid, axis=-1)
  return jnp.einsum("bqhr,bhrd->bqhd", a, latent_v)


def _safe_exp(x, ok):
  return jnp.where(ok, jnp.exp(jnp.where(ok, x, 0.0)), 0.0)


def _running_max(s):
  """R_i: the running max through position i of `[B, n, c, H, r]` scores
  (invalid items already at the lowest float), no gradient."""
  b, n, c = s.shape[:3]
  run = jax.lax.cummax(s.reshape(b, n * c, *s.shape[3:]), axis=1)
  return jax.lax.stop_gradient(run.reshape(s.shape))


def _carry(s, valid, xs):
  """Exp-weights against each chunk's max, and carried sums.

  Args:
    s: `[B, n, c, H, r]` scores.
    valid: `[B, n, c]` bool.
    xs: tensors `[B, n, c, H, D]` to pool.

  Returns:
    `(s, chunk_ref, e, past_xs, past_z, rho)`: `s` with invalid items at
    the lowest float; `chunk_ref [B, n, H, r]` M_n, the max of the visible
    scores through chunk n (a running max over chunks: n values, not
    n * c); `e` = exp(s_j - M_n) for visible j, else 0; `past_xs
    [B, n, H, r, D]` and `past_z [B, n, H, r]` the sums of exp(s_j - P_n)
    x_j and exp(s_j - P_n) over the chunks before n (P_n = M_{n-1}); `rho
    [B, n, H, r]` = exp(P_n - M_n) <= 1. No exponent is positive.
  """
  valid5 = valid[..., None, None]
  s = jnp.where(valid5, s, _LOW)
  chunk_ref = jax.lax.stop_gradient(
      jax.lax.cummax(s.max(axis=2), axis=1))  # M_n
  prev_ref = _previous(chunk_ref)  # P_n
  e = _safe_exp(s - chunk_ref[:, :, None], valid5)
  sums = [jnp.einsum("bnchr,bnchd->bnhrd", e, x) for x in xs]
  sums.append(e.sum(axis=2))
  rho = jnp.exp(prev_ref - chunk_ref)  # P_n -> M_n, <= 1

  def step(past, inputs):
    chunk_sums, d = inputs
    new = [p * (d[..., None] if p.ndim > d.ndim else d) + cs
           for p, cs in zip(past, chunk_sums)]
    return new, past

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  init = [jnp.zeros_like(x[:, 0]) for x in sums]
  # Step n yields the carry before chunk n (referenced to P_n), then
  # rescales it to M_n with rho_n and adds chunk n's sums.
  _, past = jax.lax.scan(step, init,
                         ([time_major(x) for x in sums], time_major(rho)))
  past = [jnp.moveaxis(p, 0, 1) for p in past]
  return s, chunk_ref, e, past[:-1], past[-1], rho


def _previous(chunk_ref):
  """P_n: the reference through chunk n - 1 (lowest float for chunk 0)."""
  return jnp.concatenate(
      [jnp.full_like(chunk_ref[:, :1], _LOW), chunk_ref[:, :-1]], axis=1)


def _prefix_pool(s, valid, xs):
  """Chunked prefix pooling, stabilised by the running max of the scores.

  Args:
    s: `[B, n, c, H, r]` scores.
    valid: `[B, n, c]` bool.
    xs: tensors `[B, n, c, H, D]` to pool (keys, and values when they share
      the weights).

  Returns:
    `(pair, rescale, past_xs, past_z)` where, with R_i the running max of the
    visible scores through position i and P_n that through chunk n - 1:
    `pair [B, n, H, r, c, c]` = exp(s_j - R_i) for visible j <= i of the
    chunk (else 0); `rescale [B, n, c, H, r]` = exp(P_n - R_i); `past_xs`
    `[B, n, H, r, D]` and `past_z [B, n, H, r]` the sums of exp(s_j - P_n) x_j
    and exp(s_j - P_n) over the chunks before n. Every exponent is <= 0, and
    the item holding the max contributes exactly 1, so no sum underflows.
  """
  c = s.shape[2]
  s, chunk_ref, _, past_xs, past_z, _ = _carry(s, valid, xs)
  run = _running_max(s)
  prev_ref = _previous(chunk_ref)
  rescale = jnp.exp(prev_ref[:, :, None] - run)
  s_j = jnp.moveaxis(s, 2, -1)[..., None, :]  # [B, n, H, r, 1, c]
  r_i = jnp.moveaxis(run, 2, -1)[..., :, None]  # [B, n, H, r, c, 1]
  ok = jnp.logical_and(jnp.tril(jnp.ones((c, c), bool)),
                       valid[:, :, None, None, None, :])
  pair = _safe_exp(s_j - r_i, ok)
  return pair, rescale, past_xs, past_z


def _pairs_form(qc, kc, vc, sk, sv, valid, scale):
  """Causal pooling with per-query references; always exact, slower."""
  if sv is None:
    pair_k, resc_k, (pk, pv), pzk = _prefix_pool(sk, valid, [kc, vc])
    pair_v, resc_v, pzv = pair_k, resc_k, pzk
  else:
    pair_k, resc_k, (pk,), pzk = _prefix_pool(sk, valid, [kc])
    pair_v, resc_v, (pv,), pzv = _prefix_pool(sv, valid, [vc])

  def normaliser(past_z, rescale, pair):  # Z_m(i): [B, n, c, H, r]
    return past_z[:, :, None] * rescale + jnp.moveaxis(pair.sum(-1), -1, 2)

  # Query-to-latent logits q_i . K~_m(i) from the prefix-pooled keys.
  zk = normaliser(pzk, resc_k, pair_k)
  qk = jnp.einsum("bnihd,bnjhd->bnhij", qc, kc)
  num = (jnp.einsum("bnihd,bnhrd->bnihr", qc, pk) * resc_k
         + jnp.einsum("bnhij,bnhrij->bnihr", qk, pair_k))
  seen = zk > 0
  a = _masked_softmax(num / jnp.where(seen, zk, 1.0) * scale, seen, axis=-1)

  # out_i = sum_m a_m V~_m(i); g = a / Z'_m(i).
  zv = normaliser(pzv, resc_v, pair_v)
  g = jnp.where(zv > 0, a / jnp.where(zv > 0, zv, 1.0), 0.0)
  item = jnp.einsum("bnihr,bnhrij->bnhij", g, pair_v)
  return (jnp.einsum("bnihr,bnhrd->bnihd", g * resc_v, pv)
          + jnp.einsum("bnhij,bnjhd->bnihd", item, vc))


def _matmul_form(qc, kc, vc, sk, sv, valid, scale):
  """Causal pooling against each chunk's max: every sum is a matmul.

  With the chunk max M_n as the one reference of all queries of chunk n,
  exp(s_j - M_n) factors out of the pairs: q_i . sum_{j<=i} w_jm k_j is
  `(Q K^T * tril) @ E` and the output `((G E^T) * tril) @ V`, [c, c] tiles
  as in softmax attention. Exact as long as no query's own prefix max sits
  far below M_n (`_MAX_GAP`, checked by the caller).
  """
  c = qc.shape[2]
  if sv is None:
    _, _, ek, (pk, pv), pzk, rho_k = _carry(sk, valid, [kc, vc])
    ev, pzv, rho_v = ek, pzk, rho_k
  else:
    _, _, ek, (pk,), pzk, rho_k = _carry(sk, valid, [kc])
    _, _, ev, (pv,), pzv, rho_v = _carry(sv, valid, [vc])
  tril = jnp.tril(jnp.ones((c, c), jnp.float32))

  def normaliser(past_z, rho, e):  # Z_m(i) * exp(R_i - M_n)
    return ((past_z * rho)[:, :, None]
            + jnp.einsum("ij,bnjhr->bnihr", tril, e))

  zk = normaliser(pzk, rho_k, ek)
  qk = jnp.einsum("bnihd,bnjhd->bnhij", qc, kc) * tril
  num = (jnp.einsum("bnihd,bnhrd->bnihr", qc, pk) * rho_k[:, :, None]
         + jnp.einsum("bnhij,bnjhr->bnihr", qk, ek))
  seen = zk > 0
  a = _masked_softmax(num / jnp.where(seen, zk, 1.0) * scale, seen, axis=-1)

  zv = normaliser(pzv, rho_v, ev)
  g = jnp.where(zv > 0, a / jnp.where(zv > 0, zv, 1.0), 0.0)
  item = jnp.einsum("bnihr,bnjhr->bnhij", g, ev) * tril
  return (jnp.einsum("bnihr,bnhrd->bnihd", g * rho_v[:, :, None], pv)
          + jnp.einsum("bnhij,bnjhd->bnihd", item, vc))


def _gaps_small(s, valid):
  """Whether every query's prefix max is within `_MAX_GAP` of its chunk's.

  First the sufficient test that each sequence's visible scores span at
  most `_MAX_GAP` (a query's prefix max is at least the lowest visible
  score, its chunk's max at most the highest): a few reductions. Only a
  batch that fails it pays for the per-position running max.
  """
  visible = valid[..., None, None]
  s = jnp.where(visible, s, _LOW)

  def exact():
    run = _running_max(s)
    gap = run[:, :, -1:] - run
    return jnp.all(jnp.where(run > _LOW / 2, gap, 0.0) <= _MAX_GAP)

  seen = valid.any(axis=(1, 2))[:, None, None]  # [B, 1, 1]
  spread = s.max(axis=(1, 2)) - jnp.where(
      visible, s, -_LOW).min(axis=(1, 2))  # [B, H, r]
  narrow = jnp.all(jnp.where(seen, spread, 0.0) <= _MAX_GAP)
  return jax.lax.cond(narrow, lambda: jnp.asarray(True), exact)


def _causal(q, k, v, key_valid, pool, value_pool, scale, chunk, *,
            form: str = "auto"):
  """Causal form, Lq == Lk; see the module docstring.

  `form`: "matmul", "pairs", or "auto" (matmul unless a gap is too large).
  """
  b, l, h, dh = q.shape
  c = min(chunk, l)
  n = -(-l // c)
  if key_valid is None:
    key_valid = jnp.ones((b, l), bool)

  def chunks(x):
    x = jnp.pad(x, [(0, 0), (0, n * c - l)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(b, n, c, *x.shape[2:])

  qc, kc, vc = (chunks(x.astype(jnp.float32)) for x in (q, k, v))
  valid = chunks(key_valid)
  sk = chunks(_scores(k, pool))
  sv = None if value_pool is None else chunks(_scores(v, value_pool))
  args = (qc, kc, vc, sk, sv, valid)
  if form == "matmul":
    out = _matmul_form(*args, scale)
  elif form == "pairs":
    out = _pairs_form(*args, scale)
  else:
    out = _either_form(scale, *args)
  return out.reshape(b, n * c, h, -1)[:, :l]  # values may differ from Dh


def _forms_ok(sk, sv, valid):
  ok = _gaps_small(sk, valid)
  return ok if sv is None else jnp.logical_and(ok, _gaps_small(sv, valid))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _either_form(scale, qc, kc, vc, sk, sv, valid):
  """The matmul form, or the pairwise one where a gap is too large.

  One `lax.cond` in the forward pass and one in the backward pass, which
  recomputes the chosen form from the inputs (a differentiated `lax.cond`
  would carry both forms' residuals).
  """
  return jax.lax.cond(_forms_ok(sk, sv, valid),
                      lambda a: _matmul_form(*a, scale),
                      lambda a: _pairs_form(*a, scale),
                      (qc, kc, vc, sk, sv, valid))


def _either_form_fwd(scale, qc, kc, vc, sk, sv, valid):
  args = (qc, kc, vc, sk, sv, valid)
  return _either_form(scale, *args), args


def _either_form_bwd(scale, args, g):
  valid = args[-1]

  def vjp(form):
    def run(diff):
      _, pull = jax.vjp(lambda *d: form(*d, valid, scale), *diff)
      return pull(g)
    return run

  grads = jax.lax.cond(_forms_ok(args[3], args[4], valid),
                       vjp(_matmul_form), vjp(_pairs_form), args[:-1])
  return (*grads, None)


_either_form.defvjp(_either_form_fwd, _either_form_bwd)


def low_rank(
    q: jax.Array,  # [B, Lq, H, Dh]
    k: jax.Array,  # [B, Lk, H, Dh]
    v: jax.Array,  # [B, Lk, H, Dh]
    mask: Mask,
    bias=None,
    *,
    pool: jax.Array,  # [H, Dh, r]
    value_pool: jax.Array | None = None,  # [H, Dh, r]
    temperature: float = 1.0,
    chunk: int = 64,
    return_weights: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
  """LightSANs low-rank attention; see the module docstring.

  Args:
    q: queries `[B, Lq, H, Dh]`.
    k: keys `[B, Lk, H, Dh]`.
    v: values `[B, Lk, H, Dh]`.
    mask: `causal` and `key_valid` are honoured; `window` and `num_targets`
      raise ValueError.
    bias: must be None (ValueError otherwise).
    pool: item-to-interest matrices `[H, Dh, r]` scored against keys.
    value_pool: optional separate `[H, Dh, r]` matrices scored against
      values (the paper's separate value aggregation); None shares the key
      weights.
    temperature: query-to-latent logits are divided by
      `temperature * sqrt(Dh)`.
    chunk: chunk length of the causal prefix pooling.
    return_weights: also return the implied dense item weights
      `[B, H, Lq, Lk]` (dense reference, O(Lq Lk r) memory).

  Returns:
    `(out [B, Lq, H, Dh], weights or None)`.
  """
  check_mask("low_rank", mask, bias)
  b, lq, h, dh = q.shape
  for name, p in (("pool", pool), ("value_pool", value_pool)):
    if p is not None and (p.ndim != 3 or p.shape[:2] != (h, dh)):
      raise ValueError(f"low_rank: {name} has shape {p.shape}; expected "
                       f"[H={h}, Dh={dh}, r]")
  if value_pool is not None and value_pool.shape != pool.shape:
    raise ValueError(f"low_rank: value_pool {value_pool.shape} and pool "
                     f"{pool.shape} must have the same shape")
  if chunk < 1:
    raise ValueError(f"low_rank: chunk={chunk!r} must be >= 1")
  scale = 1.0 / (temperature * math.sqrt(dh))
  if return_weights:
    r = pool.shape[-1]
    # The dense form holds r weights per (query, item) pair.
    weights_lib.check_fits(f"low_rank (H x r={r} latents)", b, h * r, lq,
                           k.shape[1])
    return reference(q, k, v, mask, pool=pool, value_pool=value_pool,
                     scale=scale)
  if not mask.causal:
    out = _global(q, k, v, mask.key_valid, pool, value_pool, scale)
  elif 2 * lq <= min(chunk, k.shape[1]):
    # A few queries (a model's last block may ask for one): their own
    # poolings, O(B H Lq Lk r), instead of every position's prefix.
    out, _ = reference(q, k, v, mask, pool=pool, value_pool=value_pool,
                       scale=scale)
  else:
    qs, k, v, key_valid = square_up(q, k, v, mask.key_valid)
    out = _causal(qs, k, v, key_valid, pool, value_pool, scale,
                  chunk)[:, -lq:]
  return out.astype(q.dtype), None


class LowRankPool(nnx.Module):
  """Owns the item-to-interest matrices of `low_rank` and applies it.

  Attributes:
    pool: `nnx.Param [H, Dh, r]`, initialised normal(1 / sqrt(Dh)).
    value_pool: same, or None when values share the key weights.
  """

  def __init__(self, num_heads: int, head_dim: int, num_latents: int = 16, *,
               separate_value_pool: bool = False, temperature: float = 1.0,
               chunk: int = 64, rngs: nnx.Rngs):
    self.temperature = temperature
    self.chunk = chunk
    init = nnx.initializers.normal(stddev=1.0 / math.sqrt(head_dim))
    shape = (num_heads, head_dim, num_latents)
    self.pool = nnx.Param(init(rngs.params(), shape))
    self.value_pool = (nnx.Param(init(rngs.params(), shape))
                       if separate_value_pool else None)

  def __call__(self, q, k, v, mask: Mask, bias=None, *,
               temperature: float | None = None, chunk: int | None = None,
               return_weights: bool = False):
    """`low_rank` with this module's matrices; same arguments and result.

    `temperature` and `chunk` default to the values given at construction.
    """
    return low_rank(
        q, k, v, mask, bias, pool=self.pool[...],
        value_pool=None if self.value_pool is None else self.value_pool[...],
        temperature=self.temperature if temperature is None else temperature,
        chunk=self.chunk if chunk is None else chunk,
        return_weights=return_weights)
