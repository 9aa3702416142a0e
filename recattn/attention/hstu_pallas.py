"""HSTU pointwise attention as Pallas (Triton) GPU kernels, fwd and bwd.

For each batch b and head h, with S = alpha Q K^T,

  W = silu(S) where the mask allows (causal j <= i, key_valid[b, j]), else 0
  out = diag(1/n) W V,  n_i = L ("padded") or the visible keys of i ("true")

No softmax, hence no running max or log-sum-exp: the forward kernel is a
plain f32 accumulation over key blocks, one program per (query block, b, h).
The backward kernels recompute S tile by tile; with dO' = diag(1/n) dO and
silu'(x) = sig(x) (1 + x (1 - sig(x))):

  dV = W^T dO';  dW = dO' V^T;  dS = dW * silu'(S) (masked);
  dQ = alpha dS K;  dK = alpha dS^T Q.

One kernel owns a key block and loops over query blocks for dK and dV (the
accumulators stay in registers); a second owns a query block and loops over
key blocks for dQ, so nothing is written twice and no atomics are needed.
With a causal mask the loops skip tiles entirely above the diagonal (loop
bounds) and only the tiles crossing it evaluate the causal mask.

Complexity: time O(B H L^2 (Dh + Dv)), about half of it with a causal mask;
memory O(B H L (Dh + Dv)) for the forward and the backward (the residuals are
q, k, v and two `[B, L]` vectors). Matmuls take the inputs' dtype and
accumulate in f32 (f32 inputs use full-precision, non-TF32 dots).

Supported subset (`supported` says why not): GPU backend, or `interpret=True`
(CPU, for tests); Lq == Lk; no bias (rab); masks with `causal` and/or
`key_valid` but no `window` or `num_targets`; head sizes Dh, Dv powers of two
in [16, 256]; q, k, v all f32, bf16 or f16. L need not divide the block sizes:
inputs are zero-padded to a multiple of the largest block and padded keys are
masked (causal masks hide them already).

Speed (`experiments/002_attention_cost/hstu_pallas_bench.py`, H200, jax
0.11.2, bf16, causal, B=8, H=8, d=64, L=8192, fwd+bwd): 4.6 ms, 1.18x the
time of cuDNN's softmax flash attention (XLA reference 0.27x); the default
tiles are the best of that run's sweep. Half of it comes from the sigmoid:
one `tanh.approx` (bf16/f16 default) instead of exp2 plus a division (0.87x).
jax 0.11 deprecates Pallas' Triton backend (a DeprecationWarning).
"""

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:
  from jax.experimental.pallas import triton as _pltriton
except ImportError:  # pragma: no cover - very old or trimmed jax
  _pltriton = None

# Renamed from TritonCompilerParams to CompilerParams in jax 0.7.
_COMPILER_PARAMS = (getattr(_pltriton, "CompilerParams", None)
                    or getattr(_pltriton, "TritonCompilerParams", None))
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static kernel parameters (hashable: a custom_vjp nondiff argument)."""
  alpha: float
  causal: bool
  grad_scale: float  # 1/L ("padded", applied to dq, dk, dv) or 1 ("true")
  block_q: int
  block_k: int
  bwd_block_outer: int  # the key block of dk/dv, the query block of dq
  bwd_block_inner: int  # the query / key block those kernels loop over
  num_warps: int
  num_stages: int
  bwd_num_warps: int
  bwd_num_stages: int
  fast_sigmoid: bool  # sig(x) = (1 + tanh(x / 2)) / 2 with tanh.approx
  interpret: bool


def supported(q, k, v, mask, bias, *, interpret: bool = False) -> str | None:
  """None if `attention` can run these inputs, else a short reason."""
  if not interpret and jax.default_backend() != "gpu":
    return f"needs a GPU (backend is {jax.default_backend()!r})"
  if _COMPILER_PARAMS is None:
    return "jax.experimental.pallas.triton is unavailable"
  if bias is not None:
    return "bias (rab) is not supported"
  if mask.window is not None or mask.num_targets is not None:
    return "masks with window or num_targets are not supported"
  if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    return f"needs Lq == Lk and matching shapes, got {q.shape} {v.shape}"
  for name, size in (("Dh", q.shape[-1]), ("Dv", v.shape[-1])):
    if size < 16 or size > 256 or size & (size - 1):
      return f"head size {name}={size} is not a power of two in [16, 256]"
  if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in _DTYPES:
    return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: need one of f32/bf16/f16"
  return None


def _dot(a, b, trans_b=False):
  """a @ b (or a @ b^T), f32 accumulation; f32 operands skip TF32."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=jnp.float32)


