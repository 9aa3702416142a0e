"""Config validation: every impossible setting stops with the field's name
and its allowed values before any data is read or compiled."""

from recattn import attention, losses, models
from recattn.models import sasrec


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
  _choice(config, "model.name", models.REGISTRY)
  _choice(config, "model.attention", attention.REGISTRY)
  _choice(config, "model.norm", sasrec.NORMS)
  _choice(config, "data.train_windows", ("last", "all"))
  _choice(config, "loss.name", losses.LOSSES)
  _choice(config, "loss.sampling", ("uniform", "popularity"))
  if config.loss.name != "softmax":
    _positive(config, "loss.num_negatives")
  _choice(config, "optimizer.name", ("adam", "adamw"))
  _choice(config, "optimizer.schedule", ("constant", "cosine", "linear"))
  _positive(config, "optimizer.warmup_steps", zero_ok=True)
  _positive(config, "optimizer.clip_norm", zero_ok=True)
  _choice(config, "eval.negatives", ("uniform", "popularity"))
  _positive(config, "eval.patience", zero_ok=True)
  _require(config.eval.select_metric.startswith("valid/"),
           f"config.eval.select_metric={config.eval.select_metric!r}: "
           "selection must use a validation metric ('valid/...')")
