"""The output row layout shared by the CUDA kernel, the torch fallback and the decoder.

One row of ``ROW_WORDS`` int64 words per tensor (csrc/tensor_stats.h says the same):
min and max as order-preserving keys (so 64-bit integer atomics reduce them), the sum
of finite values as float64 bits, then counts.  A zeroed row means "nothing seen".
"""

from __future__ import annotations

ROW_WORDS = 8
MIN, MAX, SUM, FINITE, NAN, INF, SEEN = range(7)
SIGN = 1 << 63
MASK = (1 << 64) - 1

#: dtypes the kernel reads; anything else goes through torch ops.
KERNEL_DTYPES = (
    "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
    "int8", "uint8", "int32", "int64", "bool", "float64",
)
