"""dot, scaled_dot, additive and din against float64 numpy references."""

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx
import pytest

from recattn import attention
from recattn.attention import mlp_score
from recattn.attention.masks import Mask

import attention_reference

SHAPES = [  # (B, Lq, Lk, H, Dh)
    (2, 6, 6, 1, 4),
    (3, 5, 9, 2, 8),
    (1, 1, 7, 4, 4),
]


def _inputs(shape, seed=0):
  b, lq, lk, h, d = shape
  r = np.random.default_rng(seed)
  q = r.normal(size=(b, lq, h, d))
  k = r.normal(size=(b, lk, h, d))
  v = r.normal(size=(b, lk, h, d))
  valid = np.ones((b, lk), bool)
  valid[0, :min(2, lk - 1)] = False  # left padding in the first row
  return q, k, v, valid


def _np_mask(lq, lk, valid, causal, window=None, num_targets=None):
  return attention_reference.visible(
      lq, lk, causal=causal, key_valid=valid, window=window,
      num_targets=num_targets)[:, None]


def _np_pool(scores, v, m, normalize=True):
  if normalize:
    s = np.where(m, scores, -np.inf)
    s = s - np.max(np.where(m, s, -1e300), -1, keepdims=True)
    w = np.where(m, np.exp(s), 0.0)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
  else:
    w = np.where(m, scores, 0.0)
  return np.einsum("bhqk,bkhd->bqhd", w, v), w


def np_scaled_dot(q, k, v, m, scale, bias=None):
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if bias is not None:
    s = s + bias
  return _np_pool(s, v, m)


def np_additive(q, k, v, m, w_q, w_k, v_a):
  qa = np.einsum("bqhd,hda->bhqa", q, w_q)
  ka = np.einsum("bkhd,hda->bhka", k, w_k)
  s = np.einsum("bhqka,ha->bhqk", np.tanh(qa[:, :, :, None] + ka[:, :, None]),
                v_a)
  return _np_pool(s, v, m)


def np_din(q, k, v, m, layers, normalize):
  b, lq, h, d = q.shape
  lk = k.shape[1]
  qq = np.broadcast_to(q[:, :, None], (b, lq, lk, h, d))
  kk = np.broadcast_to(k[:, None], (b, lq, lk, h, d))
  x = np.concatenate([qq, kk, qq - kk, qq * kk], -1)  # [B, Lq, Lk, H, 4D]
  x = np.einsum("bqkhf,hfa->bhqka", x, layers[0][0]) + layers[0][1][
      None, :, None, None]
  for w, bb in layers[1:]:
    x = 1 / (1 + np.exp(-x))
    x = np.einsum("bhqka,hac->bhqkc", x, w) + bb[None, :, None, None]
  return _np_pool(x[..., 0], v, m, normalize)


def _f32(*xs):
  return [jnp.asarray(x, jnp.float32) for x in xs]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ["dot", "scaled_dot"])
def test_softmax_variants_match_numpy(shape, causal, name):
  q, k, v, valid = _inputs(shape)
  mask = Mask(causal=causal, key_valid=jnp.asarray(valid))
  fn = attention.get(name).fn
  out, _ = fn(*_f32(q, k, v), mask)
  out_w, w = fn(*_f32(q, k, v), mask, return_weights=True)
  scale = 1.0 if name == "dot" else 1 / np.sqrt(shape[-1])
  ref, ref_w = np_scaled_dot(q, k, v, _np_mask(shape[1], shape[2], valid,
                                               causal), scale)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(out_w, ref, atol=1e-5)
  np.testing.assert_allclose(w, ref_w, atol=1e-6)


