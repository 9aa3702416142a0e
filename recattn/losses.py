"""Next-item losses over user states `h: [B, L, D]` and target ids `[B, L]`.

Each loss averages over the positions whose target is not padding (id 0).
Logits are inner products with the (shared) item embedding divided by a
temperature. `LOSSES` maps config names to functions with one signature:

  fn(model, h, targets, rng, config, log_q) -> scalar

`log_q` is `[V + 1]` log sampling probabilities of the negative sampler (used
by the logQ correction and by popularity sampling; in-batch sampling computes
its own from the batch).

  exact, over all V items:   softmax (materialises [B, L, V] logits),
                             softmax_chunked (scan over item blocks)
  sampled negatives:         sampled_softmax (uniform | popularity | in_batch,
                             logQ correction), bce (SASRec), gbce (gSASRec)

`target_rank_loss` trains a model's ranking head (`model.rank_head`,
`loss.rank_weight`) alongside any of them.
"""

import jax
from jax import lax
import jax.numpy as jnp

from recattn.serving import incremental

SAMPLINGS = ("uniform", "popularity", "in_batch")
EXACT = ("softmax", "softmax_chunked")  # losses over every item: no negatives


def _mean_over_valid(per_position: jax.Array, targets: jax.Array):
  valid = targets > 0
  # `where`, not a product: padding positions may hold inf (e.g. -log 0).
  total = jnp.sum(jnp.where(valid, per_position, 0.0))
  return total / jnp.maximum(jnp.sum(valid), 1)


# --- Negative samplers -------------------------------------------------------


def sample_negatives(rng, shape, log_q: jax.Array, strategy: str):
  """Draws item ids in [1, V] uniformly or from `exp(log_q)` (popularity)."""
  num_items = log_q.shape[0] - 1
  if strategy == "uniform":
    return jax.random.randint(rng, shape, 1, num_items + 1)
  if strategy == "popularity":
    # Inverse CDF: O(V) memory and O(log V) per draw. (`categorical` builds
    # `[draws, V]` noise: 245 GiB for one step's draws at 10^6 items.)
    cdf = jnp.cumsum(jnp.exp(log_q.astype(jnp.float32)))
    u = jax.random.uniform(rng, shape, maxval=cdf[-1])
    ids = jnp.searchsorted(cdf, u, side="right")
    return jnp.clip(ids, 1, num_items)  # u rounding onto cdf[-1]
  raise ValueError(
      f"config.loss.sampling={strategy!r}: this loss draws its own negatives "
      "and allows 'uniform' | 'popularity'; 'in_batch' is implemented by "
      "loss.name='sampled_softmax' only")


def in_batch_negatives(rng, targets: jax.Array, num: int):
  """`num` negatives drawn from the batch's own valid targets, and their q.

  Draws `num` positions uniformly with replacement among the non-padding
  positions of the whole batch and returns their targets; if `num >= B * L`
  every position is taken once instead (deterministic; padding positions
  then come back as id 0 and must be masked by the caller, as must the
  id 0 returned by a batch without any valid target).

  Returns `(negs [N], log_q_fn)`: `log_q_fn(ids)` is `log(c_j / n)`, with
  `c_j` the count of item j among the batch's n valid targets -- the exact
  probability that one draw returns item j (0 -> -inf for absent ids).
  Cost: a sort of the B * L targets and `N` binary searches.
  """
  flat = targets.reshape(-1)
  valid = flat > 0
  n_valid = jnp.sum(valid)
  if num >= flat.size:
    negs = flat
  else:
    # The k-th valid position (0-based) is the first index where the running
    # count of valid positions exceeds k.
    running = jnp.cumsum(valid)
    k = jax.random.randint(rng, (num,), 0, jnp.maximum(n_valid, 1))
    at = jnp.searchsorted(running, k, side="right")
    negs = flat[jnp.minimum(at, flat.size - 1)]
  ordered = jnp.sort(jnp.where(valid, flat, -1))

  def log_q_fn(ids):
    count = (jnp.searchsorted(ordered, ids, side="right") -
             jnp.searchsorted(ordered, ids, side="left"))
    return jnp.log(count / jnp.maximum(n_valid, 1))

  return negs, log_q_fn


# --- Losses from logits (pure; the tests hold them to numpy) -----------------


