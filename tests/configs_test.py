"""Every shipped config validates and builds its model."""

import importlib

import jax.numpy as jnp
import pytest

from recattn import config_check
from recattn import models

CONFIGS = [("sasrec_ml1m", None), ("sasrec_ml1m", "paper"),
           ("sasrec_beauty", None), ("hstu_ml1m", None),
           ("hstu_ml1m", "large"), ("test", None), ("sasrec_ml100k", "stream"),
           ("sasrec_stream", "ml-1m-partial"),
           ("sasrec_stream", "synthetic,ranker")]


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_validates_and_builds(name, arg):
  module = importlib.import_module(f"configs.{name}")
  c = module.get_config(arg) if arg else module.get_config()
  config_check.validate(c)
  model = models.create(c.model, num_items=50, max_len=c.data.max_len, seed=0)
  h = model.encode(jnp.ones((1, 5), jnp.int32))
  assert h.shape == (1, 5, c.model.dim)


def test_unknown_config_arg_is_refused():
  module = importlib.import_module("configs.hstu_ml1m")
  with pytest.raises(ValueError, match="allowed args"):
    module.get_config("huge")
