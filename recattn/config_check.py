"""Config validation: every impossible setting stops with the field's name
and its allowed values before any data is read or compiled."""

from recattn import attention, losses, models
from recattn import data as data_lib
from recattn.attention import hstu as hstu_attention
from recattn.attention import linear
from recattn.data import batching
from recattn.models import base as models_base
from recattn.models import sasrec
from recattn.serving import incremental


class ConfigError(ValueError):
  """An impossible config; the message names the field and allowed values."""


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _choice(config, field: str, allowed) -> None:
  value = _get(config, field)
  _require(value in allowed,
           f"config.{field}={value!r}: allowed values are {sorted(allowed)}")


def _positive(config, field: str, zero_ok: bool = False) -> None:
  value = _get(config, field)
  ok = isinstance(value, (int, float)) and (value >= 0 if zero_ok else
                                            value > 0)
  bound = ">= 0" if zero_ok else "> 0"
  _require(ok, f"config.{field}={value!r}: must be a number {bound}")


def _get(config, field: str):
  value = config
  for part in field.split("."):
    value = value[part]
  return value


def validate(config) -> None:
  """Raises ConfigError on the first impossible field."""
  for field in ("data.max_len", "model.dim", "model.num_blocks",
                "model.num_heads", "batch_size", "num_epochs",
                "optimizer.lr", "eval.every_epochs", "eval.batch_size",
                "eval.num_negatives", "loss.temperature"):
    _positive(config, field)
  _positive(config, "model.num_blocks", zero_ok=True)
  _require(0.0 <= config.model.dropout < 1.0,
           f"config.model.dropout={config.model.dropout!r}: must be in "
           "[0, 1)")
  _require(config.model.dim % config.model.num_heads == 0,
           f"config.model.num_heads={config.model.num_heads} must divide "
           f"config.model.dim={config.model.dim}; allowed heads: "
           f"{[h for h in range(1, config.model.dim + 1) if config.model.dim % h == 0]}")
  for field in ("model.qk_dim", "model.v_dim"):
    if config.model.get(field.split(".")[1]) is not None:
      _positive(config, field, zero_ok=True)
  _require(config.model.get("v_dim", 0) == 0 or config.model.name == "hstu",
           f"config.model.v_dim={config.model.get('v_dim')}: only "
           "model.name='hstu' has it; SASRec's values have dim / num_heads "
           "features per head (set 0)")
  _choice(config, "model.name", models.REGISTRY)
  _choice(config, "model.attention", attention.REGISTRY)
  _choice(config, "model.norm", sasrec.NORMS)
  _choice(config, "model.dense_init", tuple(sasrec.DENSE_INITS))
  ffn_act = config.model.get("ffn_act", "relu")  # absent from older records
  _require(ffn_act in sasrec.FFN_ACTS,
           f"config.model.ffn_act={ffn_act!r}: allowed values are "
           f"{sorted(sasrec.FFN_ACTS)}")
  _require(ffn_act == "relu" or config.model.name == "sasrec",
           f"config.model.ffn_act={ffn_act!r}: only "
           "model.name='sasrec' has it (BSARec's feed-forward layer is GELU, "
           "HSTU has none); set 'relu'")
  _choice(config, "model.rel_bias", models_base.REL_BIASES)
  _choice(config, "model.positions", models_base.POSITIONS)
  alpha, c = (config.model.get("bsarec_alpha", 0.7),
              config.model.get("bsarec_c", 5))
  _require(isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0,
           f"config.model.bsarec_alpha={alpha!r}: must be in [0, 1]")
  _require(isinstance(c, int) and c >= 1,
           f"config.model.bsarec_c={c!r}: must be an int >= 1")
  features = config.model.get("item_features", "none")
  _require(features in models_base.ITEM_FEATURES,
           f"config.model.item_features={features!r}: allowed values are "
           f"{list(models_base.ITEM_FEATURES)}")
  _require(features == "none"
           or config.data.name in data_lib.ATTRIBUTE_DATASETS,
           f"config.model.item_features={features!r}: "
           f"config.data.name={config.data.name!r} has no item attributes; "
           f"datasets with them: {list(data_lib.ATTRIBUTE_DATASETS)}")
  time_query = config.model.get("time_query", "own")
  _require(time_query in models_base.TIME_QUERIES,
           f"config.model.time_query={time_query!r}: allowed values are "
           f"{list(models_base.TIME_QUERIES)}")
  _require(time_query == "own" or models_base.uses_time(
      config.model.rel_bias),
           f"config.model.time_query={time_query!r} moves the query time of "
           "a time-interval bias, but config.model.rel_bias="
           f"{config.model.rel_bias!r} has none: use 'time' or "
           "'position+time', or time_query 'own'")
  _require(time_query == "own" or not config.model.get("rank_head", False),
           "config.model.time_query='next' with config.model.rank_head=True: "
           "the ranking head scores candidates from cached keys without the "
           "next items' times; use time_query 'own'")
  _validate_attention_options(config)
  _choice(config, "data.train_windows", batching.TRAIN_WINDOWS)
  _validate_non_causal(config)
  shards = config.data.get("process_shards", False)
  _require(isinstance(shards, bool),
           f"config.data.process_shards={shards!r}: must be True or False")
  holdout = config.data.get("stream_holdout", 0.0)
  _require(isinstance(holdout, (int, float)) and 0.0 <= holdout < 1.0,
           f"config.data.stream_holdout={holdout!r}: must be in [0, 1) "
           "(0 = off)")
  _choice(config, "loss.name", losses.LOSSES)
  _choice(config, "loss.sampling", losses.SAMPLINGS)
  if config.loss.name not in losses.EXACT:
    _positive(config, "loss.num_negatives")
  _require(config.loss.sampling != "in_batch"
           or config.loss.name == "sampled_softmax",
           f"config.loss.sampling='in_batch' needs loss.name="
           f"'sampled_softmax' (got {config.loss.name!r}); allowed for "
           "bce and gbce: 'uniform', 'popularity'")
  _positive(config, "loss.item_chunk")
  _positive(config, "loss.negatives_pool", zero_ok=True)
  _require(0.0 <= config.loss.gbce_t <= 1.0,
           f"config.loss.gbce_t={config.loss.gbce_t!r}: must be in [0, 1]")
  _validate_rank_head(config)
  _choice(config, "optimizer.name", ("adam", "adamw"))
  _choice(config, "optimizer.schedule", ("constant", "cosine", "linear"))
  _positive(config, "optimizer.warmup_steps", zero_ok=True)
  _positive(config, "optimizer.clip_norm", zero_ok=True)
  ema = config.optimizer.get("ema_decay", 0.0)
  _require(isinstance(ema, (int, float)) and 0.0 <= ema < 1.0,
           f"config.optimizer.ema_decay={ema!r}: must be in [0, 1) "
           "(0 = off; e.g. 0.999)")
  _choice(config, "eval.negatives", ("uniform", "popularity"))
  _positive(config, "eval.patience", zero_ok=True)
  select = config.eval.select_metric
  _require(select.startswith("valid/") or select == "none",
           f"config.eval.select_metric={select!r}: selection must use a "
           "validation metric ('valid/...'), or 'none' (test the last epoch)")
  train_on_valid = config.data.get("train_on_valid", False)
  _require(isinstance(train_on_valid, bool),
           f"config.data.train_on_valid={train_on_valid!r}: must be True or "
           "False")
  _require(not train_on_valid or select == "none",
           "config.data.train_on_valid=True trains on the validation items, "
           f"so config.eval.select_metric={select!r} would select on "
           "trained-on data; set config.eval.select_metric='none'")