def _sigmoid(x, cfg: _Config):
  """Exact: ex2 and a division (two SFU ops); fast: one SFU tanh.approx."""
  if not cfg.fast_sigmoid:
    return 1.0 / (1.0 + jnp.exp2(x * -_LOG2E))
  tanh = jnp.tanh if cfg.interpret else _pltriton.approx_tanh
  return 0.5 + 0.5 * tanh(0.5 * x)


def _causal_bounds(i, block_out, block_in):
  """Inner blocks [0, full) fully visible, [full, end) crossing the diagonal.

  For outer (query) block i of size block_out and inner (key) blocks of size
  block_in. Integer division by lax.div: program ids are traced int32.
  """
  full = lax.div(i * block_out, block_in)
  end = lax.div((i + 1) * block_out + block_in - 1, block_in)
  return full, end


def _over_key_blocks(body, init, i, bq, bk, num_k_blocks, causal):
  """`body(j, carry, causal=...)` over the key blocks query block i sees.

  Causal: blocks wholly below the diagonal unmasked, then the ones crossing
  it masked; blocks above it are skipped. Otherwise every block, unmasked.
  """
  if not causal:
    return lax.fori_loop(0, num_k_blocks,
                         functools.partial(body, causal=False), init)
  full, end = _causal_bounds(i, bq, bk)
  carry = lax.fori_loop(0, full, functools.partial(body, causal=False), init)
  return lax.fori_loop(full, end, functools.partial(body, causal=True), carry)


def _fwd_kernel(q_ref, k_ref, v_ref, valid_ref, inv_n_ref, o_ref, *,
                cfg: _Config):
  bq, bk = cfg.block_q, cfg.block_k
  i = pl.program_id(0)
  q = q_ref[...]
  q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)

  def body(j, acc, causal):
    rows = pl.ds(j * bk, bk)
    k, v = k_ref[rows, :], v_ref[rows, :]
    s = _dot(q, k, trans_b=True) * cfg.alpha
    w = s * _sigmoid(s, cfg)
    if causal:
      k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
      w = jnp.where(k_pos <= q_pos, w, 0.0)
    if valid_ref is not None:
      w = jnp.where(valid_ref[rows][None, :] != 0, w, 0.0)
    return acc + _dot(w.astype(v.dtype), v)

  acc = _over_key_blocks(body, jnp.zeros((bq, o_ref.shape[-1]), jnp.float32),
                         i, bq, bk, k_ref.shape[0] // bk, cfg.causal)
  o_ref[...] = (acc * inv_n_ref[...][:, None]).astype(o_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, valid_ref, dk_ref, dv_ref, *,
                 cfg: _Config):
  """One key block; loops over query blocks. Tiles are kept transposed."""
  bk, bq = cfg.bwd_block_outer, cfg.bwd_block_inner
  j = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)

  def body(i, carry, causal):
    dk, dv = carry
    rows = pl.ds(i * bq, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    s_t = _dot(k, q, trans_b=True) * cfg.alpha  # S^T: [bk, bq]
    sig = _sigmoid(s_t, cfg)
    w_t = s_t * sig
    ds_t = _dot(v, do, trans_b=True) * sig * (1.0 + s_t * (1.0 - sig))
    if causal:
      q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
      w_t = jnp.where(k_pos <= q_pos, w_t, 0.0)
      ds_t = jnp.where(k_pos <= q_pos, ds_t, 0.0)
    dv = dv + _dot(w_t.astype(do.dtype), do)
    dk = dk + _dot(ds_t.astype(q.dtype), q)
    return dk, dv

  carry = (jnp.zeros((bk, dk_ref.shape[-1]), jnp.float32),
           jnp.zeros((bk, dv_ref.shape[-1]), jnp.float32))
  num_q = q_ref.shape[0] // bq
  if cfg.causal:
    # Query blocks from the one holding query j*bk; those starting before
    # the block's last key cross the diagonal.
    start = lax.div(j * bk, bq)
    cross = lax.div((j + 1) * bk + bq - 1, bq)
    carry = lax.fori_loop(start, cross, functools.partial(body, causal=True),
                          carry)
    carry = lax.fori_loop(cross, num_q, functools.partial(body, causal=False),
                          carry)
  else:
    carry = lax.fori_loop(0, num_q, functools.partial(body, causal=False),
                          carry)
  dk, dv = carry
  dk, dv = dk * (cfg.alpha * cfg.grad_scale), dv * cfg.grad_scale
  if valid_ref is not None:  # a key's mask is constant over the query loop
    keep = valid_ref[...][:, None] != 0
    dk, dv = jnp.where(keep, dk, 0.0), jnp.where(keep, dv, 0.0)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, valid_ref, dq_ref, *,
               cfg: _Config):
  """One query block; loops over key blocks."""
  bq, bk = cfg.bwd_block_outer, cfg.bwd_block_inner
  i = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]
  q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)

  def body(j, dq, causal):
    rows = pl.ds(j * bk, bk)
    k, v = k_ref[rows, :], v_ref[rows, :]
    s = _dot(q, k, trans_b=True) * cfg.alpha
    sig = _sigmoid(s, cfg)
    ds = _dot(do, v, trans_b=True) * sig * (1.0 + s * (1.0 - sig))
    if causal:
      k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
      ds = jnp.where(k_pos <= q_pos, ds, 0.0)
    if valid_ref is not None:
      ds = jnp.where(valid_ref[rows][None, :] != 0, ds, 0.0)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _over_key_blocks(body, jnp.zeros((bq, dq_ref.shape[-1]), jnp.float32),
                        i, bq, bk, k_ref.shape[0] // bk, cfg.causal)
  dq_ref[...] = (dq * (cfg.alpha * cfg.grad_scale)).astype(dq_ref.dtype)


def _spec(rows, dim=None, *, whole=False):
  """BlockSpec over grid (block i, b, h) of a `[B, L, H, dim]` array.

  Each program sees block i of `rows` rows, or with `whole` the full length
  `rows` (the kernel slices it). Without `dim`: of a `[B, L]` vector.
  """
  if dim is None:
    if whole:
      return pl.BlockSpec((None, rows), lambda i, b, h: (b, 0))
    return pl.BlockSpec((None, rows), lambda i, b, h: (b, i))
  if whole:
    return pl.BlockSpec((None, rows, None, dim), lambda i, b, h: (b, 0, h, 0))
  return pl.BlockSpec((None, rows, None, dim), lambda i, b, h: (b, i, h, 0))


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, warps, stages,
          name):
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret,
      compiler_params=_COMPILER_PARAMS(num_warps=warps, num_stages=stages),
      name=name)


