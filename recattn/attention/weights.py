"""The one rule for returning attention weights.

Weights `[B, H, Lq, Lk]` are returned for interpretability wherever they fit;
past `MAX_WEIGHT_ELEMENTS` a variant refuses with an error instead of silently
materialising an O(L^2) tensor.
"""

MAX_WEIGHT_ELEMENTS = 1 << 28  # 1 GiB of float32


def check_fits(variant: str, b: int, h: int, q_len: int, k_len: int) -> None:
  """Raises ValueError when `[b, h, q_len, k_len]` weights are too large."""
  n = b * h * q_len * k_len
  if n > MAX_WEIGHT_ELEMENTS:
    raise ValueError(
        f"{variant}: return_weights=True would materialise [B={b}, H={h}, "
        f"Lq={q_len}, Lk={k_len}] weights ({n:,} elements > "
        f"{MAX_WEIGHT_ELEMENTS:,}); ask for weights on a shorter sequence or "
        "a smaller batch")