def _validate_non_causal(config) -> None:
  """Models whose states see later items (`causal = False`: BSARec)."""
  name = config.model.name
  if models.REGISTRY[name].causal:
    return
  windows = config.data.train_windows
  _require(windows == "prefixes",
           f"config.model.name={name!r} with config.data.train_windows="
           f"{windows!r}: its states see later items of the window, so "
           "training on every position would show each target to the "
           "model; allowed value: 'prefixes' (one row per target)")
  _require(config.model.positions == "right",
           f"config.model.name={name!r}: config.model.positions="
           f"{config.model.positions!r}; allowed value: 'right'")
  _require(not config.model.get("rank_head", False),
           f"config.model.name={name!r}: config.model.rank_head=True scores "
           "candidates after a cached history, which needs causal states; "
           "allowed value: False")


def _validate_rank_head(config) -> None:
  """`model.rank_head` and the loss that trains it."""
  head = config.model.get("rank_head", False)
  _require(isinstance(head, bool),
           f"config.model.rank_head={head!r}: must be True or False")
  weight = config.loss.get("rank_weight", 0.0)
  _require(isinstance(weight, (int, float)) and weight >= 0,
           f"config.loss.rank_weight={weight!r}: must be >= 0 (0 = off)")
  _require(not weight or head,
           f"config.loss.rank_weight={weight!r} trains a ranking head: set "
           "config.model.rank_head=True")
  _require(not weight or config.data.train_windows != "prefixes",
           f"config.loss.rank_weight={weight!r} with "
           "config.data.train_windows='prefixes': the ranking head trains on "
           "every position of a window; use train_windows 'last' or 'all'")
  if not head:
    return
  _positive(config, "loss.rank_negatives")
  _positive(config, "loss.rank_cuts")
  try:
    models_base.check_rank_head(config.model.positions, config.model.rel_bias,
                                prefix="config.")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  unsupported = incremental.TARGET_VARIANTS_UNSUPPORTED
  _require(config.model.attention not in unsupported,
           f"config.model.rank_head=True: config.model.attention="
           f"{config.model.attention!r} cannot score candidate lists; "
           f"unsupported: {list(unsupported)}")


def _validate_attention_options(config) -> None:
  """The `model.attn` fields of the chosen variant (each reads its own)."""
  attn = config.model.get("attn")
  if attn is None:
    return
  _require(0.0 <= attn.dropout < 1.0,
           f"config.model.attn.dropout={attn.dropout!r}: must be in [0, 1)")
  for field in ("temperature", "window", "linear_chunk", "num_latents",
                "low_rank_chunk", "block_q", "block_k"):
    _positive(config, f"model.attn.{field}")
  _positive(config, "model.attn.hidden", zero_ok=True)
  _choice(config, "model.attn.linear_feature", linear.FEATURES)
  _choice(config, "model.attn.normalizer", hstu_attention.NORMALIZERS)
  _choice(config, "model.attn.hstu_impl", hstu_attention.IMPLS)
  head = config.model.dim // config.model.num_heads
  qk, v = (config.model.get("qk_dim", 0) or head,
           config.model.get("v_dim", 0) or head)
  _require(not attn.low_rank_value_pool or qk == v,
           f"config.model.attn.low_rank_value_pool=True pools values with "
           f"key-sized weights: needs the same per-head size for queries/keys "
           f"({qk}) and values ({v}); set model.qk_dim (and model.v_dim) equal")
  hidden = attn.din_hidden
  _require(all(isinstance(h, int) and h > 0 for h in hidden),
           f"config.model.attn.din_hidden={hidden!r}: must be positive ints")
  for field in ("alpha", "hstu_block_k"):
    value = attn[field]
    _require(value is None or value > 0,
             f"config.model.attn.{field}={value!r}: must be None or > 0")