@pytest.mark.parametrize("window,num_targets", [(3, None), (None, 2), (2, 2)])
def test_scaled_dot_window_and_target_aware_masks(window, num_targets):
  shape = (2, 7, 7, 2, 4)
  q, k, v, valid = _inputs(shape, seed=1)
  mask = Mask(causal=True, key_valid=jnp.asarray(valid), window=window,
              num_targets=num_targets)
  out, _ = attention.scaled_dot.scaled_dot(*_f32(q, k, v), mask,
                                           temperature=0.5)
  ref, _ = np_scaled_dot(q, k, v, _np_mask(7, 7, valid, True, window,
                                           num_targets), 1 / (0.5 * 2.0))
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_target_aware_candidates_do_not_see_each_other():
  shape = (1, 6, 6, 1, 4)
  q, k, v, valid = _inputs(shape, seed=2)
  valid[:] = True
  mask = Mask(causal=True, key_valid=jnp.asarray(valid), num_targets=3)
  out, _ = attention.scaled_dot.scaled_dot(*_f32(q, k, v), mask)
  k2, v2 = k.copy(), v.copy()
  k2[:, 4] += 1.0  # perturb candidate 4: other candidates must not move
  v2[:, 4] += 1.0
  out2, _ = attention.scaled_dot.scaled_dot(*_f32(q, k2, v2), mask)
  np.testing.assert_allclose(out2[:, [0, 1, 2, 3, 5]], out[:, [0, 1, 2, 3, 5]],
                             atol=1e-6)
  assert not np.allclose(out2[:, 4], out[:, 4])


def test_dense_bias_is_added_to_the_logits():
  shape = (2, 5, 5, 2, 4)
  q, k, v, valid = _inputs(shape, seed=3)
  bias = np.random.default_rng(3).normal(size=(1, 2, 5, 5))
  mask = Mask(causal=True, key_valid=jnp.asarray(valid))
  out, _ = attention.scaled_dot.scaled_dot(*_f32(q, k, v), mask,
                                           jnp.asarray(bias, jnp.float32))
  ref, _ = np_scaled_dot(q, k, v, _np_mask(5, 5, valid, True), 0.5, bias)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def _additive_module(h, d):
  return mlp_score.Additive(h, d, hidden=6, rngs=nnx.Rngs(0))


def _din_module(h, d, normalize):
  return mlp_score.DIN(h, d, hidden=(5, 3), normalize=normalize,
                          rngs=nnx.Rngs(0))


