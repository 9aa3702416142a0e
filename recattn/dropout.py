"""Dropout whose masks come from a counter hash instead of threefry.

`jax.random.bernoulli` runs threefry (20 rounds of 32-bit mixing) for every
element. On this project's 2-core CPU a `[128, 200, 50]` mask costs about
16 ms that way, and SASRec on ML-1M draws seven such masks per training
step: 22.3 s per epoch against 18.9 s without dropout. Here one small
threefry call gives 64 bits per mask, and each element's flat index is
hashed with them by murmur3's 32-bit finaliser, twice, seeded between the
rounds: `fmix32(fmix32(i + s0) ^ s1)`. That costs about 0.7 ms per mask,
and the epoch 19.2 s (2026-11-30, `experiments/000_speed_lean_step/
dropout_masks.py` -> `dropout_masks_cpu.json`).

Properties (tests/dropout_test.py): the keep rate is `keep_prob` to within
2^-32; masks depend only on the key and the shape (not on the device count
or sharding: the index is the global one); every call draws exactly one key
from `rngs.dropout()`, as `flax.nnx.Dropout` does, so the other random
streams of a run are unchanged. fmix32 is a bijection of uint32, so within
one mask the hashed values never repeat.
"""

import math

import jax
from jax import lax
import jax.numpy as jnp
from flax import nnx


def _fmix32(h: jax.Array) -> jax.Array:
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def keep_mask(key: jax.Array, shape: tuple[int, ...],
              keep_prob: float) -> jax.Array:
  """A bool mask of `shape`, each element True with probability `keep_prob`."""
  if not 0.0 < keep_prob <= 1.0:
    raise ValueError(f"keep_prob={keep_prob!r}: must be in (0, 1]")
  n = math.prod(shape)
  if n >= 2**32:
    raise ValueError(f"dropout mask of shape {shape}: more than 2^32 elements")
  if keep_prob == 1.0:
    return jnp.ones(shape, bool)
  seed = jax.random.bits(key, (2,), jnp.uint32)
  index = lax.iota(jnp.uint32, n).reshape(shape)
  hashed = _fmix32(_fmix32(index + seed[0]) ^ seed[1])
  # P(hashed < t) = t / 2^32.
  return hashed < jnp.uint32(min(round(keep_prob * 2**32), 2**32 - 1))


def apply(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Zeroes elements of `x` with probability `rate`, scales the rest."""
  if rate == 0.0:
    return x
  keep = 1.0 - rate
  return jnp.where(keep_mask(key, x.shape, keep), x / keep,
                   jnp.zeros((), x.dtype))


class Dropout(nnx.Module):
  """`flax.nnx.Dropout`'s interface (rate; `rngs`, `deterministic` per call)."""

  def __init__(self, rate: float):
    self.rate = rate

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None,
               deterministic: bool = False) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if rngs is None:
      raise ValueError("Dropout needs rngs (with a 'dropout' stream) unless "
                       "deterministic=True")
    return apply(x, self.rate, rngs.dropout())
