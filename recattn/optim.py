"""The optimizer from `config.optimizer`, and Polyak averaging of parameters.

`make_optimizer` chains, in order: gradient clipping (`clip_norm`), Adam or
AdamW with a warm-up and a constant / cosine / linear schedule, and, when
`ema_decay > 0`, `params_ema`, which keeps an exponential moving average of
the parameters in the optimizer state. Evaluation, checkpoint selection,
test and serving then use the average (`averaged_params`); training keeps
stepping the raw parameters. Keeping the average in the optimizer state
means it is sharded like the Adam moments (it has the parameters' logical
axes), checkpointed and restored with them, and a run without it has
exactly the state it had before.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class ParamsEmaState(NamedTuple):
  """`params_ema`'s state: updates seen, and the parameters' average."""
  count: jax.Array  # int32 []
  ema: optax.Params


def params_ema(decay: float) -> optax.GradientTransformation:
  """Exponential moving average of the parameters (Polyak averaging).

  After update t (t = 1, 2, ...), with p_t the parameters it produces:

    ema_t = d_t * ema_{t-1} + (1 - d_t) * p_t,
    d_t = min(decay, t / (t + 9)),   ema_0 = p_0

  The ramp `t / (t + 9)` (TensorFlow's `ExponentialMovingAverage` with
  `num_updates`) keeps the first steps' random parameters from dominating
  the average of a short run; after about 9 / (1 - decay) steps, `decay`
  rules. The average covers the last ~1 / (1 - decay) steps.

  It leaves the updates unchanged, so it must be the last transformation of
  a chain (it computes p_t as params + updates). Cost: one more copy of the
  parameters in memory, one multiply-add per parameter per step.

  Args:
    decay: in [0, 1); 0 makes the average the current parameters.
  """
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"params_ema decay must be in [0, 1), got {decay}")

  def init_fn(params):
    return ParamsEmaState(count=jnp.zeros((), jnp.int32),
                          ema=jax.tree.map(lambda p: jnp.array(p, copy=True), params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("params_ema needs the parameters: call "
                       "tx.update(grads, opt_state, params)")
    count = state.count + 1
    t = count.astype(jnp.float32)
    d = jnp.minimum(decay, t / (t + 9.0))
    new_params = optax.apply_updates(params, updates)
    ema = jax.tree.map(
        lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state.ema,
        new_params)
    return updates, ParamsEmaState(count=count, ema=ema)

  return optax.GradientTransformation(init_fn, update_fn)


def averaged_params(state):
  """The parameters to evaluate: the EMA when the optimizer keeps one.

  `state` is the trainer's `{"params", "opt_state", "step"}`.
  """
  found = [s for s in jax.tree.leaves(
      state["opt_state"], is_leaf=lambda x: isinstance(x, ParamsEmaState))
           if isinstance(s, ParamsEmaState)]
  return found[0].ema if found else state["params"]


def make_optimizer(opt_config,
                   total_steps: int) -> optax.GradientTransformation:
  """Adam/AdamW with warm-up, then constant / cosine / linear decay."""
  lr, warmup = opt_config.lr, opt_config.warmup_steps
  decay_steps = max(total_steps - warmup, 1)
  if opt_config.schedule == "constant":
    decay = optax.constant_schedule(lr)
  elif opt_config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps)
  else:
    decay = optax.linear_schedule(lr, 0.0, decay_steps)
  schedule = (optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
              if warmup else decay)
  if opt_config.name == "adam":
    opt = optax.adam(schedule, b1=opt_config.b1, b2=opt_config.b2)
  else:
    opt = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2,
                      weight_decay=opt_config.weight_decay)
  parts = [opt]
  if opt_config.clip_norm:
    parts.insert(0, optax.clip_by_global_norm(opt_config.clip_norm))
  if opt_config.get("ema_decay", 0.0):
    parts.append(params_ema(opt_config.ema_decay))
  # Without clipping or averaging, the bare optimizer: its state is the one
  # earlier checkpoints hold.
  return optax.chain(*parts) if len(parts) > 1 else opt