# From mlp_score._MIN_ROWS (8) queries on, additive scores one hidden unit
# at a time (mlp_score.tanh_scores).
@pytest.mark.parametrize("shape", SHAPES + [(2, 9, 11, 2, 4)])
def test_additive_matches_numpy(shape):
  q, k, v, valid = _inputs(shape)
  mod = _additive_module(shape[3], shape[4])
  mask = Mask(causal=True, key_valid=jnp.asarray(valid))
  out, w = mod(*_f32(q, k, v), mask, return_weights=True)
  p = [np.asarray(x[...], np.float64) for x in (mod.w_q, mod.w_k, mod.v_a)]
  ref, ref_w = np_additive(q, k, v, _np_mask(shape[1], shape[2], valid, True),
                           *p)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(w, ref_w, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_din_matches_numpy(shape, normalize):
  q, k, v, valid = _inputs(shape)
  mod = _din_module(shape[3], shape[4], normalize)
  mask = Mask(causal=False, key_valid=jnp.asarray(valid))
  out, w = mod(*_f32(q, k, v), mask, return_weights=True)
  layers = [(np.asarray(a[...], np.float64), np.asarray(b[...], np.float64))
            for a, b in zip(mod.kernels, mod.biases)]
  ref, ref_w = np_din(q, k, v, _np_mask(shape[1], shape[2], valid, False),
                      layers, normalize)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(w, ref_w, atol=1e-5)


def _callables():
  h, d = 2, 4
  add = _additive_module(h, d)
  din = _din_module(h, d, True)
  return {
      "dot": attention.scaled_dot.dot,
      "scaled_dot": attention.scaled_dot.scaled_dot,
      "additive": add,
      "din": din,
  }


@pytest.mark.parametrize("name", ["dot", "scaled_dot", "additive", "din"])
def test_causality_and_padding_invariance(name):
  fn = _callables()[name]
  shape = (2, 6, 6, 2, 4)
  q, k, v, valid = _inputs(shape, seed=4)
  mask = Mask(causal=True, key_valid=jnp.asarray(valid))
  out, _ = fn(*_f32(q, k, v), mask)
  for t in range(2, 5):
    k2, v2 = k.copy(), v.copy()
    k2[:, t + 1:] += 3.0
    v2[:, t + 1:] -= 2.0
    out2, _ = fn(*_f32(q, k2, v2), mask)
    np.testing.assert_allclose(out2[:, :t + 1], out[:, :t + 1], atol=1e-5)
  # padded keys (row 0, positions 0 and 1) never matter
  k3, v3 = k.copy(), v.copy()
  k3[0, :2] = 100.0
  v3[0, :2] = -50.0
  out3, _ = fn(*_f32(q, k3, v3), mask)
  np.testing.assert_allclose(out3, out, atol=1e-5)
  # queries with no visible key output zeros
  np.testing.assert_allclose(out[0, :2], 0.0, atol=1e-7)


@pytest.mark.parametrize("name,length", [
    ("dot", 5), ("scaled_dot", 5), ("additive", 5), ("din", 5),
    ("additive", 9),  # one hidden unit at a time
])
def test_gradients_match_float64_reference(name, length):
  fn = _callables()[name]
  shape = (2, length, length, 2, 4)
  q, k, v, valid = _inputs(shape, seed=5)
  mask = Mask(causal=True, key_valid=jnp.asarray(valid))
  m = _np_mask(length, length, valid, True)
  cot = np.random.default_rng(6).normal(size=q.shape)

  def loss(q, k, v):
    return jnp.sum(fn(q, k, v, mask)[0] * cot)

  grads = jax.grad(loss, argnums=(0, 1, 2))(*_f32(q, k, v))
  # Central differences of the float64 numpy reference.
  if name in ("dot", "scaled_dot"):
    scale = 1.0 if name == "dot" else 0.5
    ref_fn = lambda q, k, v: np_scaled_dot(q, k, v, m, scale)[0]
  elif name == "additive":
    p = [np.asarray(x[...], np.float64) for x in (fn.w_q, fn.w_k, fn.v_a)]
    ref_fn = lambda q, k, v: np_additive(q, k, v, m, *p)[0]
  else:
    layers = [(np.asarray(a[...], np.float64), np.asarray(b[...], np.float64))
              for a, b in zip(fn.kernels, fn.biases)]
    ref_fn = lambda q, k, v: np_din(q, k, v, m, layers, True)[0]
  # Directional derivatives of the float64 reference by central differences.
  args = [q, k, v]
  eps = 1e-6
  r = np.random.default_rng(8)
  for i, g in enumerate(grads):
    for _ in range(3):
      d = r.normal(size=args[i].shape)
      plus = list(args)
      minus = list(args)
      plus[i] = args[i] + eps * d
      minus[i] = args[i] - eps * d
      num = (np.sum(ref_fn(*plus) * cot) - np.sum(ref_fn(*minus) * cot)) / (
          2 * eps)
      np.testing.assert_allclose(np.sum(np.asarray(g, np.float64) * d), num,
                                 atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", ["dot", "scaled_dot", "additive", "din"])
def test_jit_and_vmap_do_not_retrace_on_new_data(name):
  fn = _callables()[name]
  traces = []

  def f(q, k, v, valid):
    traces.append(1)
    return fn(q, k, v, Mask(causal=True, key_valid=valid))[0]

  jf = jax.jit(f)
  shape = (2, 5, 5, 2, 4)
  for seed in range(3):
    q, k, v, valid = _inputs(shape, seed)
    np.testing.assert_allclose(jf(*_f32(q, k, v), jnp.asarray(valid)),
                               f(*_f32(q, k, v), jnp.asarray(valid)),
                               atol=1e-5)
  assert len(traces) == 1 + 3  # one jit trace + three eager calls
  # vmap over an extra leading axis equals a loop
  qs, ks, vs, valids = zip(*(_inputs(shape, s) for s in range(3)))
  stacked = [jnp.asarray(np.stack(x), jnp.float32) for x in (qs, ks, vs)]
  vout = jax.vmap(f)(*stacked, jnp.asarray(np.stack(valids)))
  for i in range(3):
    np.testing.assert_allclose(
        vout[i], f(*_f32(qs[i], ks[i], vs[i]), jnp.asarray(valids[i])),
        atol=1e-5)


# bf16 inputs: outputs within 2e-2 (absolute) of float32 for unit-scale inputs.
@pytest.mark.parametrize("name", ["dot", "scaled_dot", "additive", "din"])
def test_bf16_within_tolerance(name):
  fn = _callables()[name]
  shape = (2, 6, 6, 2, 4)
  q, k, v, valid = _inputs(shape, seed=7)
  mask = Mask(causal=True, key_valid=jnp.asarray(valid))
  out32, _ = fn(*_f32(q, k, v), mask)
  out16, _ = fn(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), mask)
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=5e-2)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5),
                                       (jnp.bfloat16, 5e-2)])
