"""The drop-in's block-range caches: FirstBlockCache, DBCache (Fn/Bn, optionally with TaylorSeer), TeaCache and
SeaCache.

All four cut the model's blocks (in the family's order) the same way: the `front` first blocks always run, the
`back` last blocks always run, and the middle ones either run or are replaced by the residual they produced at the
last computed call (DBCache + TaylorSeer: its Taylor forecast). One decision per call, on the device:
- FirstBlockCache (front 1, back 0): block 0's residual against the last computed call's
  (`first_block_cache.skip_decision`);
- DBCache (front Fn, back Bn): the residual of the front blocks, cache-dit's rule (`db_cache.cache_rule`);
- TeaCache (front 0, back 0): block 0's timestep-modulated input, read from its arguments before it runs
  (`teacache.skip_rule`);
- SeaCache (front 0, back 0): the model's input latents through SEA's spectral filter, read before block 0 runs
  (`sea_cache.gate`; the residual reused or extrapolated, `sea_cache.reuse`).
The rules live in the method files (shared with the engine, but SeaCache's); here they are attached to diffusers'
blocks.

One torch.cond per segment (one per call on Flux, Wan and CogVideoX): every middle block but a segment's last
returns its input streams and records its call, and the segment's last middle block takes one torch.cond that
replays them and itself, or adds the cached residual to the middle's input. Deferring is only right where each
block's output goes straight to the next block; the first call of a context (which computes everything) checks
that, and a model that changes the streams between blocks (a ControlNet adding residuals) keeps one cond per
block instead. Calls a method plans on the host (DBCache's warm-up, TeaCache's last step, SeaCache's retained and
last steps) compute with no cond.

Run eagerly, the decision is read on the host once, right after it is made, and the middle blocks then run or
pass their input through as plain calls (nothing deferred). Under regional compilation (each block compiled on its
own, `compile_repeated_blocks`) the wrappers run that way, eagerly around the blocks' compiled forwards
(`Session.intercept_compiled_blocks`): the graphs hold the blocks alone, with no torch.cond.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fastcache.control import Flag, all_finite, select
from fastcache.diffusers._families import BlockIO, Family, block_io
from fastcache.diffusers._runtime import (
    Session,
    _add,
    _arg,
    _as_output,
    _call,
    _cond,
    _input_streams,
    _positions,
    _same,
    _split_tensors,
    _streams,
    _sub,
    _with_streams,
)
from fastcache.distributed import Reduce, agreed_change, agreed_change_per_sample, agreed_flags, agreed_sums
from fastcache.engine import forced_compute
from fastcache.methods import db_cache, first_block_cache, sea_cache, taylorseer, teacache
from fastcache.methods.db_cache import DBCacheConfig
from fastcache.methods.first_block_cache import FirstBlockCacheConfig
from fastcache.methods.sea_cache import SeaCacheConfig
from fastcache.methods.teacache import TeaCacheConfig

Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


# -- where each block sits -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockRole:
    segment: int
    first: bool  # first block of its segment (records the segment's input)
    middle: bool  # replaced by the cached residual on a skip
    middle_first: bool  # first middle block of its segment (records the middle's input)
    middle_last: bool  # last middle block of its segment: its torch.cond runs the middle or reuses
    decides_before: bool  # TeaCache: the call's decision is made from this block's arguments, before it runs
    decides_after: bool  # FirstBlockCache, DBCache: from the front blocks' residual, once this block ran


def segments_of(model: nn.Module, family: Family) -> list[list[nn.Module]]:
    segments = [[b for name in names for b in (getattr(model, name, None) or ())] for names in family.segments]
    if family.per_block_segments:
        segments = [[b] for blocks in segments for b in blocks]
    return [blocks for blocks in segments if blocks]


def block_roles(model: nn.Module, family: Family, front: int, back: int) -> list[tuple[nn.Module, BlockRole]]:
    """Each block's role when the `front` first and the `back` last blocks always run (front 0: the decision
    is made before block 0)."""
    segments = segments_of(model, family)
    total = sum(len(blocks) for blocks in segments)
    roles, index = [], 0
    for segment, blocks in enumerate(segments):
        middle = [i for i in range(len(blocks)) if front <= index + i < total - back]
        for i, block in enumerate(blocks):
            if block_io(block) is None:
                raise TypeError(f"model: block class {type(block).__name__} of {type(model).__name__} has no "
                                "block entry in fastcache")
            roles.append((block, BlockRole(
                segment, first=i == 0, middle=i in middle, middle_first=bool(middle) and i == middle[0],
                middle_last=bool(middle) and i == middle[-1], decides_before=front == 0 and index + i == 0,
                decides_after=front > 0 and index + i == front - 1)))
        index += len(blocks)
    return roles


def num_blocks(model: nn.Module, family: Family) -> int:
    return sum(len(blocks) for blocks in segments_of(model, family))


# -- the rules, per method ---------------------------------------------------------------------------------------

class Decided(NamedTuple):
    skip: Flag  # skip the middle blocks: a 0-dim bool tensor (decided on the device), a bool read on the host
    # (run eagerly: `decide_on_host`) or False (planned to compute)
    refused: Tensor | None  # small enough to skip, but the cached residuals are not finite (counted)
    fields: dict[str, Tensor]  # the method's own state entries after this call
    operands: tuple  # per-call tensors the middle's branches read (DBCache + TaylorSeer's step offsets)


def _zero(device: torch.device) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def _all_true(flags: tuple[Tensor, ...], device: torch.device) -> Tensor:
    """One 0-dim bool tensor: all `flags` hold (True for none)."""
    if not flags:
        return torch.ones((), dtype=torch.bool, device=device)
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def _plus(counter: Tensor, flag: Flag | None) -> Tensor:
    """`counter + flag`: a flag known on the host adds no device op when it is False (or None)."""
    if flag is None or flag is False:
        return counter
    return counter + 1 if flag is True else counter + flag.long()


class ResidualRule:
    """What the middle keeps: its residual per stream (`(residual,)`, None for a stream the blocks drop)."""

    front, back = 1, 0
    # set by the session under parallelism (`fastcache.distributed`), so every rank decides from the whole
    # sequence and batch: the sum over the context-parallel and the CFG-parallel group
    reduce: Reduce | None = None
    sequence_sum: Reduce | None = None  # over the context-parallel group alone (parts of the sequence)
    batch_sum: Reduce | None = None  # over the CFG-parallel group alone (parts of the batch)

    def keep(self, mids: tuple, old: tuple | None, operands: tuple) -> tuple:
        return tuple(None if m is None else (m,) for m in mids)

    def reuse(self, kept: tuple, streams: tuple, operands: tuple) -> tuple:
        return tuple(None if k is None else k[0] for k in kept)

    def plan(self, calls: int, pipeline: Any, info: dict[str, Any]) -> Any:
        return None  # nothing planned on the host: every call decides on the device

    def fits(self, state: dict, measure: Tensor) -> bool:
        return state["ref"].shape == measure.shape

    def measure(self, block: nn.Module, io: BlockIO, positions: dict[str, int], args: tuple, kwargs: dict,
                session: Session) -> Tensor:
        """What a rule deciding before block 0 (`front = 0`) reads, from its call or the model's."""
        raise NotImplementedError

    def after_call(self, state: dict | None, new: dict, output: Tensor) -> None:
        """Once the model returned (TeaCache's calibration records its output here)."""

    def reset(self) -> None:
        """`reset_cache`: forget what the rule keeps outside the states."""


