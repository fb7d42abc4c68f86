"""Graph-safe control flow: one helper that is a plain `if` for planned decisions and `torch.cond` otherwise.

A decision planned ahead is a Python bool: the compiled step specialises on it (one graph per distinct step
variant) and the branch not taken is never traced. A decision that depends on data (or that the caller
leaves to the device) is a 0-dim bool tensor: under torch.compile, `torch.cond` runs only the branch taken,
with no host sync and no graph break; in eager mode it is read on the host (eager code syncs anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

Flag = bool | Tensor
T = TypeVar("T")


def _without_aliases(fn: Callable[..., T]) -> Callable[..., T]:
    # torch.cond refuses branch outputs that alias its operands (a reused cache entry is exactly that):
    # copy those outputs, and only those. Every output also gets canonical contiguous strides: the two
    # branches must agree on strides, and torch 2.13 fails merging a size-1 dim's arbitrary stride (a video
    # with one channel) even where the stride expressions print equal.
    def wrapped(*operands: Any) -> T:
        leaves = tree_leaves(operands)
        out = fn(*operands)
        # identity, not id(): id() would make dynamo guard on the objects and recompile every call
        return tree_map(lambda x: (x.clone(memory_format=torch.contiguous_format)
                                   if any(x is leaf for leaf in leaves) else canonical(x))
                        if isinstance(x, Tensor) else x, out)

    return wrapped


def canonical(x: Tensor) -> Tensor:
    """`x` with the strides of a new contiguous tensor (a copy only when they differ). `.contiguous()` is not
    enough: it keeps the stride of a size-1 dim, which torch.cond and dynamo's guards also compare."""
    expected, step = [], 1
    for size in reversed(x.shape):
        expected.append(step)
        step *= size
    expected.reverse()
    if not torch.compiler.is_compiling():  # eagerly the strides are ints (aten.sym_stride: a 4 us dispatch)
        return x if x.stride() == tuple(expected) else x.clone(memory_format=torch.contiguous_format)
    # a data-dependent size (compiled Framepack slices its text stream by its mask's sum) has no value to guard
    # on while tracing: a stride not known to match is copied (guard_or_false); aten.sym_stride, as dynamo fails
    # reading x.stride() where such a size was refined to a constant (torch 2.13)
    strides = torch.ops.aten.sym_stride(x)
    for i in range(x.dim()):
        if not guard_or_false(strides[i] == expected[i]):
            return x.clone(memory_format=torch.contiguous_format)
    return x


def branch(pred: Flag, true_fn: Callable[..., T], false_fn: Callable[..., T], operands: tuple) -> T:
    """`true_fn(*operands) if pred else false_fn(*operands)`, on the host or on the device.

    Args:
        pred: a Python bool (planned decision) or a 0-dim bool tensor (decided on the device).
        true_fn, false_fn: pure functions of the operands returning pytrees of tensors of the same structure,
            shapes and dtypes (required by `torch.cond` when `pred` is a tensor).
        operands: a tuple of tensors (pytrees of tensors are allowed).
    """
    if isinstance(pred, bool):
        return true_fn(*operands) if pred else false_fn(*operands)
    if not isinstance(pred, Tensor) or pred.dim() != 0 or pred.dtype != torch.bool:
        raise TypeError(f"pred: must be a bool or a 0-dim bool tensor, got {pred!r}")
    if not torch.compiler.is_compiling():
        # Eager: torch.cond would re-trace its branches with dynamo at every call (new closures each
        # step); one host read is far cheaper there. Compiled code never takes this path.
        return true_fn(*operands) if bool(pred) else false_fn(*operands)
    unique, rebuild = _distinct_tensors(operands)
    return torch.cond(pred, _without_aliases(lambda *ts: true_fn(*rebuild(ts))),
                      _without_aliases(lambda *ts: false_fn(*rebuild(ts))), _pin_layouts(unique))


def _distinct_tensors(operands: tuple) -> tuple[tuple[Tensor, ...], Callable[[tuple], tuple]]:
    """The operands' distinct tensors (by identity), and the function that puts the operands back together from
    them. A tensor passed twice (the same modulation or rotary table to every block a cond runs) would be two
    operands of torch.cond, so two inputs of each branch's graph, each checked for its size and stride at every
    call; other leaves (None, numbers) stay constants of the branches."""
    leaves, spec = tree_flatten(operands)
    unique: list[Tensor] = []
    slots: list[int | None] = []
    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            slots.append(None)
            continue
        # identity, not id(): id() would make dynamo guard on the objects
        found = next((k for k, seen in enumerate(unique) if seen is leaf), None)
        if found is None:
            found = len(unique)
            unique.append(leaf)
        slots.append(found)

    def rebuild(tensors: tuple) -> tuple:
        return tree_unflatten([leaf if slot is None else tensors[slot] for leaf, slot in zip(leaves, slots)], spec)

    return tuple(unique), rebuild


