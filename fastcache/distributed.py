"""Caching on torch.distributed: every rank of a sequence-parallel group takes the same decision.

Under context (sequence) parallelism each rank holds a shard of the tokens, so a data-dependent rule measured on
the local shard alone (FirstBlockCache's residual change, TeaCache's modulated-input change, DBCache's) would
decide differently per rank, and the ranks that skip the blocks would skip the collectives inside their
attention while the others wait in them: a hang, or silently desynchronised caches. Here the rules all-reduce the
partial sums of their relative change (`kernels.absmean_sums`: `[sum|a - b|, sum|b|]`, the ratio of sums equals the
ratio of means) together with a count of non-finite cached values, in one small all-reduce per decision, so every
rank computes the same ratio and the same skip, and a rank that sees a NaN makes every rank compute.

The all-reduce is a functional collective (`torch.distributed._functional_collectives`): it traces into a
compiled graph (fullgraph, no break) and needs no host sync. A value every rank holds whole (Wan's timestep
embedding, TeaCache's modulated input there) sums to world size times itself on both sides of the ratio: the same
ratio, so no rule needs to know which of its inputs are sharded.

Planned decisions (PAB, FasterCache, MagCache, TaylorSeer, DBCache's warm-up, TeaCache's first and last step)
depend only on the call count and the timestep, which every rank shares: identical by construction.

CFG parallelism (`enable_cfg_parallel`) splits the batch of a [uncond; cond] call instead: the same sums hold
(FirstBlockCache's and DBCache's ratios are over the whole batch), and TeaCache, which keeps one accumulator per
sample, agrees only on its skip. On a 2-D mesh both groups are summed over, the sequence's first.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from fastcache import kernels
from fastcache.kernels.absmean import ratio_or_inf

Reduce = Callable[[Tensor], Tensor]  # sums a tensor over the ranks of a group (identity on one process)


def sum_over(group: Any) -> Reduce:
    """A functional all-reduce (sum) over `group` (a ProcessGroup or a 1-D DeviceMesh)."""
    import torch.distributed._functional_collectives as funcol

    def reduce(t: Tensor) -> Tensor:
        return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))

    return reduce


def chain(*reduces: Reduce | None) -> Reduce | None:
    """The sum over several groups (the context-parallel one, then the CFG-parallel one), None over none."""
    present = [r for r in reduces if r is not None]
    if not present:
        return None

    def reduce(t: Tensor) -> Tensor:
        for r in present:
            t = r(t)
        return t

    return reduce


def _summed_with_finiteness(values: Tensor, finite: Tensor, reduce: Reduce) -> tuple[Tensor, Tensor]:
    """`values` summed over the group, and whether `finite` holds on every rank: one all-reduce for both."""
    packed = reduce(torch.cat([values, (~finite).float().reshape(1)]))
    return packed[:-1], packed[-1] == 0


def agreed_sums(a: Tensor, b: Tensor, finite: Tensor, reduce: Reduce | None) -> tuple[Tensor, Tensor]:
    """`([sum|a - b|, sum|b|], all cached values finite)` over the whole group, on the device: the local partial
    sums and the local finiteness go through one all-reduce."""
    sums = kernels.absmean_sums(a, b)
    if reduce is None:
        return sums, finite
    return _summed_with_finiteness(sums, finite, reduce)


def agreed_change(a: Tensor, b: Tensor, finite: Tensor, reduce: Reduce | None) -> tuple[Tensor, Tensor]:
    """`(mean|a - b| / mean|b|, all cached values finite)` over the whole group, as 0-dim device tensors."""
    sums, finite = agreed_sums(a, b, finite, reduce)
    return kernels.rel_diff_from_sums(sums), finite


def per_sample_means(current: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample (dim 0), in fp32: `mean|current - previous|` and `mean|previous|`."""
    return ((current.float() - previous.float()).abs().flatten(1).mean(1),
            previous.float().abs().flatten(1).mean(1))


def agreed_change_per_sample(current: Tensor, previous: Tensor, finite: Tensor,
                             reduce: Reduce | None) -> tuple[Tensor, Tensor]:
    """Per sample (dim 0): `mean|current - previous| / mean|previous|` in fp32 over the whole group (`+inf`
    where the reference is all zeros or a mean overflows; NaN stays NaN), and whether every rank's cached values
    are `finite` (TeaCache's measure: `teacache.relative_change` on one process)."""
    num, den = per_sample_means(current, previous)
    if reduce is not None:
        means, finite = _summed_with_finiteness(torch.cat([num, den]), finite, reduce)
        num, den = means.chunk(2)
    return ratio_or_inf(num, den), finite


def agreed_flags(flags: Any, reduce: Reduce) -> Any:
    """A pytree of 0-dim bool flags, each true only where it is true on every rank (one all-reduce for all):
    which cached values every rank may reuse (PAB's and FasterCache's finiteness, on calls decided on the device,
    where one rank refusing a reuse the others take would split their collectives), or whether every sample on
    every rank may skip (TeaCache under CFG parallelism)."""
    leaves, spec = tree_flatten(flags)
    if not leaves:
        return flags
    bad = reduce(torch.stack([(~leaf).float() for leaf in leaves]))
    return tree_unflatten([bad[i] == 0 for i in range(len(leaves))], spec)


