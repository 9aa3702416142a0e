"""Model registry: config name -> NNX module class."""

from flax import nnx

from recattn.models.sasrec import SASRec

REGISTRY = {
    "sasrec": SASRec,
}


def create(model_config, *, num_items: int, max_len: int, seed: int):
  """Builds the model named by `model_config.name` with fresh parameters."""
  name = model_config.name
  if name not in REGISTRY:
    raise ValueError(
        f"model.name={name!r} is not a known model; valid names: "
        f"{sorted(REGISTRY)}")
  return REGISTRY[name](
      num_items=num_items,
      max_len=max_len,
      dim=model_config.dim,
      num_blocks=model_config.num_blocks,
      num_heads=model_config.num_heads,
      ffn_dim=model_config.get("ffn_dim", 0) or model_config.dim,
      dropout=model_config.dropout,
      attention=model_config.attention,
      norm=model_config.get("norm", "sasrec"),
      l2_norm=model_config.get("l2_norm", False),
      rngs=nnx.Rngs(params=seed),
  )
