"""Keeping a cache state alive under `torch.compile(mode="reduce-overhead")` (CUDA graphs).

A compiled call's outputs live in the memory pool of cudagraph trees. Every compiled call starts a new
generation, and a later call that warms up or records a graph frees the outputs of earlier ones: reading such
a tensor raises "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run" (measured
on an H100 with the engine's PAB step, `bench/results/gpu_h100_run3_log.txt`). A cache state is read calls
later, so what a step wrote must leave the pool before the next compiled call:

    out, new = step(state, inputs, decision)            # compiled with mode="reduce-overhead"
    state = fastcache.out_of_cuda_graph_pool(new, state)

The drop-in does this itself at each `cache_context` exit.
"""

from __future__ import annotations

import sys
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

T = TypeVar("T")
_TREES = "torch._inductor.cudagraph_trees"


def out_of_cuda_graph_pool(new: T, previous: Any) -> T:
    """`new` with a copy of every CUDA tensor that is not carried over from `previous`, where a CUDA graph was
    recorded in this process; `new` itself otherwise (CPU, or no CUDA graph yet). One `torch._foreach_copy_`,
    no host sync."""
    if _TREES not in sys.modules:  # checked first: this runs at every context exit, CPU runs included
        return new
    leaves, spec = tree_flatten(new)
    cuda = next((x for x in leaves if isinstance(x, Tensor) and x.is_cuda), None)
    if cuda is None or not cuda_graphs_recorded(cuda.device):
        return new
    return _copy_made(leaves, spec, previous, new)


def copy_new_tensors(new: T, previous: Any) -> T:
    """`new` with a fresh contiguous copy of every tensor that is not one of `previous`'s (the same object):
    those were copied when they were made and stay as they are."""
    return _copy_made(*tree_flatten(new), previous, new)


def _copy_made(leaves: list[Any], spec: Any, previous: Any, new: T) -> T:
    kept = {id(x) for x in tree_flatten(previous)[0] if isinstance(x, Tensor)}
    made = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and id(x) not in kept]
    if not made:
        return new
    copies = [torch.empty_like(leaves[i], memory_format=torch.contiguous_format) for i in made]
    torch._foreach_copy_(copies, [leaves[i] for i in made])
    for i, copy in zip(made, copies):
        leaves[i] = copy
    return tree_unflatten(leaves, spec)


def cuda_graphs_recorded(device: torch.device) -> bool:
    """Whether cudagraph trees hold a manager for this CUDA device (a graph was warmed up or recorded)."""
    trees = sys.modules.get(_TREES)  # never imported: no CUDA graph in this process
    if trees is None:
        return False
    try:
        return trees.get_manager(device.index or 0, create_if_none_exists=False) is not None
    except (AttributeError, TypeError):  # another torch's internals: copy rather than risk an overwrite
        return True
