"""Triton kernels: an optional dependency. Without Triton the library runs its PyTorch ops.

`HAS_TRITON` says whether Triton imports here. On a CPU, `TRITON_INTERPRET=1` (set before
Triton is first imported) runs the kernels in Triton's interpreter: slow, but exact enough to
test them against the PyTorch references, which is how CI checks them.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

__all__ = ["HAS_TRITON"]
