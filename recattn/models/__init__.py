"""Model registry: config name -> NNX module class.

Each class builds itself from the `config.model` fields it knows through
`from_config(model_config, *, num_items, max_len, rngs, item_attributes)`.
"""

from flax import nnx

from recattn import data as data_lib
from recattn.models.base import ITEM_FEATURES
from recattn.models.bsarec import BSARec
from recattn.models.hstu import HSTU
from recattn.models.sasrec import SASRec

REGISTRY = {
    "sasrec": SASRec,
    "hstu": HSTU,
    "bsarec": BSARec,
}


def create(model_config, *, num_items: int, max_len: int, seed: int,
           item_attributes=None):
  """Builds the model named by `model_config.name` with fresh parameters.

  `item_attributes`: `(attr_ids [V + 1, A], vocabulary size)` when
  `model_config.item_features` is "attributes" (`side_inputs` loads it).
  """
  name = model_config.name
  if name not in REGISTRY:
    raise ValueError(
        f"model.name={name!r} is not a known model; valid names: "
        f"{sorted(REGISTRY)}")
  features = model_config.get("item_features", "none")
  if features not in ITEM_FEATURES:
    raise ValueError(f"model.item_features={features!r}: allowed values are "
                     f"{list(ITEM_FEATURES)}")
  if (features == "attributes") != (item_attributes is not None):
    raise ValueError(f"model.item_features={features!r} but item_attributes "
                     f"{'missing' if item_attributes is None else 'given'}")
  return REGISTRY[name].from_config(model_config, num_items=num_items,
                                    max_len=max_len,
                                    rngs=nnx.Rngs(params=seed),
                                    item_attributes=item_attributes)


def create_for_data(config, ds, *, seed: int):
  """`create` for `config` (model and data) and its loaded dataset `ds`.

  Loads what `config.model.item_features` asks for from the dataset's files.
  """
  attributes = None
  if config.model.get("item_features", "none") == "attributes":
    attributes = data_lib.load_item_attributes(config.data, ds)
  return create(config.model, num_items=ds.num_items,
                max_len=config.data.max_len, seed=seed,
                item_attributes=attributes)