def _forward(q, k, v, valid, inv_n, cfg):
  batch, length, heads, dh = q.shape
  dv = v.shape[-1]
  bq = cfg.block_q
  in_specs = [_spec(bq, dh), _spec(length, dh, whole=True),
              _spec(length, dv, whole=True),
              None if valid is None else _spec(length, whole=True),
              _spec(bq)]
  out_shape = jax.ShapeDtypeStruct((batch, length, heads, dv), v.dtype)
  return _call(_fwd_kernel, cfg, (length // bq, batch, heads), in_specs,
               _spec(bq, dv), out_shape, cfg.num_warps, cfg.num_stages,
               "hstu_fwd")(q, k, v, valid, inv_n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _hstu(q, k, v, valid, inv_n, cfg):
  return _forward(q, k, v, valid, inv_n, cfg)


def _hstu_fwd(q, k, v, valid, inv_n, cfg):
  return _forward(q, k, v, valid, inv_n, cfg), (q, k, v, valid, inv_n)


def _hstu_bwd(cfg, res, d_out):
  q, k, v, valid, inv_n = res
  batch, length, heads, dh = q.shape
  dv = v.shape[-1]
  # "true" normalizer: per-query 1/n, in f32 (with "padded", grad_scale is
  # 1 only for L = 1, where inv_n is 1 too).
  if cfg.grad_scale == 1.0:
    d_out = d_out.astype(jnp.float32) * inv_n[:, :, None, None]
  d_out = d_out.astype(v.dtype)
  outer = cfg.bwd_block_outer
  grid = (length // outer, batch, heads)
  shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  dk, dv_ = _call(
      _dkdv_kernel, cfg, grid,
      [_spec(length, dh, whole=True), _spec(outer, dh), _spec(outer, dv),
       _spec(length, dv, whole=True),
       None if valid is None else _spec(outer)],
      [_spec(outer, dh), _spec(outer, dv)], [shape(k), shape(v)],
      cfg.bwd_num_warps, cfg.bwd_num_stages, "hstu_bwd_dkdv",
  )(q, k, v, d_out, valid)
  dq = _call(
      _dq_kernel, cfg, grid,
      [_spec(outer, dh), _spec(length, dh, whole=True),
       _spec(length, dv, whole=True), _spec(outer, dv),
       None if valid is None else _spec(length, whole=True)],
      _spec(outer, dh), shape(q),
      cfg.bwd_num_warps, cfg.bwd_num_stages, "hstu_bwd_dq",
  )(q, k, v, d_out, valid)
  return dq, dk, dv_, None, None


_hstu.defvjp(_hstu_fwd, _hstu_bwd)


def attention(q, k, v, *, alpha: float, normalizer: str = "padded",
              causal: bool = True, key_valid=None, block_q: int = 64,
              block_k: int = 64, bwd_block_outer: int = 64,
              bwd_block_inner: int = 64, num_warps: int = 4,
              num_stages: int = 3, bwd_num_warps: int = 4,
              bwd_num_stages: int = 3, fast_sigmoid: bool | None = None,
              interpret: bool = False):
  """HSTU attention through the Pallas kernels; differentiable in q, k, v.

  Args:
    q: `[B, L, H, Dh]`; k: `[B, L, H, Dh]`; v: `[B, L, H, Dv]`.
    alpha: scale of Q K^T (a Python number).
    normalizer: "padded" (divide by L) or "true" (by visible keys, >= 1).
    causal: key j visible from query i only if j <= i.
    key_valid: `[B, L]` bool, False for padding keys; None = all valid.
    block_q, block_k: forward query / key tiles (powers of two >= 16).
    bwd_block_outer, bwd_block_inner: backward tiles: the dk/dv kernel owns
      `outer` keys and loops over `inner` queries, the dq kernel the reverse.
    num_warps, num_stages, bwd_num_warps, bwd_num_stages: Triton launch
      parameters of the forward and of the two backward kernels.
    fast_sigmoid: sigmoid through one hardware tanh.approx (abs. error
      ~3e-4) instead of exp2 and a division; None = for bf16/f16 inputs.
      The interpreter uses jnp.tanh in its place.
    interpret: run the kernels in Pallas' interpreter (CPU tests).

  Returns:
    out `[B, L, H, Dv]` in v's dtype.
  """
  if normalizer not in ("padded", "true"):
    raise ValueError(f"hstu_pallas: normalizer={normalizer!r}")
  batch, length = q.shape[:2]
  blocks = (block_q, block_k, bwd_block_outer, bwd_block_inner)
  if any(blk < 16 or blk & (blk - 1) for blk in blocks):
    raise ValueError(f"hstu_pallas: block sizes {blocks} must be powers of "
                     "two >= 16")
  cap = max(16, pl.next_power_of_2(length))  # short sequences: one block
  blocks = [min(blk, cap) for blk in blocks]
  padded = -(-length // max(blocks)) * max(blocks)
  pad = padded - length
  q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x
             for x in (q, k, v))
  valid = None
  if key_valid is not None:
    key_valid = jnp.broadcast_to(key_valid, (batch, length))
    valid = jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, pad)))
  elif pad and not causal:  # causal masks already hide the padded keys
    valid = jnp.broadcast_to(
        (jnp.arange(padded) < length).astype(jnp.int32), (batch, padded))
  if normalizer == "padded":
    inv_n = jnp.full((batch, padded), 1.0 / length, jnp.float32)
  else:
    ones = (jnp.ones((batch, padded), jnp.int32) if valid is None else valid)
    if causal:
      counts = jnp.cumsum(ones, axis=1)
    else:
      counts = jnp.broadcast_to(jnp.sum(ones[:, :length], axis=1,
                                        keepdims=True), (batch, padded))
    inv_n = 1.0 / jnp.maximum(counts, 1).astype(jnp.float32)
  if fast_sigmoid is None:
    fast_sigmoid = q.dtype != jnp.float32
  cfg = _Config(float(alpha), bool(causal),
                1.0 / length if normalizer == "padded" else 1.0, *blocks,
                num_warps, num_stages, bwd_num_warps, bwd_num_stages,
                bool(fast_sigmoid), bool(interpret))
  out = _hstu(q, k, v, valid, inv_n, cfg)
  return out[:, :length] if pad else out
