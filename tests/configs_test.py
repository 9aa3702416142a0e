"""Every shipped config validates and builds its model."""

import importlib

import jax.numpy as jnp
import numpy as np
import pytest

from recattn import config_check
from recattn import models

CONFIGS = [("sasrec_ml1m", None), ("sasrec_ml1m", "paper"),
           ("sasrec_ml1m", "plus"),
           ("sasrec_beauty", None), ("sasrec_beauty", "softmax_prefix_attr"),
           ("bsarec_beauty", None), ("bsarec_beauty", "attr"),
           ("hstu_ml1m", None), ("hstu_beauty", None),
           ("hstu_ml1m", "large"), ("test", None), ("sasrec_ml100k", "stream"),
           ("sasrec_stream", "ml-1m-partial"),
           ("sasrec_stream", "synthetic,ranker"), ("time_aware", "ml-100k"),
           ("time_aware", "ml-1m-partial,hstu")]


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_validates_and_builds(name, arg):
  module = importlib.import_module(f"configs.{name}")
  c = module.get_config(arg) if arg else module.get_config()
  config_check.validate(c)
  attributes = None
  if c.model.item_features == "attributes":  # ids [V + 1, A], vocabulary
    attributes = (np.arange(51 * 2).reshape(51, 2) % 7, 7)
  model = models.create(c.model, num_items=50, max_len=c.data.max_len, seed=0,
                        item_attributes=attributes)
  h = model.encode(jnp.ones((1, 5), jnp.int32))
  assert h.shape == (1, 5, c.model.dim)


@pytest.mark.parametrize("name,arg,match", [
    ("hstu_ml1m", "huge", "allowed args"),
    ("hstu_beauty", "large", "takes no arg"),
    ("sasrec_beauty", "prefix", "allowed args"),
    ("bsarec_beauty", "attributes", "allowed args"),
    ("time_aware", "ml-1m-seq", "data one of"),
    ("time_aware", "ml-100k,gru", "model one of")])
def test_unknown_config_arg_is_refused(name, arg, match):
  module = importlib.import_module(f"configs.{name}")
  with pytest.raises(ValueError, match=match):
    module.get_config(arg)


def test_time_aware_hstu_takes_hstu_ml1m_block():
  from configs import hstu_ml1m, time_aware  # pylint: disable=g-import-not-at-top
  c, h = time_aware.get_config("synthetic,hstu"), hstu_ml1m.get_config()
  assert (c.model.name, c.model.attention, c.model.num_heads,
          c.model.attn.alpha) == (h.model.name, h.model.attention,
                                  h.model.num_heads, h.model.attn.alpha)
  assert c.data.name == "synthetic" and c.model.rel_bias == "none"
