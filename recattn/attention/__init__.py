"""Attention variants behind one signature, and the one dispatch models use.

Every variant is a pure function

  fn(q, k, v, mask, bias=None, *, return_weights=False, **options)
      -> (out, weights | None)

over already-projected heads `q: [B, Lq, H, Dh]`, `k, v: [B, Lk, H, Dh]`, a
`Mask` description and an optional additive bias (`[B|1, H|1, Lq, Lk]` array
or a tiled `biases.Bias`). The output is `[B, Lq, H, Dh]`; weights, when asked
for and when they fit (`weights.check_fits`), are `[B, H, Lq, Lk]`.

`REGISTRY` maps config names (`model.attention`) to a `Variant`: the function,
the `model.attn.<field>` options it takes, and, for variants with parameters,
the thin NNX module that owns them. Models call `layer(...)` once per
attention layer and never branch on the variant name; kernel choice (cuDNN,
XLA, blockwise) happens inside the variant.
"""

from collections.abc import Callable
import dataclasses
import functools

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp

# Modules, one per variant family; `attention.<module>.<function>` is the
# function (the registry below is the way models reach them).
from recattn.attention import blockwise
from recattn.attention import hstu
from recattn.attention import hstu_pallas
from recattn.attention import linear
from recattn.attention import local
from recattn.attention import low_rank
from recattn.attention import mlp_score
from recattn.attention import scaled_dot
from recattn.attention.masks import Mask


@dataclasses.dataclass(frozen=True)
class Variant:
  """A registered attention variant.

  Attributes:
    fn: the pure function.
    options: `{config field in model.attn: keyword argument of fn}`.
    module: NNX module owning the variant's parameters, built as
      `module(num_heads, head_dim, **options, rngs=rngs)` and called like fn;
      None for parameter-free variants.
    dropout: whether fn takes `dropout_rate`/`dropout_rng` (attention-weight
      dropout).
    doc: one line for listings.
    cpu_compiler_options: XLA compile options for the train step of a model
      built on this variant, on CPU (`compiler_options`); each one measured
      in `experiments/000_speed_lean_step`.
  """

  fn: Callable[..., tuple]
  options: dict[str, str] = dataclasses.field(default_factory=dict)
  module: type[nnx.Module] | None = None
  dropout: bool = False
  doc: str = ""
  cpu_compiler_options: dict[str, str] = dataclasses.field(
      default_factory=dict)


# XLA:CPU hands reductions to YNNPACK by default, whose sums over a middle
# axis are slow; DIN's backward pass is mostly such sums (the `q * k` pair
# term's gradient). Dots only: a DIN train step 0.59-0.73x, but `additive`
# 1.2-1.3x and HSTU-large 1.15x, so only DIN asks for it
# (experiments/000_speed_lean_step/README.md, "YNNPACK fusions").
_YNN_DOTS_ONLY = {"xla_cpu_experimental_ynn_fusion_type":
                  "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


REGISTRY: dict[str, Variant] = {
    "dot": Variant(
        scaled_dot.dot, dropout=True, doc="softmax(QK^T)V, unscaled"),
    "scaled_dot": Variant(
        scaled_dot.scaled_dot, {"temperature": "temperature"}, dropout=True,
        doc="softmax(QK^T / (tau sqrt(d)))V; cuDNN on GPU when possible"),
    "blockwise": Variant(
        blockwise.blockwise,
        {"temperature": "temperature", "block_q": "block_q",
         "block_k": "block_k"},
        doc="exact softmax attention, flash-style, O(L) memory fwd and bwd"),
    "local": Variant(
        local.local, {"window": "window", "temperature": "temperature"},
        doc="causal sliding window over the last w items, O(L w)"),
    "linear": Variant(
        linear.linear, {"linear_feature": "feature", "linear_chunk": "chunk"},
        doc="kernelised linear attention (elu+1 or LinRec's l2), O(L)"),
    "low_rank": Variant(
        low_rank.low_rank,
        {"num_latents": "num_latents",
         "low_rank_value_pool": "separate_value_pool",
         "temperature": "temperature", "low_rank_chunk": "chunk"},
        low_rank.LowRankPool,
        doc="LightSANs: attend to r latent interests pooled from the items"),
    "hstu": Variant(
        hstu.hstu,
        {"alpha": "alpha", "normalizer": "normalizer",
         "hstu_block_k": "block_k", "hstu_impl": "impl"},
        doc="HSTU pointwise silu(alpha QK^T + rab)/n V, no softmax"),
    "additive": Variant(
        mlp_score.additive, {"hidden": "hidden"}, mlp_score.Additive,
        doc="Bahdanau: softmax(v^T tanh(W_q q + W_k k))V"),
    "din": Variant(
        mlp_score.din, {"din_hidden": "hidden", "din_normalize": "normalize"},
        mlp_score.DIN,
        doc="DIN activation unit MLP([q, k, q-k, q*k]), optional softmax",
        cpu_compiler_options=_YNN_DOTS_ONLY),
}


def get(name: str) -> Variant:
  """Returns the variant registered as `name`."""
  try:
    return REGISTRY[name]
  except KeyError:
    raise ValueError(
        f"model.attention={name!r} is not a known attention variant; "
        f"valid names: {sorted(REGISTRY)}"
    ) from None


@functools.cache
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib's compiler takes `options` (compiles a scalar op)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(
        jnp.zeros((), jnp.float32)).compile()
  except jax.errors.JaxRuntimeError as e:
    logging.warning("XLA compile options %s not used: %s", dict(options), e)
    return False
  return True


def compiler_options(name: str) -> dict[str, str]:
  """Compile options for the train step of a model built on variant `name`.

  The variant's `cpu_compiler_options` when the default backend is the CPU
  and this jaxlib knows them (they are experimental XLA options; one that
  is unknown or rejected is dropped with a warning), else `{}`. They change
  how XLA:CPU schedules the same computation, not what it computes.
  """
  options = get(name).cpu_compiler_options
  if not options or jax.default_backend() != "cpu":
    return {}
  return dict(options) if _accepted(tuple(sorted(options.items()))) else {}


class _Stateless(nnx.Module):
  """A parameter-free variant with its options bound."""

  def __init__(self, fn, options):
    self.fn = functools.partial(fn, **options)

  def __call__(self, q, k, v, mask, bias=None, **kwargs):
    return self.fn(q, k, v, mask, bias, **kwargs)


def layer(name: str, num_heads: int, head_dim: int, attn_config=None, *,
          rngs: nnx.Rngs) -> nnx.Module:
  """The attention core of one layer: `core(q, k, v, mask, bias, ...)`.

  Args:
    name: registry name.
    num_heads, head_dim: head layout of q, k, v.
    attn_config: mapping with the `model.attn` fields; only the variant's
      own options are read (missing ones keep the function's defaults).
    rngs: parameter rngs for variants with parameters.
  """
  variant = get(name)
  attn_config = attn_config or {}
  options = {kw: attn_config[field] for field, kw in variant.options.items()
             if field in attn_config}
  if variant.module is None:
    return _Stateless(variant.fn, options)
  return variant.module(num_heads, head_dim, **options, rngs=rngs)


__all__ = ["Mask", "REGISTRY", "Variant", "blockwise", "compiler_options",
           "get", "hstu", "hstu_pallas", "layer", "linear", "local",
           "low_rank", "mlp_score", "scaled_dot"]
