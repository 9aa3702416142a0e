"""What every sequential recommender shares: item and position embeddings,
the shared input/output item table, and unit-norm scoring.

Subclasses build `self.blocks` (and may override `output`); `encode(items)
gives `[B, L, D]` user states, `encode(items, last=n)` those of the last n
positions only. The trainer, losses and evaluators only use `encode`,
`item_vectors` and `all_item_vectors`.

The item table's rows carry the logical axis "items" (sharded over the
`model` mesh axis by `config.mesh.rules`); `pad_item_rows` rounds the row
count up so that it divides over that axis.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recattn import attention
from recattn import dropout as dropout_lib
from recattn.attention import relative

# Relative attention biases a model can add to every block's attention:
# T5-bucketed learned positions, ALiBi, time-interval buckets (needs
# timestamps), or positions and time together (HSTU's rab).
REL_BIASES = ("none", "position", "alibi", "time", "position+time")

# Where a time-interval bias measures a query's time from
# (`model.time_query`):
#   "own":  the query item's own timestamp (t_i - t_j): nothing about the
#           item being predicted;
#   "next": the next item's, i.e. the time of the prediction (t_{i+1} - t_j;
#           at the last position, the held-out item's time), as in
#           generative-recommenders' HSTU. The model learns how long ago
#           each key was, seen from the request; offline the request time
#           is the target's timestamp, which tells the model, for instance,
#           whether the target came in the same burst as the last items.
#           The data pipeline passes `query_times` (shifted by one item).
TIME_QUERIES = ("own", "next")

# Learned absolute positions (`model.positions`):
#   "right": counted back from the most recent item, as in Kang's SASRec
#            (left-padded windows: the last item always has the same
#            position); every new event moves every earlier item's position.
#   "left":  counted from the first item of the window, as in
#            generative-recommenders' research code and SASRec+ (windows
#            padded at the end, positions 0, 1, ...): a short history's
#            positions also say how long it is. Appending an event leaves
#            earlier positions, hence earlier keys and values, as they are
#            (what incremental serving needs, recattn.serving).
#   "none":  no absolute position (relative biases, if any, only).
POSITIONS = ("right", "left", "none")


# Item side features fused into the item vectors (`model.item_features`):
#   "none":       the id embedding only;
#   "attributes": plus the mean of the item's categorical attributes'
#                 embeddings (S3-Rec's category and brand ids, ML-1M's
#                 genres and decade: `recattn.data.load_item_attributes`),
#                 on the input and the output side alike, so the table stays
#                 shared and an item with few interactions borrows from
#                 items that share its attributes.
ITEM_FEATURES = ("none", "attributes")


class StaticTable:
  """A constant int array kept in a module's graph, not in its state.

  Hashes by content, so that NNX's graph definition stays a cache key; the
  array becomes a constant of whatever `jit` traces the model.
  """

  def __init__(self, array: np.ndarray):
    self.array = np.asarray(array)
    self.array.flags.writeable = False
    self._hash = hash((self.array.shape, self.array.tobytes()))

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return (isinstance(other, StaticTable) and self._hash == other._hash
            and np.array_equal(self.array, other.array))


# Dense layers multiply `[..., D]` inputs as one 2-D matmul `[N, D] x [D, E]`
# (leading axes flattened). XLA:CPU lowers the gradient of a 3-D
# `dot_general` (`[B, L, D]` contracting D) with a transposed copy of the
# `[B, L, E]` cotangent; flattened, it has none (an ML-1M SASRec epoch
# 0.87x as long: experiments/000_speed_lean_step/cpu_matmul_layout.py).
# The values are the same; False restores nnx.Linear's 3-D form (for that
# benchmark).
FLATTEN_DENSE = True


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x @ w` for `x: [..., D]`, `w: [D, E]`, as one 2-D matmul."""
  if not FLATTEN_DENSE or x.ndim <= 2:
    return x @ w
  return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