class FirstBlockCacheRule(ResidualRule):
    def __init__(self, config: FirstBlockCacheConfig, model: nn.Module, family: Family) -> None:
        total = num_blocks(model, family)
        if total < 2:
            raise ValueError(f"model: FirstBlockCache needs at least 2 blocks, {type(model).__name__} has {total}")
        self.config = config

    def first(self, measure: Tensor, count: Tensor, planned: Any) -> Decided:
        return Decided(False, None, dict(ref=measure, ratio=measure.new_full((), float("inf")).float()), ())

    def decide(self, state: dict, measure: Tensor, finite: Tensor, planned: Any) -> Decided:
        # the engine's rule: NaN never counts as small (diffusers would skip on NaN), and cached residuals holding
        # a NaN or Inf are never reused: computed and counted
        ratio, finite = agreed_change(measure, state["ref"], finite, self.reduce)
        ratio, skip, refused = first_block_cache.skip_from_ratio(self.config, ratio, True, finite)
        return Decided(skip, refused, dict(ref=select(skip, state["ref"], measure), ratio=ratio), ())

    def decide_on_host(self, state: dict, measure: Tensor, finite: Tensor) -> Decided:
        """`decide`, run eagerly (no compile, or around blocks compiled on their own), where the decision is read
        on the host anyway: the two sums and the finiteness are read at once and the rule runs on Python values
        (`skip_from_sums_on_host`, the same decision), a dozen device ops fewer per call than the tensor rule."""
        sums, finite = agreed_sums(measure, state["ref"], finite, self.reduce)
        num, den, cached_finite = torch.cat((sums, finite.reshape(1).to(sums.dtype))).tolist()  # one read (sync)
        ratio, skip, refused = first_block_cache.skip_from_sums_on_host(self.config, num, den, bool(cached_finite))
        return Decided(skip, refused, dict(ref=state["ref"] if skip else measure,
                                           ratio=torch.full((), ratio, dtype=sums.dtype, device=sums.device)), ())