def test_tanh_scores_match_autodiff_of_the_whole_hidden_layer(dtype, tol):
  r = np.random.default_rng(9)
  qa, ka = r.normal(size=(2, 3, 5, 7)), r.normal(size=(2, 3, 5, 9))
  v_a, cot = r.normal(size=(3, 5)), r.normal(size=(2, 3, 7, 9))

  def whole(qa, ka, v_a):
    hidden = jnp.tanh(qa[..., :, None] + ka[..., None, :])
    return jnp.einsum("bhaqk,ha->bhqk", hidden, v_a)

  def value_and_grads(fn, *args):
    out, pull = jax.vjp(fn, *args)
    return (out,) + pull(jnp.asarray(cot, out.dtype))

  got = value_and_grads(mlp_score.tanh_scores,
                        *(jnp.asarray(x, dtype) for x in (qa, ka, v_a)))
  want = value_and_grads(whole, *_f32(qa, ka, v_a))
  for g, w in zip(got, want):
    assert g.dtype == dtype and g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), w,
                               atol=tol * max(1.0, float(jnp.abs(w).max())),
                               rtol=tol)


def test_weights_refused_when_too_large(monkeypatch):
  from recattn.attention import weights
  monkeypatch.setattr(weights, "MAX_WEIGHT_ELEMENTS", 10)
  q, k, v, valid = _inputs((1, 4, 4, 1, 4))
  with pytest.raises(ValueError, match="would materialise"):
    attention.scaled_dot.scaled_dot(*_f32(q, k, v), Mask(), return_weights=True)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_path_matches_the_reference(causal):
  shape = (2, 128, 128, 2, 64)
  q, k, v, valid = _inputs(shape, seed=9)
  mask = Mask(causal=causal, key_valid=jnp.asarray(valid))
  args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  assert attention.scaled_dot.cudnn_status(args[0], args[1], mask,
                                           None) is None
  out, _ = attention.scaled_dot.scaled_dot(*args, mask)
  ref, _ = attention.scaled_dot.reference(*args, mask, scale=1 / 8)
  rows = np.asarray(mask.dense(128, 128)).any(-1)[:, 0]  # [B, Lq]
  np.testing.assert_allclose(np.asarray(out, np.float32)[rows],
                             np.asarray(ref, np.float32)[rows], atol=2e-2)


def test_cudnn_call_gets_full_mask_and_falls_back_when_refused(monkeypatch):
  # What a GPU run found: cuDNN refuses a [B, 1, 1, Lk] padding mask. The
  # call must pass [B, 1, Lq, Lk], and a refusal must fall back to XLA.
  shape = (2, 16, 16, 2, 64)
  q, k, v, valid = _inputs(shape, seed=3)
  mask = Mask(causal=True, key_valid=jnp.asarray(valid))
  args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  seen = {}

  def fake_cudnn(q, k, v, *, bias, mask, scale, is_causal, local_window_size,
                 implementation):
    seen.update(mask=mask.shape, implementation=implementation)
    raise ValueError("refused\nsecond line")

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
  out, _ = attention.scaled_dot.scaled_dot(*args, mask)
  assert seen == {"mask": (2, 1, 16, 16), "implementation": "cudnn"}
  ref, _ = attention.scaled_dot.reference(*args, mask, scale=1 / 8)
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(ref, np.float32))


def test_cudnn_status_explains_the_fallback():
  q = jnp.zeros((1, 4, 1, 50), jnp.float32)
  reason = attention.scaled_dot.cudnn_status(q, q, Mask(), None)
  assert reason is not None and reason
