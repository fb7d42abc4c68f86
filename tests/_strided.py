"""The one builder of kernel test inputs: random tensors in the memory layouts kernels must handle."""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "permuted")


def strided(shape: tuple[int, ...], dtype: torch.dtype, layout: str, gen: torch.Generator,
            special: float | None = None) -> torch.Tensor:
    """A random tensor of `shape` and `dtype` laid out as:

    contiguous; transposed (last two dims swapped in storage); sliced (every other column from offset 1: a
    non-unit stride and a storage offset); expanded (stride 0 on dim 0); permuted (dims 0 and 1 swapped in
    storage). A layout that needs more dims than `shape` has falls back to contiguous. `special` (0, nan, inf)
    goes into the first element (not for expanded tensors, which cannot be written)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: {layout!r}, allowed: {LAYOUTS}")
    if layout == "expanded" and len(shape) >= 2:
        return torch.randn(1, *shape[1:], generator=gen).to(dtype).expand(shape)
    if layout == "transposed" and len(shape) >= 2:
        x = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2)
    elif layout == "sliced":
        x = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., 1::2]
    elif layout == "permuted" and len(shape) >= 2:
        x = torch.randn(shape[1], shape[0], *shape[2:], generator=gen).transpose(0, 1)
    else:
        x = torch.randn(*shape, generator=gen)
    x = x.to(dtype)
    if special is not None:
        x[(0,) * x.dim()] = special
    return x
