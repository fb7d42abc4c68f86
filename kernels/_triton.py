"""Guarded Triton import and the launch helpers shared by every kernel file.

`fastcache.kernels` must import on machines without triton (CPU-only installs): then `triton` and `tl` below
are stand-ins that let the kernel files define their `@triton.jit` functions at import time, and launching one
raises. Nothing here touches global torch, inductor or triton settings.

The Triton interpreter (`TRITON_INTERPRET=1`, read by triton when a kernel is decorated, so it must be set
before this module is first imported) runs the real kernels on CPU tensors: the tests use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

try:  # guarded: triton is an optional dependency
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton installed

    class _MissingTriton:
        """Stands in for `triton` and `triton.language`: `jit` keeps the Python function, `constexpr` is only
        an annotation; launching a kernel (indexing it with a grid) fails."""

        constexpr = object()

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, (n - 1).bit_length())

    triton = _MissingTriton()
    tl = _MissingTriton()
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "MAX_DIMS",
    "device_guard",
    "interpreter_op",
    "is_interpreted",
    "require_triton",
    "strided_layout",
    "tl",
    "triton",
    "unravel4",
]

# The strided kernels address up to 4 dims after merging the ones that are contiguous with each other: a
# permuted 5-D video latent (B, C, F, H, W) seen as (B, F, C, H, W) merges to 4 dims (H*W stays contiguous).
# Anything that still has more dims is copied to a contiguous tensor once by the launcher.
MAX_DIMS = 4


def require_triton() -> None:
    """Raise a clear error when a Triton kernel is launched without triton installed."""
    if not HAS_TRITON:
        raise RuntimeError("fastcache.kernels: this path launches a Triton kernel; triton is not installed")


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` was decorated under `TRITON_INTERPRET=1` (it then runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def interpreter_op(name: str, kernel: object, launcher: Callable, fake: Callable) -> Callable:
    """TEST ONLY: register `fastcache_test::<name>`, a CPU custom op whose implementation is `launcher`, the
    host function that launches the real Triton `kernel`. It lets a test run that kernel inside a
    `torch.compile(fullgraph=True)` graph on CPU (a raw `kernel[grid]` launch or `wrap_triton` cannot be traced
    there under the interpreter). Needs `TRITON_INTERPRET=1` set before triton is imported. No validation."""
    if not is_interpreted(kernel):
        raise RuntimeError("interpreter_test_op needs TRITON_INTERPRET=1 set before triton is imported")
    op = torch.library.custom_op(f"fastcache_test::{name}", launcher, mutates_args=(), device_types="cpu")
    op.register_fake(fake)
    return op


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensor's (a cuda:1 tensor, cuda:0 current)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def strided_layout(tensors: Sequence[torch.Tensor]) -> tuple[list[int], list[list[int]]] | None:
    """Describe same-shape tensors as one logical index space of at most `MAX_DIMS` dims.

    Size-1 dims are dropped and neighbouring dims merged where every tensor allows it (stride[i] ==
    stride[i+1] * size[i+1]). Returns `(sizes, strides_per_tensor)` padded at the front to `MAX_DIMS` dims
    (size 1, stride 0), or None when more than `MAX_DIMS` dims remain.
    """
    shape = list(tensors[0].shape)
    strides = [list(t.stride()) for t in tensors]
    keep = [i for i, s in enumerate(shape) if s != 1]
    sizes = [shape[i] for i in keep]
    strides = [[st[i] for i in keep] for st in strides]
    i = len(sizes) - 2
    while i >= 0:
        if all(st[i] == st[i + 1] * sizes[i + 1] for st in strides):
            sizes[i] *= sizes[i + 1]
            del sizes[i + 1]
            for st in strides:
                st[i] = st[i + 1]
                del st[i + 1]
        i -= 1
    if len(sizes) > MAX_DIMS:
        return None
    pad = MAX_DIMS - len(sizes)
    return [1] * pad + sizes, [[0] * pad + st for st in strides]


@triton.jit
def unravel4(idx, size1, size2, size3):
    """Split a linear (row-major) index over 4 logical dims into the 4 coordinates."""
    i3 = idx % size3
    rest = idx // size3
    i2 = rest % size2
    rest = rest // size2
    i1 = rest % size1
    i0 = rest // size1
    return i0, i1, i2, i3
