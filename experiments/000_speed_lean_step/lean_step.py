"""A lean, hand-written SASRec train step in plain JAX (no Flax, no recattn
model code): the yardstick recattn's step is timed against.

Same math as recattn's SASRec (pre-LN blocks, shared item embedding, learned
positions, dropout), written as directly as possible.
"""

import math

import jax
import jax.numpy as jnp
import optax

SASREC_RESIDUAL = True


def init_params(key, num_items, max_len, dim, num_blocks, ffn_dim):
  keys = iter(jax.random.split(key, 4 + 4 * num_blocks))

  def dense(n_in, n_out):
    bound = 1.0 / math.sqrt(n_in)
    return {"w": jax.random.uniform(next(keys), (n_in, n_out), jnp.float32,
                                    -bound, bound),
            "b": jnp.zeros((n_out,))}

  ln = lambda: {"scale": jnp.ones((dim,)), "bias": jnp.zeros((dim,))}
  return {
      "items": 0.02 * jax.random.normal(next(keys), (num_items + 1, dim)),
      "pos": 0.02 * jax.random.normal(next(keys), (max_len, dim)),
      "blocks": [{"qkv": dense(dim, 3 * dim), "out": dense(dim, dim),
                  "ln1": ln(), "ln2": ln(), "ff1": dense(dim, ffn_dim),
                  "ff2": dense(ffn_dim, dim)} for _ in range(num_blocks)],
      "ln_f": ln(),
  }


def _ln(p, x):
  m = x.mean(-1, keepdims=True)
  v = ((x - m) ** 2).mean(-1, keepdims=True)
  return (x - m) * jax.lax.rsqrt(v + 1e-8) * p["scale"] + p["bias"]


def _dropout(key, x, rate):
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def encode(params, items, key, rate, num_heads):
  b, l = items.shape
  d = params["items"].shape[1]
  keys = iter(jax.random.split(key, 1 + 3 * len(params["blocks"])))
  valid = items > 0
  keep = valid[..., None].astype(jnp.float32)
  x = params["items"][items] * math.sqrt(d) + params["pos"][-l:]
  x = _dropout(next(keys), x, rate) * keep
  allowed = jnp.tril(jnp.ones((l, l), bool))[None, None] & valid[:, None,
                                                                  None, :]
  hd = d // num_heads
  for blk in params["blocks"]:
    h = _ln(blk["ln1"], x)
    qkv = h @ blk["qkv"]["w"] + blk["qkv"]["b"]
    qkv = qkv.reshape(b, l, 3, num_heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, L, hd]
    s = jnp.where(allowed, q @ jnp.swapaxes(k, -1, -2) / math.sqrt(hd),
                  -1e30)
    a = (jax.nn.softmax(s, -1) @ v).transpose(0, 2, 1, 3).reshape(b, l, d)
    a = _dropout(next(keys), a @ blk["out"]["w"] + blk["out"]["b"], rate)
    # SASRec's residual: onto the normalised input.
    x = (h if SASREC_RESIDUAL else x) + a
    h = _ln(blk["ln2"], x)
    f = jax.nn.relu(h @ blk["ff1"]["w"] + blk["ff1"]["b"])
    f = _dropout(next(keys), f @ blk["ff2"]["w"] + blk["ff2"]["b"], rate)
    x = ((h if SASREC_RESIDUAL else x) + f) * keep
  return _ln(params["ln_f"], x)


def _unit(x):
  return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


def make_step(tx, *, loss, num_negatives, temperature, l2_norm, rate,
              num_heads, num_items):
  """Returns a jitted `step(params, opt_state, inputs, targets, key)`."""
  norm = _unit if l2_norm else (lambda x: x)

  def loss_fn(params, inputs, targets, key):
    k_enc, k_neg = jax.random.split(key)
    h = norm(encode(params, inputs, k_enc, rate, num_heads))
    emb = params["items"]
    valid = targets > 0
    pos = jnp.sum(h * norm(emb[targets]), -1) / temperature
    if loss == "bce":
      negs = jax.random.randint(k_neg, targets.shape, 1, num_items + 1)
      neg = jnp.sum(h * norm(emb[negs]), -1) / temperature
      per = -jax.nn.log_sigmoid(pos) - jax.nn.log_sigmoid(-neg)
    else:
      # Negatives per sequence, shared by its positions (as recattn).
      negs = jax.random.randint(k_neg, (inputs.shape[0], num_negatives), 1,
                                num_items + 1)
      neg = jnp.einsum("bld,bnd->bln", h, norm(emb[negs])) / temperature
      neg = jnp.where(targets[..., None] == negs[:, None, :], -jnp.inf, neg)
      per = jax.nn.logsumexp(
          jnp.concatenate([pos[..., None], neg], -1), -1) - pos
    return jnp.sum(jnp.where(valid, per, 0.0)) / jnp.maximum(valid.sum(), 1)

  @jax.jit
  def step(params, opt_state, inputs, targets, key):
    value, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return step
