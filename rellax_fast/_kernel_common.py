"""Constants and pure-Python helpers shared by the ops (rellax_fast.ops) and the Triton kernels
(rellax_fast.kernels), so that the kernels import nothing above them.

A leaf module: it imports only the standard library. It owns:

- the switch that tells whether Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``);
- the integer half of the dropout hash (:func:`dropout_key`, :func:`dropout_threshold`), whose tensor twin and
  reference mask live in :mod:`rellax_fast.ops.dropout` and whose C++ form is in ``csrc/common.h``;
- ``NORM_EPS``, the zero-norm rule of cosine retrieval: x / max(||x||, NORM_EPS), on every backend;
- the Triton CFLoRA kernel's limits (``CFLORA_TRITON_MAX_RANK``, ``CFLORA_TRITON_DTYPES``), which the kernel
  enforces and the op's backend table reports (its ``supports`` check in :mod:`rellax_fast.ops.cflora`);
- the launchers' integer helpers :func:`cdiv` and :func:`next_power_of_2`.
"""

from __future__ import annotations

import os

NORM_EPS = 1e-12
M32 = 0xFFFFFFFF
CFLORA_TRITON_MAX_RANK = (
    128  # one register tile holds a row block of S/T (BLOCK_R = next pow2 >= r, at least 16)
)
CFLORA_TRITON_DTYPES = ("float32", "float16", "bfloat16")  # torch dtype names (this module imports no torch)


def triton_interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The launchers' grid and block arithmetic. Not triton.cdiv / triton.next_power_of_2: in triton 3.6 and 3.8 those are
# ConstexprFunction objects whose host call unwraps every argument and imports a module, about 2 us a call, and a
# CFLoRA forward+backward made 34 such calls; without them its launchers' host time fell by a quarter to a third
# (scripts/triton_host_cost.py, BENCHMARKS.md).
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def mix32_int(x: int) -> int:
    """lowbias32 of a Python int taken modulo 2^32."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def dropout_key(seed: int) -> int:
    """The 32-bit key of a 64-bit seed (both words mixed), shared by every backend's dropout hash."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return mix32_int((s & M32) ^ mix32_int((s >> 32) ^ 0x9E3779B9))


def dropout_threshold(p: float) -> int:
    """An element is dropped when the top 24 bits of its hash fall below this (p · 2^24)."""
    return int(p * 16777216.0)