class DBCacheRule(ResidualRule):
    def __init__(self, config: DBCacheConfig, model: nn.Module, family: Family) -> None:
        db_cache.check_blocks(config, num_blocks(model, family), type(model).__name__)
        if family.per_block_segments and config.Fn_compute_blocks > 1:
            raise ValueError(f"config.Fn_compute_blocks: {type(model).__name__} interleaves its block lists, so "
                             f"only its first block runs before the others; use Fn_compute_blocks=1, got "
                             f"{config.Fn_compute_blocks}")
        self.config = config
        self.front, self.back = config.Fn_compute_blocks, config.Bn_compute_blocks
        self.warmup = set(config.warmup_steps())

    def plan(self, calls: int, pipeline: Any, info: dict[str, Any]) -> db_cache.DBCacheDecision:
        return db_cache.DBCacheDecision(calls in self.warmup)

    def _operands(self, counters: db_cache.Counters) -> tuple:
        if not self.config.taylorseer_order:
            return ()
        update = db_cache.taylor_decision(self.config, counters, compute=True)
        forecast = db_cache.taylor_decision(self.config, counters, compute=False)
        return (update.grows, update.delta, forecast.coefficients)

    def first(self, measure: Tensor, count: Tensor, planned: Any) -> Decided:
        zero = torch.zeros_like(count)
        counters = db_cache.Counters(count, zero, zero, zero, torch.ones((), dtype=torch.bool, device=count.device),
                                     zero - 1, zero)
        orders, last = db_cache.taylor_counters(self.config, counters, torch.ones_like(counters.factors_finite))
        return Decided(False, None, dict(ref=measure, ratio=measure.new_full((), float("inf")).float(),
                                         num_cached=zero, continuous=zero, orders=orders, last_computed=last),
                       self._operands(counters))

    def decide(self, state: dict, measure: Tensor, finite: Tensor, planned: Any) -> Decided:
        ratio, finite = agreed_change(measure, state["ref"], finite, self.reduce)
        counters = db_cache.Counters(state["count"], state["num_computed"], state["num_cached"], state["continuous"],
                                     finite, state["last_computed"], state["orders"])
        if forced_compute(planned):  # a warm-up step, known on the host: no cond
            skip, refused = False, None
            continuous, num_cached = torch.zeros_like(counters.continuous), counters.num_cached
        else:
            rule = db_cache.cache_rule(self.config, counters, ratio)
            skip, refused, continuous, num_cached = rule
        computed = torch.ones_like(finite) if skip is False else ~skip
        orders, last = db_cache.taylor_counters(self.config, counters, computed)
        return Decided(skip, refused, dict(ref=select(skip, state["ref"], measure), ratio=ratio, num_cached=num_cached,
                                           continuous=continuous, orders=orders, last_computed=last),
                       self._operands(counters))

    def keep(self, mids: tuple, old: tuple | None, operands: tuple) -> tuple:
        if not self.config.taylorseer_order:
            return super().keep(mids, old, operands)
        grows, delta, coefficients = operands
        update = taylorseer.TaylorSeerDecision(True, coefficients, grows, delta)
        if old is None:
            old = tuple(None if m is None else (torch.zeros_like(m),) * (self.config.taylorseer_order + 1)
                        for m in mids)
        return tuple(None if m is None else taylorseer.updated(k, m, update, None) for k, m in zip(old, mids))

    def reuse(self, kept: tuple, streams: tuple, operands: tuple) -> tuple:
        if not self.config.taylorseer_order:
            return super().reuse(kept, streams, operands)
        grows, delta, coefficients = operands
        forecast = taylorseer.TaylorSeerDecision(False, coefficients, grows, delta)
        return tuple(None if k is None else taylorseer.forecast(k, forecast, s.dtype) for k, s in zip(kept, streams))


