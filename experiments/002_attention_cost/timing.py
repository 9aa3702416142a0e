"""Timing helpers shared by the GPU attention benchmarks of this folder."""

import time

import jax
import jax.numpy as jnp
import numpy as np


def median_time(fn, *args, reps: int) -> float:
  """Median wall time of `fn(*args)` over `reps` runs after a warm-up."""
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def grad_fn(attend):
  """Jitted forward + backward: grads of sum(attend(q, k, v) * cot)."""
  def loss(q, k, v, cot):
    return jnp.sum((attend(q, k, v) * cot).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
