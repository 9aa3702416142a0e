"""Small models for the serving tests (incremental state, candidate scoring)."""

from configs import base as base_config
from recattn import models

NUM_ITEMS = 50
MAX_LEN = 12


def small_model(name, attention, overrides, **fields):
  """A dim-16, 2-head, 2-block model with `positions="left"`.

  Args:
    name, attention: `config.model.name` and `.attention`.
    overrides: `{"model.<path>": value}`, e.g. `{"model.attn.window": 3}`.
    **fields: `config.model` fields, e.g. `positions="right"`.
  """
  c = base_config.get_base_config().model
  c.name = name
  c.attention = attention
  c.dim = 16
  c.num_heads = 2
  c.num_blocks = 2
  c.positions = "left"
  fields = {f"model.{key}": value for key, value in fields.items()}
  for key, value in {**overrides, **fields}.items():
    node = c
    *path, last = key.split(".")[1:]
    for part in path:
      node = node[part]
    node[last] = value
  return models.create(c, num_items=NUM_ITEMS, max_len=MAX_LEN, seed=3)