# block classes whose modulated input the general rule below would misread
TEACACHE_INPUTS = {
    "LTXVideoTransformerBlock": "ltx",  # its norm1 takes no embedding: the modulation is in the block's forward
    "ChromaTransformerBlock": "temb",  # its temb holds pruned modulations for both streams, not norm1's embedding
}


def teacache_input_kind(block: nn.Module) -> str | None:
    """How TeaCache reads `block`'s timestep-modulated input, as its own ports do: "norm1" (the adaLN-Zero
    output `norm1(hidden, temb)[0]`: Flux, HunyuanVideo, Mochi...), "ltx" (`norm1(hidden) * (1 + scale_msa) +
    shift_msa`), or the name of the block's timestep-embedding argument, which TeaCache reads itself where the
    modulation happens inside attention (Wan's projected `temb`, CogVideoX's `temb`). None: no such input."""
    override = TEACACHE_INPUTS.get(type(block).__name__)
    if override is not None:
        return override
    params = list(inspect.signature(type(block).forward).parameters)[1:]
    norm1 = getattr(block, "norm1", None)
    if norm1 is not None and "emb" in inspect.signature(type(norm1).forward).parameters and "temb" in params:
        return "norm1"
    return next((name for name in ("temb", "time_embed") if name in params), None)


def teacache_input(block: nn.Module, kind: str, io: BlockIO, positions: dict[str, int], args: tuple,
                   kwargs: dict) -> Tensor:
    hidden = _arg(positions, io.hidden_arg, args, kwargs)
    temb = _arg(positions, "temb" if kind in ("norm1", "ltx") else kind, args, kwargs)
    if isinstance(temb, (tuple, list)):  # Kandinsky 6 passes (video, audio) embeddings: the video one
        temb = temb[0]
    if not isinstance(temb, Tensor):
        raise RuntimeError(f"TeaCache: {type(block).__name__} was called without its timestep embedding "
                           f"({'temb' if kind in ('norm1', 'ltx') else kind})")
    if kind == "norm1":
        return block.norm1(hidden, emb=temb)[0]
    if kind == "ltx":
        ada = block.scale_shift_table[None, None] + temb.reshape(hidden.size(0), temb.size(1),
                                                                 block.scale_shift_table.shape[0], -1)
        shift, scale = ada[:, :, 0], ada[:, :, 1]
        return block.norm1(hidden) * (1 + scale) + shift
    return temb


