"""Tests for recattn.attention.hstu_pallas (HSTU Pallas/Triton kernels).

On CPU the kernels run in Pallas' interpreter (float32, tiny shapes, blocks
of 16, L = 40 not a multiple of the block) against `hstu.reference`: outputs
and gradients agree to float32 rounding (atol 1e-5 relative to the largest
entry). The GPU tests (skipped unless `jax.default_backend() == "gpu"`) run
the compiled Triton kernels at B=2, H=4, L in {1000, 2048}, D=64:
  * float32 inputs (full-precision dots): out and grads within 2e-3 of the
    float32 XLA reference, relative to each tensor's largest entry;
  * bfloat16 inputs (bf16 dots, f32 accumulation, tanh.approx sigmoid):
    within 3e-2 of the float32 reference on float32 copies of the same bf16
    inputs, the bound the XLA bf16 path is held to in attention_hstu_test.
Run them on a GPU machine with JAX_PLATFORMS=cuda (conftest.py defaults to
cpu).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recattn.attention import hstu as hstu_lib
from recattn.attention import hstu_pallas
from recattn.attention.masks import Mask

ON_GPU = jax.default_backend() == "gpu"
SMALL = dict(block_q=16, block_k=16, bwd_block_outer=16, bwd_block_inner=16)
# Unequal tiles exercise the diagonal bounds as the GPU defaults do.
MIXED = dict(block_q=32, block_k=16, bwd_block_outer=32, bwd_block_inner=16)


def randn(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def inputs(b, length, h, d, dv, seed=0):
  return tuple(jnp.asarray(x) for x in (
      randn(seed, b, length, h, d), randn(seed + 1, b, length, h, d),
      randn(seed + 2, b, length, h, dv), randn(seed + 3, b, length, h, dv)))


def left_padding(b, length):
  """`[B, L]` key_valid; row r has 7 r padding keys on the left."""
  lengths = np.maximum(length - 7 * np.arange(b), 1)
  return jnp.asarray(np.arange(length)[None, :] >= (length - lengths)[:, None])


def loss_and_grads(attend, q, k, v, cot):
  """out and d sum(out * cot) / d (q, k, v), in one compiled call."""
  def loss(q, k, v):
    out = attend(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * cot), out
  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(
      q, k, v)
  return (out,) + grads


def assert_close(got, want, tol, names=("out", "dq", "dk", "dv")):
  for name, g, w in zip(names, got, want):
    g = np.asarray(g, np.float32)
    w = np.asarray(w, np.float32)
    err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)
    assert err <= tol, f"{name}: max error {err:.2e} > {tol:.0e} (relative)"


def reference(mask, alpha, normalizer):
  def attend(q, k, v):
    # Full float32 matmuls (XLA on a GPU defaults to TF32).
    with jax.default_matmul_precision("highest"):
      return hstu_lib.reference(q, k, v, mask, alpha=alpha,
                                normalizer=normalizer)[0]
  return attend


def kernel(mask, alpha, normalizer, interpret, **blocks):
  return lambda q, k, v: hstu_pallas.attention(
      q, k, v, alpha=alpha, normalizer=normalizer, causal=mask.causal,
      key_valid=mask.key_valid, interpret=interpret, **blocks)


CPU_CASES = [  # (L, causal, key padding, normalizer, blocks)
    (16, True, False, "padded", SMALL),
    (16, False, True, "true", SMALL),
    (40, True, False, "padded", SMALL),
    (40, True, True, "true", SMALL),
    (40, False, False, "true", SMALL),
    (40, False, True, "padded", SMALL),
    (40, True, True, "padded", MIXED),
    (40, False, True, "true", MIXED),
]


@pytest.mark.parametrize("length,causal,padding,normalizer,blocks",
                         CPU_CASES)
def test_interpret_matches_reference(length, causal, padding, normalizer,
                                     blocks):
  b, h, d = 2, 2, 16
  q, k, v, cot = inputs(b, length, h, d, d)
  mask = Mask(causal=causal,
              key_valid=left_padding(b, length) if padding else None)
  want = loss_and_grads(reference(mask, 0.3, normalizer), q, k, v, cot)
  got = loss_and_grads(
      kernel(mask, 0.3, normalizer, interpret=True, **blocks), q, k, v, cot)
  assert_close(got, want, 1e-5)


def test_interpret_fast_sigmoid_formula():
  # fast_sigmoid's formula, with jnp.tanh standing in for tanh.approx.
  q, k, v, cot = inputs(1, 40, 2, 16, 32, seed=3)
  mask = Mask(causal=True)
  want = loss_and_grads(reference(mask, 0.3, "padded"), q, k, v, cot)
  got = loss_and_grads(
      kernel(mask, 0.3, "padded", interpret=True, fast_sigmoid=True, **SMALL),
      q, k, v, cot)
  assert_close(got, want, 1e-5)


def test_hstu_impl_dispatch():
  q, k, v, cot = inputs(1, 16, 2, 16, 16, seed=5)
  mask = Mask(causal=True)
  xla = hstu_lib.hstu(q, k, v, mask, impl="xla")[0]
  default = hstu_lib.hstu(q, k, v, mask)[0]
  if not ON_GPU:  # "auto" on CPU is the XLA path, bit for bit
    np.testing.assert_array_equal(default, xla)
  np.testing.assert_array_equal(
      xla, hstu_lib.reference(q, k, v, mask, alpha=0.25)[0])
  ref = reference(mask, 0.25, "padded")(q, k, v)
  pallas = hstu_lib.hstu(q, k, v, mask, impl="pallas")[0]
  np.testing.assert_allclose(pallas, ref, atol=1e-5 * np.abs(ref).max())
  with pytest.raises(ValueError, match="impl="):
    hstu_lib.hstu(q, k, v, mask, impl="triton")


@pytest.mark.parametrize("mask,bias,match", [
    (Mask(causal=True, window=4), None, "window"),
    (Mask(causal=True, num_targets=2), None, "num_targets"),
    (Mask(causal=True), np.zeros((1, 1, 16, 16), np.float32), "bias"),
])
def test_pallas_impl_raises_when_unsupported(mask, bias, match):
  q, k, v, _ = inputs(1, 16, 2, 16, 16)
  with pytest.raises(ValueError, match=match):
    hstu_lib.hstu(q, k, v, mask, bias, impl="pallas")
  out = hstu_lib.hstu(q, k, v, mask, bias)[0]  # "auto" falls back
  want = hstu_lib.hstu(q, k, v, mask, bias, impl="xla")[0]
  np.testing.assert_array_equal(out, want)


def test_supported_reasons():
  q = jnp.zeros((1, 16, 2, 16))
  mask = Mask(causal=True)
  check = functools.partial(hstu_pallas.supported, interpret=True)
  assert check(q, q, q, mask, None) is None
  assert check(q, q, jnp.zeros((1, 16, 2, 32)), mask, None) is None
  assert "Lq == Lk" in check(q, jnp.zeros((1, 8, 2, 16)),
                             jnp.zeros((1, 8, 2, 16)), mask, None)
  assert "Dh=24" in check(jnp.zeros((1, 16, 2, 24)),
                          jnp.zeros((1, 16, 2, 24)), q, mask, None)
  assert "Dv=8" in check(q, q, jnp.zeros((1, 16, 2, 8)), mask, None)
  assert "dtypes" in check(q, q, q.astype(jnp.bfloat16), mask, None)
  assert "window" in check(q, q, q, Mask(causal=True, window=3), None)
  assert "bias" in check(q, q, q, mask, jnp.zeros((1, 1, 16, 16)))
  if not ON_GPU:
    assert "GPU" in hstu_pallas.supported(q, q, q, mask, None)
  with pytest.raises(ValueError, match="powers of two"):
    hstu_pallas.attention(q, q, q, alpha=1.0, block_q=24, interpret=True)


# ----------------------------------------------------------------- GPU only

gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a GPU")


@gpu_only
@pytest.mark.parametrize("length", [1000, 2048])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-3),
                                       (jnp.bfloat16, 3e-2)])
def test_gpu_kernel_matches_reference(length, dtype, tol):
  b, h, d = 2, 4, 64
  q, k, v, cot = inputs(b, length, h, d, d, seed=11)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  mask = Mask(causal=True)
  alpha = 1.0 / 8
  want = loss_and_grads(
      reference(mask, alpha, "padded"),
      *(x.astype(jnp.float32) for x in (q, k, v)), cot)
  got = loss_and_grads(kernel(mask, alpha, "padded", interpret=False),
                       q, k, v, cot)
  assert got[0].dtype == dtype and got[1].dtype == dtype
  assert_close(got, want, tol)


@gpu_only
def test_gpu_key_padding_and_true_normalizer():
  b, h, d, length = 2, 4, 64, 1000
  q, k, v, cot = inputs(b, length, h, d, d, seed=12)
  for causal in (True, False):
    mask = Mask(causal=causal, key_valid=left_padding(b, length))
    want = loss_and_grads(reference(mask, 0.125, "true"), q, k, v, cot)
    got = loss_and_grads(kernel(mask, 0.125, "true", interpret=False),
                         q, k, v, cot)
    assert_close(got, want, 2e-3)


@gpu_only
def test_gpu_auto_uses_kernel():
  q, k, v, _ = inputs(2, 256, 4, 64, 64, seed=13)
  mask = Mask(causal=True)
  auto = jax.jit(lambda q, k, v: hstu_lib.hstu(q, k, v, mask)[0])
  text = auto.lower(q, k, v).as_text()
  assert "hstu_fwd" in text or "triton" in text.lower()
  want = hstu_lib.hstu(q, k, v, mask, impl="xla")[0]
  assert_close((auto(q, k, v),), (want,), 2e-3, names=("out",))