def _pin_layouts(operands: tuple) -> tuple:
    # Inductor (torch 2.11-2.13) compiles each cond branch for its operands' traced strides but may lay out
    # an operand computed in the enclosing graph differently (it picks the layout of a pointwise result
    # late, e.g. following a transposed input), and the branch then fails its input stride assert. Pin
    # every operand to its traced strides: free when inductor has not fixed the layout yet, a copy otherwise.
    from torch._inductor import inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)

    force = torch.ops.prims.inductor_force_stride_order

    def pin(x: Tensor) -> Tensor:
        # a view with gaps (CogVideoX's video tokens sliced from its joint stream) cannot be forced to its own
        # strides (the prim lays out a dense copy): it becomes a contiguous copy
        return force(x, x.stride()) if _spans_its_elements(x) else canonical(x)

    return tree_map(lambda x: pin(x) if isinstance(x, Tensor) else x, operands)


def _spans_its_elements(x: Tensor) -> bool:
    """Whether `x`'s elements fill the memory its strides span, without gaps or overlaps (any dim order)."""
    strides = torch.ops.aten.sym_stride(x)
    span = 1
    for i, size in enumerate(x.shape):
        if guard_or_false(size == 0):
            return True
        if guard_or_false(size > 1) and guard_or_false(strides[i] == 0):
            return False
        span = span + (size - 1) * strides[i]
    return guard_or_false(span == x.numel())


def select(pred: Flag, a: Tensor, b: Tensor) -> Tensor:
    """`a if pred else b` for cheap elementwise choices: a plain `if` when planned, `torch.where` otherwise."""
    if isinstance(pred, bool):
        return a if pred else b
    return torch.where(pred, a, b)


def in_open_range(t: Tensor, bounds: tuple[float, float]) -> Tensor:
    """`lo < t < hi`, strict on both ends as in diffusers; in fp32 whatever t's dtype (bf16 against a Python
    bound would compare in bf16), the rule plans use too (`engine.as_timesteps`)."""
    t = t.float()
    return (t > bounds[0]) & (t < bounds[1])


def all_finite(tree: Any) -> Tensor:
    """One 0-dim bool: every element of every tensor in `tree` is finite (a reduction each, on the device, no
    sync). A cached value that fails it is never reused.

    The test is the finiteness of each tensor's sum, accumulated in fp32 (fp64 for fp64): a NaN or an Inf anywhere
    makes the sum NaN or infinite. It is one pass with no full-size temporary (`isfinite(x).all()` runs four
    elementwise passes and a reduction when not fused, eagerly). A sum past fp32's range (~3e38) of finite values
    also reads as non-finite: such a value is never reused, the safe side."""
    leaves = [x for x in tree_leaves(tree) if isinstance(x, Tensor)]
    if not leaves:
        raise ValueError("all_finite: no tensor given")
    sums = [x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32) for x in leaves]
    return torch.isfinite(sums[0] if len(sums) == 1 else torch.stack(sums).sum())


def guard_reuse(reuse: Flag, usable: Tensor, misses: list[Tensor]) -> Flag:
    """A reuse decision that never reuses a non-finite cached value where it can avoid it without a sync.

    `usable`: the cached value is all finite (a 0-dim bool tensor). On the device the reuse becomes
    `reuse & usable` (it joins the predicate of the cond already taken); a planned reuse (a Python bool) stays as
    planned, since refusing it would be a branch on data. Either way a reuse of a non-finite value is appended to
    `misses`, for the state's `nonfinite` count."""
    if isinstance(reuse, bool):
        if reuse:
            misses.append(~usable)
        return reuse
    misses.append(reuse & ~usable)
    return reuse & usable


def count_misses(total: Tensor, misses: list[Tensor]) -> Tensor:
    """`total` (an int64 0-dim count) plus one for each true miss flag from `guard_reuse`, on the device."""
    for miss in misses:
        total = total + miss.long()
    return total


def as_flag(value: Tensor) -> Flag:
    """A 0-dim bool tensor as it travels in a planned decision: a Python bool."""
    return bool(value)
