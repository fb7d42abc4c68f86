"""A block-range cache (FirstBlockCache, DBCache, TeaCache) written directly with forward hooks on a copy of the
uncached model, decided on the host: the reference the drop-in is checked against where no outside oracle runs.

The front blocks run; the call's decision is made before block 0 (`decide_before`, from its arguments: TeaCache)
or after the last front block (`decide_after`, from the front residual of its segment: FirstBlockCache, DBCache).
On a skip every middle block passes its input through and the last middle block of each segment adds the middle's
residual of the last computed call (taken from what the block before the middle returned); the back blocks run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from fastcache.diffusers._families import FAMILIES, block_io
from fastcache.diffusers._runtime import _as_output, _input_streams, _positions, _streams
from fastcache.diffusers._segments import block_roles
from fastcache.diffusers._tiny import TinyCase


def reference_model(tc: TinyCase, front: int, back: int,
                    decide_after: Callable[[torch.Tensor], bool] | None = None,
                    decide_before: Callable[[torch.nn.Module, Any, dict, tuple, dict], bool] | None = None
                    ) -> torch.nn.Module:
    """`decide_after(residual) -> skip` (front > 0) or `decide_before(block, io, positions, args, kwargs) -> skip`
    (front 0): each is called once per model call and keeps whatever history its rule needs."""
    model = copy.deepcopy(tc.model)
    mem: dict = {"skip": False, "res": {}, "starts": {}, "inputs": {}, "passed": {}}
    for block, role in block_roles(model, FAMILIES[type(model).__name__], front, back):
        io, pos, orig = block_io(block), _positions(block), block.forward

        def fwd(*args, _io=io, _pos=pos, _orig=orig, _role=role, _block=block, **kwargs):
            ins = _input_streams(_io, _pos, args, kwargs)
            seg = _role.segment
            if _role.first:
                mem["inputs"][seg] = ins
            if _role.decides_before:
                mem["skip"] = decide_before(_block, _io, _pos, args, kwargs)
            if not _role.middle:
                out = _orig(*args, **kwargs)
                if _role.decides_after:
                    mem["skip"] = decide_after(_streams(_io, out)[0] - mem["inputs"][seg][0])
                mem["passed"][seg] = _streams(_io, out)
                return out
            if _role.middle_first:
                mem["starts"][seg] = ins if _role.first else mem["passed"][seg]
            if mem["skip"]:
                if not _role.middle_last:
                    return _as_output(_io, ins)
                return _as_output(_io, tuple(None if a is None or r is None else a + r
                                             for a, r in zip(ins, mem["res"][seg])))
            out = _orig(*args, **kwargs)
            if _role.middle_last:
                mem["res"][seg] = tuple(None if a is None or b is None else a - b
                                        for a, b in zip(_streams(_io, out), mem["starts"][seg]))
            return out

        block.forward = fwd
    return model


def relative_change(current: torch.Tensor, reference: torch.Tensor | None) -> float:
    """`mean|current - reference| / mean|reference|` on the host (inf with no reference)."""
    if reference is None:
        return float("inf")
    return float((current - reference).abs().mean() / reference.abs().mean())