class TeaCacheRule(ResidualRule):
    front = 0

    def __init__(self, config: TeaCacheConfig, model: nn.Module, family: Family) -> None:
        first = segments_of(model, family)[0][0]
        self.kind = teacache_input_kind(first)
        if self.kind is None:
            raise ValueError(f"config: TeaCache reads block 0's timestep-modulated input, and fastcache knows none "
                             f"for {type(model).__name__}'s {type(first).__name__}; use FirstBlockCacheConfig or "
                             "DBCacheConfig there")
        self.config = config
        # calibrate=True: every call computes and adds its (input change, output change) per sample here, over
        # every context and pipeline call since enable_cache or reset_cache (`calibrated_coefficients`)
        self.pairs: list[tuple[Tensor, Tensor]] = []

    def plan(self, calls: int, pipeline: Any, info: dict[str, Any]) -> teacache.TeaCacheDecision:
        """The pipeline's last step computes (TeaCache's rule; the first call of a context always does)."""
        if self.config.calibrate:
            return teacache.TeaCacheDecision(True)
        scheduler = getattr(pipeline, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or not hasattr(scheduler, "step_index"):
            return teacache.TeaCacheDecision(False)
        index = scheduler.step_index
        if index is None:
            index = getattr(scheduler, "begin_index", None) or 0
        return teacache.TeaCacheDecision(index == len(timesteps) - 1)

    def fits(self, state: dict, measure: Tensor) -> bool:
        return state["previous"].shape == measure.shape

    def measure(self, block: nn.Module, io: BlockIO, positions: dict[str, int], args: tuple, kwargs: dict,
                session: Session) -> Tensor:
        return teacache_input(block, self.kind, io, positions, args, kwargs)

    def first(self, measure: Tensor, count: Tensor, planned: Any) -> Decided:
        # `rel`: each sample's relative change of the modulated input (inf with no reference), for inspection and
        # calibration
        accumulated = torch.zeros(measure.shape[0], dtype=torch.float32, device=measure.device)
        return Decided(False, None, dict(accumulated=accumulated, previous=measure,
                                         rel=torch.full_like(accumulated, float("inf"))), ())

    def decide(self, state: dict, measure: Tensor, finite: Tensor, planned: Any) -> Decided:
        # the sequence split over ranks: every sample's change summed over them; the batch split (CFG
        # parallelism): each rank keeps its own samples, and the skip is agreed on once the rule ran
        rel, finite = agreed_change_per_sample(measure, state["previous"], finite, self.sequence_sum)
        if forced_compute(planned):
            return Decided(False, None, dict(accumulated=torch.zeros_like(state["accumulated"]), previous=measure,
                                             rel=rel), ())
        batch_sum = self.batch_sum
        everywhere = None if batch_sum is None else (lambda *flags: agreed_flags(flags, batch_sum))
        accumulated, skip, refused = teacache.skip_rule(self.config, state["accumulated"], rel,
                                                        torch.ones_like(finite), finite, everywhere)
        return Decided(skip, refused, dict(accumulated=accumulated, previous=measure, rel=rel), ())

    def after_call(self, state: dict | None, new: dict, output: Tensor) -> None:
        # TeaCache's calibration pairs the change of block 0's modulated input (`rel`, inf on a context's first
        # call) with the change of the model's output, per sample, between consecutive calls of one context
        if not self.config.calibrate:
            return
        output = output.detach()
        new["output"] = output
        if state is not None and "output" in state and state["output"].shape == output.shape:
            self.pairs.append((new["rel"].cpu(), teacache.relative_change(output, state["output"]).cpu()))

    def reset(self) -> None:
        self.pairs.clear()


def wan_t2v_latents(model: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """Wan text-to-video's input latents `(B, C, T, H, W)` as SeaCache's `(B, T, H, W, C)` (diffusers' built-in
    adapter: every sample's latents form the output)."""
    return _arg(_positions(model), "hidden_states", args, kwargs).movedim(1, -1)


def callback_latents(callback: Callable[..., Any]) -> Callable[[nn.Module, tuple, dict], Tensor]:
    """A diffusers `raw_vision_callback` (one `(C, T, H, W)` tensor per sample) as `(B, T, H, W, C)`."""
    def latents(model: nn.Module, args: tuple, kwargs: dict) -> Tensor:
        found = callback(model, args, kwargs)
        if (not isinstance(found, (list, tuple)) or not found or any(not isinstance(x, Tensor) or x.dim() != 4
                                                                      for x in found)):
            raise ValueError("SeaCacheConfig.raw_vision_callback: must return a non-empty list of (C, T, H, W) "
                             f"tensors, got {type(found).__name__}")
        shapes = {tuple(x.shape) for x in found}
        if len(shapes) > 1:
            raise ValueError(f"SeaCacheConfig.raw_vision_callback: fastcache needs latents of one shape, got "
                             f"{sorted(shapes)}")
        return torch.stack([x.movedim(0, -1) for x in found])

    return latents


class SeaCacheRule(ResidualRule):
    """SeaCache (`sea_cache`): decided before block 0 from the model's input latents, skipping every block."""

    front = 0

    def __init__(self, config: SeaCacheConfig, model: nn.Module, family: Family) -> None:
        name = type(model).__name__
        if name == "Cosmos3OmniTransformer":
            raise ValueError("config: diffusers' SeaCache on Cosmos 3 caches its decoder stack up to the final "
                             "norms, which fastcache does not reproduce; use FirstBlockCacheConfig or DBCacheConfig")
        if config.raw_vision_callback is not None:
            self.latents = callback_latents(config.raw_vision_callback)
        elif name == "WanTransformer3DModel" and model.config.in_channels == model.config.out_channels:
            self.latents = wan_t2v_latents
        else:
            raise ValueError(f"config.raw_vision_callback: SeaCache reads the latents of the generated output, and "
                             f"fastcache knows them for Wan text-to-video only (as diffusers); pass "
                             f"raw_vision_callback(model, args, kwargs) for {name}")
        self.config = config
        self.model = weakref.ref(model)

    def plan(self, calls: int, pipeline: Any, info: dict[str, Any]) -> sea_cache.SeaCachePlan:
        model = self.model()
        device = next(model.parameters(), torch.empty(0)).device
        return sea_cache.plan(self.config, info, device)

    def measure(self, block: nn.Module, io: BlockIO, positions: dict[str, int], args: tuple, kwargs: dict,
                session: Session) -> Tensor:
        scratch = session.scratch
        planned = scratch.decision
        if not isinstance(planned, sea_cache.SeaCachePlan):
            raise RuntimeError("SeaCache: call the transformer once per `with transformer.cache_context(name, "
                               "step_index=..., sigma=..., num_inference_steps=...)` (a call outside one, or a second "
                               "call inside one, has no step of its own)")
        return sea_cache.sea_filter(self.latents(session.model, *scratch.model_call), planned.sigma,
                                    self.config.power_exp)

    def fits(self, state: dict, measure: Tensor) -> bool:
        return state["indicator"].shape == measure.shape

    @staticmethod
    def _computes(measure: Tensor, step: Tensor, continues: Tensor) -> Decided:
        """A call that computes with no choice to make (a context's first, a retained or a last step): the
        change's sum and the skips in a row start over; `continues`: the residual history goes on."""
        zero = torch.zeros(1, dtype=torch.float64, device=measure.device)
        return Decided(False, None, dict(indicator=measure, accumulated=zero, last_step=step, distance=zero + math.inf,
                                         consecutive=torch.zeros((), dtype=torch.int64, device=measure.device)),
                       (step, continues))

    def first(self, measure: Tensor, count: Tensor, planned: Any) -> Decided:
        return self._computes(measure, planned.step, torch.zeros((), dtype=torch.bool, device=measure.device))

    def decide(self, state: dict, measure: Tensor, finite: Tensor, planned: Any) -> Decided:
        step = planned.step
        if forced_compute(planned):  # a retained or a last step, known on the host: no cond
            return self._computes(measure, step, step == state["last_step"] + 1)
        change = sea_cache.relative_change(measure, state["indicator"])
        gate = sea_cache.gate(self.config, state["accumulated"], state["consecutive"], state["last_step"], step,
                              change, finite)
        return Decided(gate.skip, gate.refused, dict(indicator=measure, accumulated=gate.accumulated,
                                                     consecutive=gate.consecutive, last_step=step,
                                                     distance=gate.distance), (step, gate.adjacent))

    def keep(self, mids: tuple, old: tuple | None, operands: tuple) -> tuple:
        # the hidden stream's residual (extrapolated at order 1); another stream's output is reused as diffusers
        # reuses it (its residual over an input that does not change between steps)
        step, continues = operands
        return tuple(None if m is None else sea_cache.keep(self.config, m, None if old is None else old[i], step,
                                                           continues) if i == 0 else (m,)
                     for i, m in enumerate(mids))

    def reuse(self, kept: tuple, streams: tuple, operands: tuple) -> tuple:
        step, _ = operands
        return tuple(None if k is None else sea_cache.reuse(self.config, k, step) if i == 0 else k[0]
                     for i, k in enumerate(kept))


RULES = {FirstBlockCacheConfig: FirstBlockCacheRule, DBCacheConfig: DBCacheRule, TeaCacheConfig: TeaCacheRule,
         SeaCacheConfig: SeaCacheRule}


def make_rule(config: Any, model: nn.Module, family: Family) -> ResidualRule:
    return RULES[type(config)](config, model, family)


# -- the decision, once per call ---------------------------------------------------------------------------------

def _decide(session: Session, rule: Any, measure: Tensor) -> None:
    """Run the method's rule and record the call's decision and bookkeeping in the scratch."""
    scratch = session.scratch
    state = before = scratch.state
    if state is not None and not rule.fits(state, measure):
        # the blocks' streams changed length for the same input (QwenImage 2.1's KV cache drops the prefix tokens
        # after the first step): nothing stored fits, so this call computes every block
        state = scratch.state = None
    device = measure.device
    count = _zero(device) if before is None else before["count"]
    if state is None:
        decided = rule.first(measure, count, scratch.decision)
        computed = _zero(device) + 1 if before is None else before["num_computed"] + 1
        nonfinite = _zero(device) if before is None else before["nonfinite"]
    else:
        finite = _all_true(tuple(state["finite"].values()), device)
        if hasattr(rule, "decide_on_host") and not torch.compiler.is_compiling():
            decided = rule.decide_on_host(state, measure, finite)
        else:
            decided = rule.decide(state, measure, finite, scratch.decision)
        skip = decided.skip
        computed = _plus(state["num_computed"], (not skip) if isinstance(skip, bool) else ~skip)
        nonfinite = _plus(state["nonfinite"], decided.refused)
    # run eagerly (no compile, or around blocks compiled on their own), the decision is read on the host here, once:
    # the middle blocks then run or pass their input through as plain calls, with nothing deferred
    eager = isinstance(decided.skip, Tensor) and not torch.compiler.is_compiling()
    scratch.skip, scratch.operands = bool(decided.skip) if eager else decided.skip, decided.operands
    skipped = (decided.skip if isinstance(decided.skip, Tensor)
               else torch.full((), decided.skip, dtype=torch.bool, device=device))
    scratch.new.update(decided.fields, skipped=skipped, num_computed=computed, nonfinite=nonfinite)


# -- the blocks' forwards ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Deferred:
    """A block call postponed until its segment's last middle block, where one torch.cond runs the whole middle
    or reuses its residual: the block's original forward, where its streams go, and its other tensors."""

    original: Callable[..., Any]
    io: BlockIO
    positions: dict[str, int]
    rebuild: Callable[[tuple], tuple]
    tensors: tuple[Tensor, ...]

    def replay(self, streams: tuple, tensors: tuple) -> tuple:
        args, kwargs = _with_streams(self.io, self.positions, *self.rebuild(tensors), streams)
        return _streams(self.io, self.original(*args, **kwargs))


def block_wrapper(session: Session, block: nn.Module, role: BlockRole, rule: Any) -> Wrapper:
    """One block's forward under a block-range cache (see the module's docstring). Where the block is compiled on
    its own (regional compilation), the same rule runs eagerly around its compiled forward instead
    (`Session.intercept_compiled_blocks`): the traced forward is then the block alone."""
    ruled = ruled_forward(session, block, role, rule)
    session.host_sides.append((block, ruled))

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        run = ruled(original)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if session.passthrough:  # traced inside the block's own compiled forward, entered from its rule
                return original(*args, **kwargs)
            return run(*args, **kwargs)

        return forward

    return make


def ruled_forward(session: Session, block: nn.Module, role: BlockRole, rule: Any) -> Wrapper:
    """The block's call under the rule, running the block through `original` (its forward, or its compiled
    forward under regional compilation, where a tensor decision is read on the host by `_cond`)."""
    io = block_io(block)
    positions = _positions(block)
    method = type(session.config).__name__.removesuffix("Config")

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            scratch = session.scratch
            if scratch is None:  # called on its own, outside the transformer's forward: nothing cached
                return original(*args, **kwargs)
            segment = role.segment
            inputs = _input_streams(io, positions, args, kwargs)
            if role.first:
                scratch.segment_inputs[segment] = inputs
            if role.decides_before:
                _decide(session, rule, rule.measure(block, io, positions, args, kwargs, session))
            if not role.middle:
                out = original(*args, **kwargs)
                streams = _streams(io, out)
                if role.decides_after:
                    _decide(session, rule, streams[0] - scratch.segment_inputs[segment][0])
                scratch.passed[segment] = streams
                return out
            state = scratch.state
            if role.middle_first:
                # the middle's residual is taken from what the block before it returned, as diffusers and cache-dit
                # do (a model adding to the stream between blocks, Wan Animate's face adapter, adds to it after)
                start = inputs if role.first else scratch.passed[segment]
                scratch.starts[segment], scratch.deferred[segment] = start, []
            if state is not None and not isinstance(scratch.skip, Tensor):
                # the decision is a bool (read on the host, or planned): each middle block runs, or passes its input
                # through, as a plain call; nothing is deferred, so whether the blocks chain does not matter
                if role.middle_last:
                    return _last_middle(session, rule, original, io, positions, segment, False, (),
                                        lambda _: (args, kwargs))
                return _as_output(io, inputs) if scratch.skip else original(*args, **kwargs)
            chained_here = _same(inputs, scratch.passed[segment]) if not role.first else True
            if not chained_here:
                if state is not None and session.chained:
                    raise RuntimeError(f"{method}: {type(session.model).__name__} changed the hidden states "
                                       "between two blocks after the first call (a ControlNet?); call "
                                       "fastcache.reset_cache before a generation that does")
                session.chained = False  # seen on a first call: keep one cond per block
            defer = state is not None and session.chained
            tensors, rebuild = _split_tensors(args, kwargs)
            if not role.middle_last:
                if defer:
                    scratch.deferred[segment].append(Deferred(original, io, positions, rebuild, tensors))
                    scratch.passed[segment] = inputs
                    return _as_output(io, inputs)
                if state is None:
                    out = original(*args, **kwargs)
                else:
                    out = _cond(scratch.skip, lambda *ts: _as_output(io, _input_streams(io, positions, *rebuild(ts))),
                                lambda *ts: _call(original, rebuild(ts)), tensors)
                scratch.passed[segment] = _streams(io, out)
                return out
            return _last_middle(session, rule, original, io, positions, segment, defer, tensors, rebuild)

        return forward

    return make


def _last_middle(session: Session, rule: Any, original: Callable[..., Any], io: BlockIO, positions: dict[str, int],
                 segment: int, defer: bool, tensors: tuple, rebuild: Callable[[tuple], tuple]) -> Any:
    """The segment's last middle block: run the middle, or add its cached residual to the middle's input."""
    scratch = session.scratch
    state = scratch.state
    start = scratch.starts[segment]
    deferred = tuple(scratch.deferred[segment]) if defer else ()
    old = None if state is None else state["res"][segment]
    old_finite = None if state is None else state["finite"][segment]

    def compute(old: Any, old_finite: Any, start: Any, extra: tuple, *ts: Tensor) -> tuple:
        streams, used = start, 0
        for call in deferred:
            streams = call.replay(streams, ts[used:used + len(call.tensors)])
            used += len(call.tensors)
        own_args, own_kwargs = rebuild(ts[used:])
        if deferred:
            own_args, own_kwargs = _with_streams(io, positions, own_args, own_kwargs, streams)
        out = original(*own_args, **own_kwargs)
        kept = rule.keep(tuple(_sub(o, s) for o, s in zip(_streams(io, out), start)), old, extra)
        return out, kept, all_finite(tuple(k for k in kept if k is not None))

    def reuse(old: Any, old_finite: Any, start: Any, extra: tuple, *ts: Tensor) -> tuple:
        own = ts[sum(len(call.tensors) for call in deferred):]
        streams = _input_streams(io, positions, *rebuild(own))
        mids = rule.reuse(old, streams, extra)
        return _as_output(io, tuple(_add(s, m) for s, m in zip(streams, mids))), old, old_finite

    operands = tuple(t for call in deferred for t in call.tensors) + tensors
    if state is None:
        out, kept, finite = compute(None, None, start, scratch.operands, *operands)
    else:
        out, kept, finite = _cond_streams(scratch.skip, reuse, compute, io, old,
                                          (old, old_finite, start, scratch.operands, *operands))
    scratch.new.setdefault("res", {})[segment] = kept
    scratch.new.setdefault("finite", {})[segment] = finite
    return out


def _cond_streams(pred: Any, reuse: Callable[..., tuple], compute: Callable[..., tuple], io: BlockIO,
                  old: tuple, operands: tuple) -> tuple:
    """`_cond` for a segment's last middle block, whose branches return (block output, what the middle keeps,
    whether that is finite). torch.cond refuses None outputs, and a block may return None for a stream (SD3's last
    block drops the text stream): the branches return the present streams only, and the Nones are put back
    after. The present streams are those with something kept (a stream that is None in the output keeps None)."""
    present = tuple(r is not None for r in old)

    def packed(fn: Callable[..., tuple]) -> Callable[..., tuple]:
        def run(*ops: Any) -> tuple:
            out, kept, finite = fn(*ops)
            return (tuple(x for x, p in zip(_streams(io, out), present) if p),
                    tuple(x for x, p in zip(kept, present) if p), finite)
        return run

    streams, kept, finite = _cond(pred, packed(reuse), packed(compute), operands)
    streams, kept = iter(streams), iter(kept)
    return (_as_output(io, tuple(next(streams) if p else None for p in present)),
            tuple(next(kept) if p else None for p in present), finite)


def install_blocks(session: Session) -> Any:
    """Wrap every block of the model for the session's block-range method; returns the rule."""
    rule = make_rule(session.config, session.model, session.family)
    for block, role in block_roles(session.model, session.family, rule.front, rule.back):
        session.wrap(block, block_wrapper(session, block, role, rule))
    return rule
