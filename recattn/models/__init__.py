"""Model registry: config name -> NNX module class.

Each class builds itself from the `config.model` fields it knows through
`from_config(model_config, *, num_items, max_len, rngs)`.
"""

from flax import nnx

from recattn.models.hstu import HSTU
from recattn.models.sasrec import SASRec

REGISTRY = {
    "sasrec": SASRec,
    "hstu": HSTU,
}


def create(model_config, *, num_items: int, max_len: int, seed: int):
  """Builds the model named by `model_config.name` with fresh parameters."""
  name = model_config.name
  if name not in REGISTRY:
    raise ValueError(
        f"model.name={name!r} is not a known model; valid names: "
        f"{sorted(REGISTRY)}")
  return REGISTRY[name].from_config(model_config, num_items=num_items,
                                    max_len=max_len,
                                    rngs=nnx.Rngs(params=seed))