def gbce_from_logits(pos_logits, neg_logits, targets, beta: float):
  """gSASRec's generalised BCE: -beta log s(pos) - sum_n log(1 - s(neg_n)).

  `-log(s(pos)^beta)` is written as `beta * softplus(-pos)`, which is stable
  without the float64 clipping of the authors' logit transform.

  Args:
    pos_logits: `[B, L]`.
    neg_logits: `[B, L, N]`.
    targets: `[B, L]` ids; 0 marks padding.
    beta: power of the positive's probability; 1 is plain BCE.
  """
  per_pos = -beta * jax.nn.log_sigmoid(pos_logits) - jnp.sum(
      jax.nn.log_sigmoid(-neg_logits), axis=-1)
  return _mean_over_valid(per_pos, targets)


def bce_from_logits(pos_logits, neg_logits, targets):
  """SASRec's loss: -log s(pos) - sum_n log(1 - s(neg_n)) (gBCE, beta=1).

  Args:
    pos_logits: `[B, L]`.
    neg_logits: `[B, L, N]`.
    targets: `[B, L]` ids; 0 marks padding.
  """
  return gbce_from_logits(pos_logits, neg_logits, targets, 1.0)


def softmax_from_logits(logits, targets):
  """Cross-entropy with logits `[B, L, V + 1]` over items 1..V."""
  logits = logits.at[..., 0].set(-jnp.inf)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  pos = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return _mean_over_valid(log_z - pos, targets)


def sampled_softmax_from_logits(pos_logits, neg_logits, hits, targets,
                                pos_log_q=None, neg_log_q=None):
  """Sampled softmax over the positive and N negatives with logQ correction.

  Args:
    pos_logits: `[B, L]`.
    neg_logits: `[B, L, N]` (or broadcastable, e.g. shared negatives).
    hits: bool, broadcastable to `[B, L, N]`; True where a negative equals
      the positive ("accidental hit"), which is removed from the softmax.
    targets: `[B, L]` ids; 0 marks padding.
    pos_log_q, neg_log_q: log sampling probabilities (broadcastable to the
      logits); None = no correction (uniform sampling makes it a constant).
  """
  if pos_log_q is not None:
    pos_logits = pos_logits - pos_log_q
    neg_logits = neg_logits - neg_log_q
  neg_logits = jnp.where(hits, -jnp.inf, neg_logits)
  all_logits = jnp.concatenate(
      [pos_logits[..., None], jnp.broadcast_to(
          neg_logits, pos_logits.shape + neg_logits.shape[-1:])], axis=-1)
  per_pos = jax.nn.logsumexp(all_logits, axis=-1) - pos_logits
  return _mean_over_valid(per_pos, targets)


