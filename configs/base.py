"""Defaults shared by every config; each config file overrides a few fields."""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the default config (every field the trainer reads)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 128  # users per step (one window each)
  c.num_epochs = 100
  c.progress = True  # progress bar on stderr

  c.data = ml_collections.ConfigDict()
  c.data.name = "ml-1m-seq"
  c.data.max_len = 200  # items per window (most recent kept)
  # Length bucketing of training batches: rows grouped by length within
  # chunks of `bucket_chunk` batches (0 = plain shuffle), windows cut to a
  # multiple of `bucket_step` items (0 = always max_len).
  c.data.bucket_chunk = 16
  # last: each user's most recent max_len targets; all: every target, in
  # non-overlapping windows over long histories; prefixes: one row per
  # target, its history right-aligned, scored at the last position only.
  c.data.train_windows = "last"
  c.data.bucket_step = 50
  c.data.manual_dir = ""  # raw files; "" = $RECATTN_MANUAL_DIR
  c.data.data_dir = ""  # prepared TFDS data; "" = $RECATTN_DATA_DIR or ~/.cache/recattn/tfds
  c.data.min_rating = 0.0  # keep ratings >= this (rated sources only)
  c.data.min_item_count = 0  # drop items with fewer interactions
  c.data.min_user_count = 3  # drop users with fewer (leave-one-out needs 3)
  c.data.synthetic_num_users = 1000
  c.data.synthetic_num_items = 500
  c.data.synthetic_mean_len = 30
  c.data.synthetic_seed = 0
  c.data.synthetic_zipf = 0.8  # synthetic: Zipf exponent of item popularity
  # Multi-process runs: each process reads and batches only its users
  # (u % P == process index); see docs/distributed.md.
  c.data.process_shards = False
  # Hold out the newest fraction of all interactions (by time) from
  # training, for a streaming replay (python -m recattn.serving.stream);
  # 0 = off. Needs timestamps.
  c.data.stream_holdout = 0.0
  # Train on the validation item too (only the test item held out), as
  # generative-recommenders' research code does; needs
  # eval.select_metric="none" (nothing left to select on).
  c.data.train_on_valid = False

  c.model = ml_collections.ConfigDict()
  c.model.name = "sasrec"
  c.model.attention = "scaled_dot"  # see recattn.attention.REGISTRY
  # Options of the attention variants; each variant reads its own.
  c.model.attn = ml_collections.ConfigDict()
  c.model.attn.dropout = 0.0  # attention-weight dropout (softmax variants)
  c.model.attn.temperature = 1.0  # scaled_dot: softmax(QK^T/(tau sqrt d))
  c.model.attn.window = 50  # local: attend to the last `window` items
  c.model.attn.linear_feature = "elu"  # linear: elu (elu+1) | l2 (LinRec)
  c.model.attn.linear_chunk = 64  # linear: positions per prefix-sum chunk
  c.model.attn.num_latents = 16  # low_rank: latent interests r
  c.model.attn.low_rank_value_pool = False  # low_rank: own value pooling
  c.model.attn.low_rank_chunk = 64  # low_rank: positions per chunk
  c.model.attn.block_q = 128  # blockwise: query / key tile sizes
  c.model.attn.block_k = 128
  # hstu: scale of QK^T (None = 1/sqrt(d_qk)); key tile (None = no tiling)
  c.model.attn.alpha = ml_collections.FieldReference(None, field_type=float)
  c.model.attn.hstu_block_k = ml_collections.FieldReference(None,
                                                            field_type=int)
  c.model.attn.normalizer = "padded"  # hstu: divide by padded | true length
  c.model.attn.hstu_impl = "auto"  # hstu: auto (Pallas on GPU) | xla | pallas
  c.model.attn.hidden = 0  # additive: score MLP width; 0 = head size
  c.model.attn.din_hidden = (80, 40)  # din: activation-unit MLP widths
  c.model.attn.din_normalize = True  # din: softmax (False: DIN's raw sum)
  c.model.num_blocks = 2
  c.model.num_heads = 1
  c.model.dim = 50
  c.model.ffn_dim = 0  # 0 = dim
  c.model.dropout = 0.2
  # LayerNorm placement: sasrec | pre | post | ligr (pre-norm with gated
  # residuals, eSASRec's layer)
  c.model.norm = "sasrec"
  c.model.ffn_act = "relu"  # feed-forward activation: relu | gelu | swiglu
  # Kernel init of SASRec's projections and feed-forward layers: torch
  # (uniform, bound 1/sqrt(fan_in)) | normal (N(0, 0.02), as in SASRec+)
  c.model.dense_init = "torch"
  c.model.l2_norm = False  # unit-norm user states and item vectors
  # none | position (T5 buckets) | alibi | time | position+time (timestamps)
  c.model.rel_bias = "none"
  # own | next: a time-interval bias measures from the query item's own time,
  # or from the next item's (the prediction's; generative-recommenders' HSTU)
  c.model.time_query = "own"
  c.model.qk_dim = 0  # per-head size of Q, K (d_k); 0 = dim / heads
  c.model.v_dim = 0  # hstu: per-head size of U, V; 0 = dim / heads
  c.model.kv_raw = False  # sasrec norm: keys/values from the un-normed input
  # right (SASRec: counted back from the newest item) | left (from the
  # window's first item; incremental serving) | none
  c.model.positions = "right"
  # A ranking head for target-aware candidate scoring (M-FALCON,
  # recattn.serving.incremental.score_targets); needs positions left|none,
  # rel_bias none|time and loss.rank_weight > 0 to be trained.
  c.model.rank_head = False
  # none | attributes (S3-Rec category/brand ids, mean-pooled and added to
  # the item vectors; beauty, sports, toys)
  c.model.item_features = "none"
  c.model.pos_init = 0.02  # std of the position-embedding init
  c.model.final_norm = True  # LayerNorm on the last block's output
  c.model.remat = False  # recompute each block in the backward pass
  # bsarec: weight of the frequency filter against the attention, and BSARec's
  # c (the filter keeps the c // 2 + 1 lowest frequencies of the window)
  c.model.bsarec_alpha = 0.7
  c.model.bsarec_c = 5

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "sampled_softmax"  # bce | softmax | sampled_softmax
  c.loss.num_negatives = 128
  c.loss.sampling = "uniform"  # uniform | popularity | in_batch
  c.loss.negatives_group = 0  # positions sharing negatives; 0 = whole row
  # > 0: each position picks its negatives from one pool of this many items
  # per step (per-position negatives at the cost of one matmul)
  c.loss.negatives_pool = 0
  c.loss.logq_correction = True
  c.loss.temperature = 1.0  # logits = <h, e> / temperature
  c.loss.item_chunk = 1024  # softmax_chunked: items per block of the scan
  c.loss.gbce_t = 0.75  # gbce: calibration t in [0, 1] (Petrov & Macdonald)
  # Weight of the ranking head's loss (model.rank_head): per row, `rank_cuts`
  # random positions' next items against `rank_negatives` uniform items, scored
  # target-aware after that position's history; softmax over the list.
  c.loss.rank_weight = 0.0
  c.loss.rank_negatives = 16
  c.loss.rank_cuts = 4  # positions per row scored each step (rank_weight > 0)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"  # adam | adamw
  c.optimizer.lr = 1e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.weight_decay = 0.0  # adamw only
  c.optimizer.schedule = "constant"  # constant | cosine | linear (after warm-up)
  c.optimizer.warmup_steps = 0
  c.optimizer.clip_norm = 0.0  # 0 = no clipping
  # Polyak averaging: evaluation, selection, test and serving use an
  # exponential moving average of the parameters with this decay per step
  # (0 = off; 0.999 averages ~the last 1,000 steps; recattn.optim.params_ema).
  c.optimizer.ema_decay = 0.0

  c.eval = ml_collections.ConfigDict()
  c.eval.every_epochs = 5
  c.eval.batch_size = 512  # users per eval step
  c.eval.filter_seen = False  # exclude a user's earlier items from full ranking
  c.eval.num_negatives = 100  # sampled protocol: the positive + this many
  c.eval.negatives = "uniform"  # uniform | popularity
  c.eval.seed = 0  # seed of the sampled-protocol negatives
  # A valid/... metric, or "none": no selection, the last epoch is tested.
  c.eval.select_metric = "valid/full/ndcg@10"
  c.eval.patience = 0  # evaluations without improvement before stopping; 0 = off

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_epochs = 5

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the data axis; -1 = all not on model
  c.mesh.model = 1  # devices on the model axis (item-table rows); -1 = rest
  # Logical axis -> mesh axis (None = replicated).
  c.mesh.rules = (("batch", "data"), ("items", "model"))
  return c
