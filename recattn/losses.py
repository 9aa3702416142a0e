"""Next-item losses over user states `h: [B, L, D]` and target ids `[B, L]`.

Each loss averages over the positions whose target is not padding (id 0).
Logits are inner products with the (shared) item embedding divided by a
temperature. `LOSSES` maps config names to functions with one signature:

  fn(model, h, targets, rng, config, log_q) -> scalar

`log_q` is `[V + 1]` log sampling probabilities of the negative sampler (used
by the logQ correction and by popularity sampling).
"""

import jax
import jax.numpy as jnp


def _mean_over_valid(per_position: jax.Array, targets: jax.Array):
  valid = targets > 0
  # `where`, not a product: padding positions may hold inf (e.g. -log 0).
  total = jnp.sum(jnp.where(valid, per_position, 0.0))
  return total / jnp.maximum(jnp.sum(valid), 1)


def sample_negatives(rng, shape, log_q: jax.Array, strategy: str):
  """Draws item ids in [1, V] uniformly or from `exp(log_q)` (popularity)."""
  num_items = log_q.shape[0] - 1
  if strategy == "uniform":
    return jax.random.randint(rng, shape, 1, num_items + 1)
  return jax.random.categorical(rng, log_q, shape=shape)


def bce_from_logits(pos_logits, neg_logits, targets):
  """SASRec's loss: -log s(pos) - sum_n log(1 - s(neg_n)).

  Args:
    pos_logits: `[B, L]`.
    neg_logits: `[B, L, N]`.
    targets: `[B, L]` ids; 0 marks padding.
  """
  per_pos = -jax.nn.log_sigmoid(pos_logits) - jnp.sum(
      jax.nn.log_sigmoid(-neg_logits), axis=-1)
  return _mean_over_valid(per_pos, targets)


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


def bce(model, h, targets, rng, config, log_q):
  """SASRec BCE with `num_negatives` fresh negatives per position."""
  n = config.num_negatives
  negs = sample_negatives(rng, targets.shape + (n,), log_q, config.sampling)
  pos = jnp.sum(h * model.item_vectors(targets), -1) / config.temperature
  neg = jnp.einsum("bld,blnd->bln", h, model.item_vectors(negs))
  return bce_from_logits(pos, neg / config.temperature, targets)


def softmax(model, h, targets, rng, config, log_q):
  """Full softmax over every item (exact; O(B L V) memory)."""
  del rng, log_q
  logits = jnp.einsum("bld,vd->blv", h, model.all_item_vectors())
  return softmax_from_logits(logits / config.temperature, targets)


def sampled_softmax(model, h, targets, rng, config, log_q):
  """Sampled softmax with `num_negatives` negatives per group of positions.

  `config.negatives_group` consecutive positions of a row share one set of
  negatives (0 = the whole row; 1 = fresh negatives at every position, as in
  generative-recommenders). Every position scores `num_negatives` items
  whatever the grouping, so the logits cost the same; smaller groups only
  gather more embeddings and push down more distinct items per step.
  """
  b, l = targets.shape
  group = config.get("negatives_group", 0) or l
  g = -(-l // group)  # groups per row
  pad = g * group - l
  negs = sample_negatives(rng, (b, g, config.num_negatives), log_q,
                          config.sampling)  # [B, G, N]
  pos = jnp.sum(h * model.item_vectors(targets), -1) / config.temperature
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


SAMPLINGS = ("uniform", "popularity")
EXACT = ("softmax",)  # losses over every item: no `num_negatives`

LOSSES = {
    "bce": bce,
    "softmax": softmax,
    "sampled_softmax": sampled_softmax,
}
