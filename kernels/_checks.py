"""Input validation shared by the public functions (run before any compute).

Every check reads only metadata (type, dtype, device, shape), so under torch.compile it is evaluated at trace
time: no graph break, no host sync.
"""

from __future__ import annotations

import torch

# The kernels load these and accumulate in fp32; fp64 would silently lose precision in a kernel built for
# fp32.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t: object, fn: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{fn}: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    return t


def check_same(fn: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor, *, dtype: bool) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}")
    if dtype and t.dtype != ref.dtype:
        raise ValueError(f"{fn}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_weight(name: str, w: object, ref: torch.Tensor, fn: str) -> torch.Tensor:
    """A per-step weight: a 0-dim floating tensor on the data's device (a Python float would be guarded on by
    dynamo and recompile at every new value; a CPU scalar with CUDA data would need a host-to-device copy)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(
            f"{fn}: {name} must be a 0-dim tensor, got {type(w).__name__} "
            "(a Python number recompiles under torch.compile at every new value)"
        )
    if w.dim() != 0:
        raise ValueError(f"{fn}: {name} must be a 0-dim tensor, got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"{fn}: {name} must be a floating tensor, got {w.dtype}")
    if w.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {w.device} but the data is on {ref.device}")
    return w


def inline_in_compiled_cpu_graph(t: torch.Tensor) -> bool:
    """Whether to trace an op's torch composite instead of calling the custom op: inside a compiled CPU graph the
    op would be an opaque eager call (tens of microseconds of Python dispatch per call, and inductor cannot fuse
    through it); the composite fuses into the surrounding kernels. Eager CPU calls and every CUDA call keep
    the op (its chunked CPU loop, or the Triton kernel), but for `absmean_sums` on a small CPU tensor."""
    return t.device.type == "cpu" and torch.compiler.is_compiling()
