"""Attention variants behind one signature, and the one dispatch the models use.

Every variant is a pure function

  fn(q, k, v, mask, bias=None, *, return_weights=False) -> (out, weights|None)

over already-projected heads `q: [B, Lq, H, Dh]`, `k, v: [B, Lk, H, Dh]`, a
`Mask` description and an optional additive bias `[B|1, H|1, Lq, Lk]`. The
output is `[B, Lq, H, Dh]`; weights, when asked for, are `[B, H, Lq, Lk]`.
Parameters (projections, bias tables) live in the NNX modules that call these.

Models ask for a variant by its config name through `get`; kernel choice
happens inside the variant, in one place.
"""

from collections.abc import Callable

from recattn.attention.masks import Mask
from recattn.attention.scaled_dot import scaled_dot

AttentionFn = Callable[..., tuple]

REGISTRY: dict[str, AttentionFn] = {
    "scaled_dot": scaled_dot,
}


def get(name: str) -> AttentionFn:
  """Returns the attention function registered as `name`."""
  try:
    return REGISTRY[name]
  except KeyError:
    raise ValueError(
        f"model.attention={name!r} is not a known attention variant; "
        f"valid names: {sorted(REGISTRY)}"
    ) from None


__all__ = ["Mask", "REGISTRY", "get", "scaled_dot"]