def chunked_log_partition(h: jax.Array, table: jax.Array, chunk: int):
  """`log sum_{v=1..V} exp(<h, e_v>)` without the `[..., V]` logits.

  A `lax.scan` over blocks of `chunk` rows of `table` (`[V + 1, D]`) keeps a
  running max and sum of exponentials per position (online logsumexp). Each
  block is sliced out of the table in place: no padded or blocked copy of
  the table is made (such a copy, and its gradient, would cost O(V D) extra
  temporaries). Row 0 (padding item) is masked. The scan body is
  `jax.checkpoint`-ed, so the backward pass recomputes each block's logits
  instead of storing them.

  Memory: O(P * chunk) temporaries for P = prod(h.shape[:-1]) positions, plus
  2 * P * ceil((V + 1) / chunk) saved carries; time O(P * V * D), as the
  full softmax (plus one recomputation of the logits in the backward pass).
  """
  batch_shape = h.shape[:-1]
  h = h.reshape(-1, h.shape[-1])  # 2-D matmuls: faster on XLA:CPU
  rows = table.shape[0]
  chunk = min(chunk, rows)
  num_blocks = -(-rows // chunk)

  @jax.checkpoint
  def body(carry, i):
    top, total = carry
    # The last block is shifted back to end at row V (no padded copy of the
    # table); rows it shares with the previous block are masked.
    first = jnp.minimum(i * chunk, rows - chunk)
    ids = first + jnp.arange(chunk)
    keep = (ids >= i * chunk) & (ids > 0)
    vectors = lax.dynamic_slice_in_dim(table, first, chunk)
    logits = jnp.where(keep, h @ vectors.T, -jnp.inf)
    # The max only stabilises the exponentials; the result does not depend
    # on it, so it carries no gradient (which also keeps -inf out of it).
    new_top = jnp.maximum(top, lax.stop_gradient(jnp.max(logits, -1)))
    shift = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
    total = (total * jnp.exp(top - shift) +
             jnp.sum(jnp.exp(logits - shift[..., None]), -1))
    return (new_top, total), None

  start = (jnp.full(h.shape[:-1], -jnp.inf, h.dtype),
           jnp.zeros(h.shape[:-1], h.dtype))
  (top, total), _ = lax.scan(body, start, jnp.arange(num_blocks))
  return (top + jnp.log(total)).reshape(batch_shape)


def gbce_beta(num_negatives: int, num_items: int, t: float) -> float:
  """gSASRec's beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = N / (V - 1).

  t = 0 gives beta = 1 (plain BCE), t = 1 gives beta = alpha (the sampling
  rate: the paper's fully calibrated setting).
  """
  alpha = num_negatives / max(num_items - 1, 1)
  return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


# --- The registered losses ---------------------------------------------------


def _per_position_logits(model, h, targets, rng, config, log_q):
  """Logits of the positive `[B, L]` and of fresh negatives `[B, L, N]`."""
  n = config.num_negatives
  negs = sample_negatives(rng, targets.shape + (n,), log_q, config.sampling)
  pos = jnp.sum(h * model.item_vectors(targets), -1) / config.temperature
  neg = jnp.einsum("bld,blnd->bln", h, model.item_vectors(negs))
  return pos, neg / config.temperature


def bce(model, h, targets, rng, config, log_q):
  """SASRec BCE with `num_negatives` fresh negatives per position."""
  pos, neg = _per_position_logits(model, h, targets, rng, config, log_q)
  return bce_from_logits(pos, neg, targets)


def gbce(model, h, targets, rng, config, log_q):
  """gBCE of gSASRec with `num_negatives` fresh negatives per position.

    loss = -log s(s+)^beta - sum_n log(1 - s(s-_n)),
    beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = N / (V - 1),

  t = `config.gbce_t`. Negatives are drawn per position (uniform or
  popularity), as in the authors' code and like `bce`; accidental hits are
  kept, as there. Negatives are summed per position (SASRec's `bce`
  convention); the authors average the N + 1 terms instead, a constant
  factor 1 / (N + 1). Alpha assumes uniform sampling; with popularity
  sampling the same beta is applied. Cost: O(B L N D) time, O(B L N D)
  memory for the gathered negatives (as `bce`).

  Reference: A. Petrov, C. Macdonald, "gSASRec: Reducing Overconfidence in
  Sequential Recommendation Trained with Negative Sampling", RecSys 2023
  (arXiv:2308.07192), the gBCE loss and its beta; checked against the
  authors' code (github.com/asash/gsasrec README and sasrec.py,
  asash/gSASRec-pytorch train_gsasrec.py: `alpha = negatives / (num_items
  - 1)`, `beta = alpha * ((1 - 1/alpha) * t + 1/alpha)`, the positive's
  logit transformed so that its sigmoid is `sigmoid(s+)^beta`).
  """
  pos, neg = _per_position_logits(model, h, targets, rng, config, log_q)
  beta = gbce_beta(config.num_negatives, log_q.shape[0] - 1, config.gbce_t)
  return gbce_from_logits(pos, neg, targets, beta)


def softmax(model, h, targets, rng, config, log_q):
  """Full softmax over every item (exact; O(B L V) memory).

  The logits are one 2-D matmul `[B L, D] x [D, V]` against rows 1..V of
  the table (no padding column to mask): on XLA:CPU the 3-D einsum
  `bld,vd->blv` with the masked column and `take_along_axis` of the
  positive took 2.1x as long, forward and backward
  (experiments/000_speed_lean_step/cpu_matmul_layout.py).
  """
  del rng, log_q
  h = h / config.temperature
  table = model.all_item_vectors()
  logits = h.reshape(-1, h.shape[-1]) @ table[1:].T
  log_z = jax.nn.logsumexp(logits, axis=-1).reshape(targets.shape)
  pos = jnp.sum(h * table[targets], -1)
  return _mean_over_valid(log_z - pos, targets)


def softmax_chunked(model, h, targets, rng, config, log_q):
  """Full softmax computed over blocks of `config.item_chunk` items.

    loss = log sum_{v=1..V} exp(<h, e_v> / T) - <h, e_target> / T

  Equal to `softmax` (to float32 rounding) in value and gradient, but the
  `[B, L, V]` logits are never materialised, forward or backward (see
  `chunked_log_partition`): temporaries O(B L item_chunk + B L V / item_chunk)
  instead of O(B L V); time O(B L V D) as `softmax`, with the logits
  computed twice (once more in the backward pass).
  """
  del rng, log_q
  h = h / config.temperature
  log_z = chunked_log_partition(h, model.all_item_vectors(), config.item_chunk)
  pos = jnp.sum(h * model.item_vectors(targets), -1)
  return _mean_over_valid(log_z - pos, targets)


def _in_batch_sampled_softmax(model, h, targets, rng, config):
  """Sampled softmax whose negatives are the batch's own targets.

  `num_negatives` targets are drawn with replacement from the valid
  positions of the whole batch and shared by every position (all B * L
  targets when `num_negatives >= B * L`; `negatives_group` is ignored).
  The logQ correction uses the in-batch sampling probability
  q_j = c_j / n (count of item j among the batch's n valid targets): the
  exact probability of drawing j here, and an estimate of its training
  popularity. `log_q` (the trainer's, uniform for this sampling)
  is not used. Negatives equal to the position's positive (accidental hits,
  which include its own target) and padding ids are removed.
  Cost: O(B L N D) time and O(B L N) memory, as uniform sampled softmax.

  References: Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large
  Corpus Item Recommendations", RecSys 2019 (in-batch negatives with logQ);
  Bengio & Senecal 2008 (importance-sampled softmax).
  """
  negs, batch_log_q = in_batch_negatives(rng, targets, config.num_negatives)
  pos = jnp.sum(h * model.item_vectors(targets), -1) / config.temperature
  neg = jnp.einsum("bld,nd->bln", h, model.item_vectors(negs))
  neg = neg / config.temperature
  hits = (targets[..., None] == negs) | (negs == 0)
  pos_log_q = neg_log_q = None
  if config.logq_correction:
    # Absent ids (padding) have log q = -inf; keep them finite (masked).
    pos_log_q = jnp.where(targets > 0, batch_log_q(targets), 0.0)
    neg_log_q = jnp.where(negs > 0, batch_log_q(negs), 0.0)
  return sampled_softmax_from_logits(pos, neg, hits, targets, pos_log_q,
                                     neg_log_q)


def _pooled_negatives(model, h, rng, config, log_q, b: int, l: int):
  """Fresh negatives at every position, drawn from a pool shared per step.

  `config.negatives_pool` = P items are drawn for the whole batch, the
  logits against them computed by one matmul `[B, L, P]`, and each position
  takes `num_negatives` of those columns at random: every position sees its
  own negatives (as `negatives_group=1`), each still distributed as the
  sampler (so the logQ correction is unchanged), at the cost of a P-column
  matmul instead of gathering `[B, L, N, D]` item vectors. Only P distinct
  items are pushed down per step, though: on ML-1M a pool of 1,024 learned
  slower than the default per-row negatives (experiments/001_sasrec_ml1m).

  Returns `(neg_logits [B, L, N], negative ids [B, L, N])`.
  """
  pool_rng, pick_rng = jax.random.split(rng)
  pool = sample_negatives(pool_rng, (config.negatives_pool,), log_q,
                          config.sampling)  # [P]
  logits = jnp.einsum("bld,pd->blp", h, model.item_vectors(pool))
  pick = jax.random.randint(pick_rng, (b, l, config.num_negatives), 0,
                            config.negatives_pool)
  neg = jnp.take_along_axis(logits, pick, axis=-1) / config.temperature
  return neg, pool[pick]


def sampled_softmax(model, h, targets, rng, config, log_q):
  """Sampled softmax with `num_negatives` negatives per group of positions.

  `config.negatives_group` consecutive positions of a row share one set of
  negatives (0 = the whole row; 1 = fresh negatives at every position, as in
  generative-recommenders). Every position scores `num_negatives` items
  whatever the grouping, so the logits cost the same; smaller groups only
  gather more embeddings and push down more distinct items per step.
  `config.negatives_pool > 0` gives every position its own negatives
  picked from one pool per step (see `_pooled_negatives`), and
  `config.sampling="in_batch"` uses the batch's targets as negatives
  instead (see `_in_batch_sampled_softmax`).
  """
  if config.sampling == "in_batch":
    return _in_batch_sampled_softmax(model, h, targets, rng, config)
  b, l = targets.shape
  pos = jnp.sum(h * model.item_vectors(targets), -1) / config.temperature
  if config.get("negatives_pool", 0):
    neg, negs_at = _pooled_negatives(model, h, rng, config, log_q, b, l)
  else:
    group = config.get("negatives_group", 0) or l
    g = -(-l // group)  # groups per row
    pad = g * group - l
    negs = sample_negatives(rng, (b, g, config.num_negatives), log_q,
                            config.sampling)  # [B, G, N]
    hg = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, g, group, -1)
    neg = jnp.einsum("bgcd,bgnd->bgcn", hg, model.item_vectors(negs))
    neg = neg.reshape(b, g * group, -1)[:, :l] / config.temperature
    negs_at = jnp.repeat(negs, group, axis=1)[:, :l]  # [B, L, N]
  hits = targets[..., None] == negs_at
  pos_log_q = neg_log_q = None
  if config.logq_correction:
    # Padding targets (id 0, log q = -inf) must stay finite: their loss is
    # masked, but an inf would still turn the gradient into NaN.
    pos_log_q = jnp.where(targets > 0, log_q[targets], 0.0)
    neg_log_q = log_q[negs_at]
  return sampled_softmax_from_logits(pos, neg, hits, targets, pos_log_q,
                                     neg_log_q)


LOSSES = {
    "bce": bce,
    "gbce": gbce,
    "softmax": softmax,
    "softmax_chunked": softmax_chunked,
    "sampled_softmax": sampled_softmax,
}


def target_rank_loss(model, cache, inputs, targets, times, rng, config,
                     rngs=None):
  """Softmax over target-aware candidate lists (`rank_cuts` per row).

  Per row, `config.rank_cuts` uniformly drawn positions t with a target
  (with replacement; default 1), each: its next item and
  `config.rank_negatives` uniform items (never the positive) are scored by
  `recattn.serving.incremental.score_targets` after the history up to t
  (M-FALCON: candidates see the history and themselves), reusing the
  keys and values of the training forward pass (`cache`, from
  `incremental.encode_recording`). Rows without targets count zero.
  """
  cuts = config.get("rank_cuts", 1)
  if cuts > 1:  # each row `cuts` times, each copy with its own position
    inputs, targets = (jnp.repeat(x, cuts, axis=0) for x in (inputs, targets))
    times = None if times is None else jnp.repeat(times, cuts, axis=0)
    cache = {k: jnp.repeat(v, cuts, axis=0) for k, v in cache.items()}
  valid = targets > 0
  count = jnp.sum(valid, axis=1)
  pick_rng, neg_rng = jax.random.split(rng)
  pick = jnp.floor(jax.random.uniform(pick_rng, count.shape) * count)
  rank = jnp.cumsum(valid, axis=1) - 1
  cut = jnp.argmax(valid & (rank == pick[:, None].astype(rank.dtype)), axis=1)
  positive = jnp.take_along_axis(targets, cut[:, None], axis=1)
  negatives = jax.random.randint(
      neg_rng, (targets.shape[0], config.rank_negatives), 1,
      model.num_items + 1)
  logits = incremental.score_targets(
      model, cache, inputs, times, jnp.concatenate([positive, negatives], 1),
      cut=cut, rngs=rngs).astype(jnp.float32)
  clash = jnp.concatenate([jnp.zeros_like(positive, bool),
                           negatives == positive], axis=1)
  logits = jnp.where(clash, -jnp.inf, logits)
  per_row = jax.nn.logsumexp(logits, axis=1) - logits[:, 0]
  has = (count > 0).astype(jnp.float32)
  return jnp.sum(per_row * has) / jnp.maximum(jnp.sum(has), 1.0)