class Dense(nnx.Linear):
  """`nnx.Linear` (same parameters) whose matmul is `matmul`'s 2-D one."""

  def __call__(self, x: jax.Array) -> jax.Array:
    if not FLATTEN_DENSE or x.ndim <= 2:
      return super().__call__(x)
    y = super().__call__(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


# Relative biases a ranking head allows: candidates all sit at the slot after
# the history, but a bias computed from key indices would place the j-th
# candidate j slots further; time buckets depend on timestamps only.
RANK_HEAD_REL_BIASES = ("none", "time")


def check_rank_head(positions: str, rel_bias: str, prefix: str = "") -> None:
  """Raises ValueError unless `model.rank_head` can score candidates exactly.

  `prefix` goes before each field name ("config." in config errors).
  """
  if positions == "right":
    raise ValueError(
        f"{prefix}model.rank_head=True needs {prefix}model.positions='left' "
        "or 'none' (got 'right'): candidates are scored against the "
        "history's cached keys, which 'right' positions move at every event")
  if rel_bias not in RANK_HEAD_REL_BIASES:
    raise ValueError(
        f"{prefix}model.rank_head=True: {prefix}model.rel_bias={rel_bias!r} "
        f"is not supported; allowed values are {list(RANK_HEAD_REL_BIASES)}")


def uses_time(rel_bias: str) -> bool:
  """Whether `model.rel_bias` needs timestamps in every batch."""
  return "time" in rel_bias


class SequenceRecommender(nnx.Module):
  """Embeddings and scoring shared by SASRec, HSTU, ..."""

  # Whether a state depends only on its own and earlier items. A model whose
  # states see later items (BSARec's filter) trains on per-prefix rows.
  causal = True

  def __init__(self, *, num_items: int, max_len: int, dim: int,
               dropout: float, l2_norm: bool, pos_init: float = 0.02,
               num_heads: int = 1, rel_bias: str = "none",
               remat: bool = False, positions: str = "right",
               rank_head: bool = False,
               item_attributes: tuple[np.ndarray, int] | None = None,
               rngs: nnx.Rngs):
    self.dim = dim
    self.num_items = num_items
    # Recompute each block's activations in the backward pass (memory for
    # long sequences, at the cost of a second forward through the blocks).
    self.remat = remat
    if rel_bias not in REL_BIASES:
      raise ValueError(f"model.rel_bias={rel_bias!r}: allowed values are "
                       f"{list(REL_BIASES)}")
    self.rel_bias = rel_bias
    if positions not in POSITIONS:
      raise ValueError(f"model.positions={positions!r}: allowed values are "
                       f"{list(POSITIONS)}")
    self.positions = positions
    self.num_heads = num_heads
    if "position" in rel_bias:
      self.position_bias = relative.RelativePositionBias(
          num_heads, num_buckets=32, max_distance=max_len, rngs=rngs)
    if uses_time(rel_bias):
      self.time_bias = relative.TimeIntervalBias(num_heads, rngs=rngs)
    self.l2_norm = l2_norm
    # Row 0 is padding; it is masked out of every score and loss. Rows are
    # the logical "items" axis (eager_sharding=False: models are built
    # before, and independently of, any mesh; the trainer places them).
    self.item_embedding = nnx.Embed(
        num_items + 1, dim, embedding_init=nnx.with_partitioning(
            nnx.initializers.normal(0.02), ("items", None),
            eager_sharding=False),
        rngs=rngs)
    # `item_attributes = (attr_ids [V + 1, A] with 0 padding, vocabulary
    # size)`: see ITEM_FEATURES.
    if item_attributes is None:
      self.attr_ids = None
      self.attr_embedding = None
    else:
      attr_ids, num_attrs = item_attributes
      if attr_ids.shape[0] != num_items + 1:
        raise ValueError(f"item_attributes has {attr_ids.shape[0]} rows for "
                         f"{num_items} items (expected num_items + 1)")
      self.attr_ids = nnx.static(StaticTable(attr_ids.astype(np.int32)))
      self.attr_embedding = nnx.Embed(
          num_attrs, dim, embedding_init=nnx.initializers.normal(0.02),
          rngs=rngs)
    # Positions are counted from the most recent item (right-aligned).
    self.pos_embedding = nnx.Embed(
        max_len, dim, embedding_init=nnx.initializers.normal(pos_init),
        rngs=rngs)
    self.dropout = dropout_lib.Dropout(dropout)
    if rank_head:
      check_rank_head(positions, rel_bias)
    # Target-aware ranking head (`recattn.serving.incremental.score_targets`):
    # a candidate item is run through the blocks after the history, seeing
    # the history and itself; this maps its last-block output to one logit.
    self.rank_head = nnx.Sequential(
        nnx.LayerNorm(dim, rngs=rngs), Dense(dim, 1, rngs=rngs)
    ) if rank_head else None

  def target_logits(self, x: jax.Array) -> jax.Array:
    """`[..., T]` ranking logits of candidate tokens' last-block outputs."""
    if self.rank_head is None:
      raise ValueError("this model has no ranking head: train it with "
                       "config.model.rank_head=True (and loss.rank_weight "
                       "> 0) to score candidate lists")
    # On the last block's raw output: LayerNorm gives it unit-scale
    # components (a unit-norm state would bound the logits by |w|).
    return self.rank_head(x)[..., 0]

  def _normalize(self, x):
    if not self.l2_norm:
      return x
    return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)

  def _attribute_vectors(self, ids: jax.Array) -> jax.Array:
    """Mean attribute embedding `[..., D]` of items `[...]` (0 if none)."""
    attrs = jnp.asarray(self.attr_ids.array)[ids]  # [..., A]
    present = (attrs > 0).astype(self.attr_embedding.embedding.dtype)
    total = jnp.einsum("...a,...ad->...d", present,
                       self.attr_embedding(attrs))
    return total / jnp.maximum(present.sum(-1, keepdims=True), 1.0)

  def item_rows(self, ids: jax.Array) -> jax.Array:
    """The shared item table's rows `[..., D]` for ids `[...]`, side
    features included (before scaling or unit norm)."""
    x = self.item_embedding(ids)
    if self.attr_embedding is not None:
      x = x + self._attribute_vectors(ids)
    return x

  def item_vectors(self, ids: jax.Array) -> jax.Array:
    """Output-side item vectors `[..., D]` for item ids `[...]`."""
    return self._normalize(self.item_rows(ids))

  def all_item_vectors(self) -> jax.Array:
    """`[V + 1, D]`; row 0 (padding) must be masked by the caller."""
    table = self.item_embedding.embedding[...]
    if table.shape[0] != self.num_items + 1:  # rows added by pad_item_rows
      table = table[:self.num_items + 1]
    if self.attr_embedding is not None:
      table = table + self._attribute_vectors(
          jnp.arange(self.num_items + 1))
    return self._normalize(table)

  def pad_item_rows(self, multiple: int) -> int:
    """Appends zero rows to the item table up to a multiple of `multiple`.

    For sharding the rows over a `model` axis of that size. The extra rows
    (ids > V) are never looked up, scored or sampled: `all_item_vectors`
    still gives `[V + 1, D]`, so their gradient, and their Adam moments,
    stay zero. Call before `nnx.split`. Returns the number of rows added.
    """
    table = self.item_embedding.embedding
    rows = table.shape[0]
    pad = -rows % multiple
    if pad:
      table.set_value(jnp.pad(table[...], ((0, pad), (0, 0))))
      self.item_embedding.num_embeddings = rows + pad
    return pad

  @staticmethod
  def common_kwargs(model_config) -> dict:
    """Constructor arguments every model reads from `config.model`."""
    get = model_config.get
    attn = get("attn")
    return dict(
        dim=model_config.dim,
        num_blocks=model_config.num_blocks,
        num_heads=model_config.num_heads,
        dropout=model_config.dropout,
        attention=model_config.attention,
        l2_norm=get("l2_norm", False),
        attn_config=None if attn is None else attn.to_dict(),
        rel_bias=get("rel_bias", "none"),
        remat=get("remat", False),
        positions=get("positions", "right"),
        rank_head=get("rank_head", False),
    )

  def attention_bias(self, times: jax.Array | None = None,
                     query_times: jax.Array | None = None):
    """The relative attention bias shared by all blocks (or None).

    Args:
      times: `[B, L]` int timestamps (seconds) of the items; required by the
        time-interval bias, ignored otherwise.
      query_times: `[B, L]` the times the queries measure intervals from
        (`model.time_query="next"`: the next item's); None = `times`.
    """
    if self.rel_bias == "alibi":
      return relative.alibi(self.num_heads)
    parts = []
    if "position" in self.rel_bias:
      parts.append(self.position_bias())
    if uses_time(self.rel_bias):
      if times is None:
        raise ValueError(f"model.rel_bias={self.rel_bias!r} needs item "
                         "timestamps: pass encode(items, times=...)")
      parts.append(self.time_bias(times, query_times))
    return relative.combine(*parts)

  def embed(self, items: jax.Array, rngs: nnx.Rngs | None):
    """Scaled item + position embeddings with dropout, zero at padding.

    Returns `(x [B, L, D], valid [B, L] bool)`.
    """
    valid = items > 0
    if self.positions == "right":
      pos = jnp.arange(self.pos_embedding.num_embeddings - items.shape[1],
                       self.pos_embedding.num_embeddings)[None]
    else:
      # Windows are left-padded: position = number of items before it.
      pos = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    x = self.embed_at(items, pos)
    x = self.dropout(x, rngs=rngs, deterministic=rngs is None)
    return x * valid[..., None].astype(x.dtype), valid

  def embed_at(self, items: jax.Array, positions: jax.Array) -> jax.Array:
    """Scaled item embeddings plus the embeddings of `positions`.

    Args:
      items: `[B, T]` ids.
      positions: `[B|1, T]` indices into the position table (ignored when
        `positions="none"`).
    """
    x = self.item_rows(items) * math.sqrt(self.dim)
    if self.positions == "none":
      return x
    return x + jnp.take(self.pos_embedding.embedding[...], positions, axis=0)

  def output(self, x: jax.Array) -> jax.Array:
    """Maps the last block's output to user states (default: unit norm)."""
    return self._normalize(x)

  def encode(
      self,
      items: jax.Array,  # [B, L] int, left-padded with 0
      *,
      times: jax.Array | None = None,  # [B, L] int seconds, aligned
      query_times: jax.Array | None = None,  # [B, L]; see TIME_QUERIES
      rngs: nnx.Rngs | None = None,
      return_weights: bool = False,
      last: int | None = None,
  ):
    """Returns user states `[B, L, D]` (and per-block weights if asked).

    Runs `self.blocks` (each `block(x, mask, bias, *, rngs, return_weights,
    last) -> (x, weights)`) under a causal, padding-aware mask.

    `last`: only the last `last` positions' states are wanted (`[B, last,
    D]`): the final block computes queries, feed-forward and output there
    only (its keys and values still come from every position), which is
    what training on per-prefix rows and scoring the next item need. The
    values are those of the full output's last `last` positions.
    """
    length = items.shape[1]
    if last is not None and not 1 <= last <= length:
      raise ValueError(f"encode(last={last}) for windows of {length} items: "
                       f"must be in [1, {length}]")
    if last == length:
      last = None
    x, valid = self.embed(items, rngs)
    keep = valid[..., None].astype(x.dtype)
    mask = attention.Mask(causal=True, key_valid=valid)
    bias = self.attention_bias(times, query_times)
    weights = []

    def run(block, x, mask, bias, rngs, last=None):
      # Blocks are asked for `last` only when it is set.
      kwargs = {} if last is None else {"last": last}
      return block(x, mask, bias, rngs=rngs, return_weights=return_weights,
                   **kwargs)

    if self.remat:
      run = nnx.remat(run, static_argnums=5)
    final = len(self.blocks) - 1
    for i, block in enumerate(self.blocks):
      tail = last if i == final else None
      x, w = run(block, x, mask, bias, rngs, tail)
      x = x * (keep if tail is None else keep[:, -tail:])
      weights.append(w)
    if last is not None and not self.blocks:
      x = x[:, -last:]
    h = self.output(x)
    return (h, weights) if return_weights else h