def config_fingerprint(config: Any) -> int:
    """A hash of a cache config that is equal on every process for equal configs (callables by qualified name,
    tensors by value): what the ranks all-gather to refuse mixed configs."""
    def canonical(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return (type(value).__qualname__,
                    tuple((f.name, canonical(getattr(value, f.name))) for f in dataclasses.fields(value)))
        if isinstance(value, Tensor):
            return ("tensor", tuple(value.shape), str(value.dtype), tuple(value.detach().cpu().flatten().tolist()))
        if isinstance(value, (tuple, list)):
            return tuple(canonical(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((str(k), canonical(v)) for k, v in value.items()))
        if callable(value):
            return ("callable", getattr(value, "__module__", ""), getattr(value, "__qualname__", type(value).__name__))
        return repr(value)

    digest = hashlib.sha256(repr(canonical(config)).encode()).digest()
    return int.from_bytes(digest[:7], "little")  # fits an int64


def check_same_config(config: Any, group: Any, device: torch.device | str = "cpu") -> None:
    """Raise the same ValueError on every rank of `group` unless all hold an equal config (one all-gather, of
    tensors on `device`: the group's backend must reach it, a CUDA device for NCCL)."""
    import torch.distributed as dist

    mine = torch.tensor([config_fingerprint(config)], dtype=torch.int64, device=device)
    size = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(gathered, mine, group=group)
    values = [int(t) for t in gathered]
    if len(set(values)) > 1:
        groups: dict[int, list[int]] = {}
        for rank, value in enumerate(values):
            groups.setdefault(value, []).append(rank)
        split = "; ".join(f"ranks {ranks}" for ranks in groups.values())
        raise ValueError(f"config: the ranks of a parallel group hold different cache configs ({split}); every "
                         "rank must enable the same config, or their decisions would diverge")


# -- CFG parallelism -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CfgGroup:
    """The ranks that share one batched [uncond; cond] call: each runs an equal part of the batch, rank 0 the
    last (the cond half in diffusers' order), and all-gathers the outputs."""

    group: Any
    rank: int
    size: int

    @property
    def part(self) -> int:
        return self.size - 1 - self.rank

    def check_batch(self, batch: int) -> None:
        if batch % self.size:
            raise ValueError(f"world size: CFG parallelism over {self.size} ranks needs a batch they divide, got a "
                             f"batch of {batch} (a CFG call batches [uncond; cond]: use 2 ranks, or a multiple of "
                             "2 that divides the batch)")

    def gather(self, part: Tensor) -> Tensor:
        """Every rank's part, in batch order (rank 0's part last)."""
        import torch.distributed._functional_collectives as funcol

        gathered = funcol.wait_tensor(funcol.all_gather_single(part.contiguous(), 0, self.group))
        return torch.cat(tuple(reversed(gathered.chunk(self.size))))


def enable_cfg_parallel(model_or_pipeline: Any, group: Any = None) -> None:
    """CFG parallelism for a transformer (or a pipeline's) cached with `fastcache.enable_cache`, whose
    pipelines batch [uncond; cond] in one call: each rank of `group` (default: the whole world) runs its part of
    the batch (rank 0 the cond half) and every rank gets the whole output. Data-dependent decisions sum over the
    group, so every rank decides alike (TeaCache: each rank accumulates its own samples' changes, and a call
    skips only where every sample on every rank may); planned ones are identical by construction. FasterCache
    (2 ranks): on a
    full step rank 0 runs the cond half and rank 1 the uncond half; on a step that skips the uncond half, rank 1
    idles (it joins the output all-gather with nothing computed) and both rebuild it from the cond half."""
    import torch.distributed as dist

    from fastcache.diffusers._api import _session, _targets
    from fastcache.methods.faster_cache import FasterCacheConfig

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("enable_cfg_parallel: torch.distributed is not initialized (init_process_group first)")
    size = dist.get_world_size(group)
    for model in _targets(model_or_pipeline):
        session = _session(model)
        name = type(model).__name__
        if session is None:
            raise ValueError(f"model: enable_cfg_parallel needs fastcache enabled on this {name} first "
                             "(fastcache.enable_cache)")
        if not session.family.cfg_batched:
            raise ValueError(f"model: {name}'s pipelines run CFG as separate cond and uncond calls; CFG parallelism "
                             "splits one batched [uncond; cond] call")
        if isinstance(session.config, FasterCacheConfig):
            if session.config.is_guidance_distilled:
                raise ValueError("config.is_guidance_distilled: a guidance-distilled model has no [uncond; cond] "
                                 "batch to split")
            if size != 2:
                raise ValueError(f"world size: FasterCache's CFG parallelism runs the cond and the uncond half on "
                                 f"2 ranks, got {size}")
        session.cfg = CfgGroup(group if group is not None else dist.group.WORLD, dist.get_rank(group), size)
