"""What every cache method shares: the method record, plans, and a shape/FLOP trace of a model.

A method is built from its config (optax style): `method = fastcache.make(config)` returns pure functions

    state = method.init(model, inputs)                  # a pytree of tensors, shapes fixed by `inputs`
    plan = method.plan(timesteps)                       # per-step decisions, printable (device=: weights' device)
    out, state = method.step(model, state, inputs, plan[i])   # or decision=None: decided on the device
    method.computed_fraction(model, inputs, plan, state)      # share of the model's FLOPs actually run

Nothing is kept anywhere but in the returned state, so two generations can interleave on one model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode

from fastcache.protocol import CacheableModel, Inputs, check_model


@dataclass(frozen=True)
class Plan(Sequence):
    """Per-step decisions planned from the timesteps, and one printable row per decision kind.

    Rows use diffusers' letters: C computed, R reused, A approximated, F full CFG batch, S unconditional
    half skipped, ? decided on the device from data (FirstBlockCache).
    """

    decisions: tuple[Any, ...]
    rows: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        return self.decisions[index]

    def __len__(self) -> int:
        return len(self.decisions)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.decisions)

    def __str__(self) -> str:
        return "\n".join(f"{label}: {row}" for label, row in self.rows.items())

    def variants(self) -> int:
        """How many distinct step variants a compiled step specialises on (one graph each)."""
        return len({_hashable(d) for d in self.decisions})


def _hashable(decision: Any) -> Any:
    # Tensors in a planned decision (weights) do not change the graph: only the Python values do.
    if isinstance(decision, tuple):
        return tuple(_hashable(x) for x in decision)
    return None if isinstance(decision, Tensor) else decision


class CacheMethod(NamedTuple):
    config: Any
    init: Callable[..., Any]  # (model, inputs, plan=None for PAB and FasterCache)
    plan: Callable[..., Plan]  # (timesteps, device=None)
    step: Callable[..., tuple[Tensor, Any]]
    computed_fraction: Callable[[CacheableModel, Inputs, Plan, Any], float]
    state_bytes: Callable[..., int]  # (model, inputs, plan=None)


class AttentionSchedule:
    """Accessors shared by the configs whose fields are named `<kind>_attention_block_skip_range` and
    `<kind>_attention_timestep_skip_range` (PAB, FasterCache); `KINDS` lists the kinds a config has."""

    KINDS: tuple[str, ...] = ()

    def skip_range(self, kind: str) -> int | None:
        return getattr(self, f"{kind}_attention_block_skip_range")

    def timestep_range(self, kind: str) -> tuple[float, float]:
        return getattr(self, f"{kind}_attention_timestep_skip_range")

    def enabled_kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind in self.KINDS if self.skip_range(kind) is not None)

    def hooked_sites(self, model: CacheableModel) -> dict[str, str]:
        """Site name -> kind, for the model's attention sites of an enabled kind."""
        enabled = self.enabled_kinds()
        return {site.name: site.kind for site in model.cache_sites() if site.kind in enabled}


def _methods() -> dict[type, tuple[Any, type]]:
    """Config class -> (method module, state class); imported late: the methods import this module."""
    from fastcache.methods import (
        db_cache,
        faster_cache,
        first_block_cache,
        mag_cache,
        pyramid_attention_broadcast,
        taylorseer,
        teacache,
    )

    return {
        pyramid_attention_broadcast.PyramidAttentionBroadcastConfig: (pyramid_attention_broadcast,
                                                                      pyramid_attention_broadcast.PABState),
        faster_cache.FasterCacheConfig: (faster_cache, faster_cache.FasterCacheState),
        first_block_cache.FirstBlockCacheConfig: (first_block_cache, first_block_cache.FirstBlockCacheState),
        mag_cache.MagCacheConfig: (mag_cache, mag_cache.MagCacheState),
        taylorseer.TaylorSeerCacheConfig: (taylorseer, taylorseer.TaylorSeerState),
        teacache.TeaCacheConfig: (teacache, teacache.TeaCacheState),
        db_cache.DBCacheConfig: (db_cache, db_cache.DBCacheState),
    }


def make(config: Any) -> CacheMethod:
    """Build the cache method described by `config` (one of fastcache's config classes)."""
    methods = _methods()
    from fastcache.methods.sea_cache import SeaCacheConfig

    if isinstance(config, SeaCacheConfig):
        raise TypeError("config: SeaCache runs in the diffusers drop-in only (fastcache.enable_cache(pipe, config)): "
                        "its indicator reads a pipeline's latents and sigma, which the engine's models do not expose")
    if type(config) not in methods:
        names = ", ".join(cls.__name__ for cls in methods)
        raise TypeError(f"config: expected one of {names}, got {type(config).__name__}")
    module = methods[type(config)][0]
    return CacheMethod(config, *(partial(getattr(module, name), config)
                                 for name in ("init", "plan", "step", "computed_fraction")),
                       partial(state_bytes, module.init, config))


def state_bytes(init: Callable[..., Any], config: Any, model: CacheableModel, inputs: Inputs,
                plan: Plan | None = None) -> int:
    """The bytes a state made by `init(config, model, inputs[, plan])` holds, counted without allocating it (init
    runs on fake tensors). A model built on the meta device works too, so a full-size model can be sized on
    any machine."""
    extra = () if plan is None else (plan,)
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        state = init(config, model, inputs, *extra)
    torch.clear_autocast_cache()
    return sum(x.numel() * x.element_size() for x in tree_leaves(state) if isinstance(x, Tensor))


def load_state(f: Any) -> Any:
    """`torch.load(f, weights_only=True)` of a saved state (`torch.save(state, f)`): the state classes are
    allowed for that one load only (no global change to torch's safe list)."""
    with torch.serialization.safe_globals([state for _, state in _methods().values()]):
        return torch.load(f, weights_only=True)


def as_timesteps(timesteps: Tensor | Sequence[float]) -> Tensor:
    """The timesteps as a 1-D fp32 CPU tensor: rounded to the dtype they come in (a bf16 schedule keeps its
    bf16 values), then compared in fp32 by every rule, as the same rules do on the device (`in_open_range`):
    one rounding rule, so planned and on-device decisions agree."""
    t = torch.as_tensor(timesteps).detach().cpu().reshape(-1).float()
    if t.numel() == 0:
        raise ValueError("timesteps: must hold at least one timestep")
    if not torch.isfinite(t).all():
        raise ValueError(f"timesteps: must be finite, got {t.tolist()}")
    return t


def letters(flags: Tensor, true: str, false: str) -> str:
    return "".join(true if f else false for f in flags.tolist())


# -- shapes and FLOPs of one forward, without running it ------------------------------------------------

@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def zeros(self) -> Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


@dataclass(frozen=True)
class ModelTrace:
    """What one forward produces and costs, read from a shape-only (fake tensor) run."""

    site_outputs: dict[str, Any]  # site name -> TensorMeta, or a tuple of them for tuple-valued attention
    site_flops: dict[str, int]
    head_streams: tuple[TensorMeta, ...]  # the streams after the first block
    output: TensorMeta
    embed_flops: int
    block_flops: tuple[int, ...]
    head_flops: int

    @property
    def total_flops(self) -> int:
        return self.embed_flops + sum(self.block_flops) + self.head_flops


def _meta(x: Tensor, device: torch.device) -> TensorMeta:
    return TensorMeta(tuple(x.shape), x.dtype, device)


def trace(model: CacheableModel, inputs: Inputs) -> ModelTrace:
    """Run the protocol forward on fake tensors: output shapes and FLOPs, no compute, no memory."""
    check_model(model)
    device = next(iter(inputs.values())).device
    site_outputs: dict[str, Any] = {}
    site_flops: dict[str, int] = {}

    def attend(site: str, fn: Callable[..., Any], *args: Any) -> Any:
        with FlopCounterMode(display=False) as counter:
            out = fn(*args)
        site_outputs[site] = tree_map(lambda x: _meta(x, device), out)
        site_flops[site] = site_flops.get(site, 0) + counter.get_total_flops()
        return out

    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {name: mode.from_tensor(value) for name, value in inputs.items()}
        with FlopCounterMode(display=False) as counter:
            streams, aux = model.embed(fake)
        embed_flops = counter.get_total_flops()
        block_flops, head_streams = [], ()
        for index in range(model.num_blocks):
            with FlopCounterMode(display=False) as counter:
                streams = model.block(index, streams, aux, attend)
            block_flops.append(counter.get_total_flops())
            if index == 0:
                head_streams = tuple(_meta(s, device) for s in streams)
        with FlopCounterMode(display=False) as counter:
            out = model.head(streams, aux)
        head_flops = counter.get_total_flops()
    # Under torch.autocast the casts of the weights made on fake tensors went into autocast's weight cache,
    # and the model's next real forward would read them back (it returned a FakeTensor): drop them.
    torch.clear_autocast_cache()
    return ModelTrace(site_outputs, site_flops, head_streams, _meta(out, device), embed_flops,
                      tuple(block_flops), head_flops)


def counted_fraction(model: CacheableModel, inputs: Inputs, state: Any, skipped_blocks: slice) -> float:
    """Share of the model's FLOPs run by a method that skips the blocks `skipped_blocks` on the calls its state did
    not count as computed (`state.count` calls, `state.num_computed` of them computed; one host read, after the
    loop)."""
    tr = trace(model, inputs)
    calls, computed = int(state.count), int(state.num_computed)
    if calls == 0:
        return 1.0
    return 1.0 - (calls - computed) * sum(tr.block_flops[skipped_blocks]) / (calls * tr.total_flops)


def check_optional_decision(decision: Any, expected: type, method: str) -> None:
    """Refuse a foreign decision for a method that takes a planned one or None (decide on the device)."""
    if decision is not None and not isinstance(decision, expected):
        raise TypeError(f"decision: {method} takes plan[i] (a {expected.__name__}) or None, got {decision!r}")


def forced_compute(decision: Any) -> bool:
    """Whether a planned decision computes with no data-dependent choice to make (TeaCache's first and last
    steps, DBCache's warm-up): the step then takes no branch on the device and no host read."""
    return getattr(decision, "force_compute", False)


def check_planned_decision(decision: Any, expected: type, method: str) -> None:
    """Refuse a missing or foreign decision for a method that is always planned (its rules read no data)."""
    if not isinstance(decision, expected):
        raise TypeError(f"decision: {method} is planned; pass plan[i] (a {expected.__name__}), got {decision!r}")


def check_planned_reuse(count: Tensor, reuses: bool, method: str) -> None:
    """Refuse, in eager mode, a planned decision that reuses a cache no call of this state has filled yet (it
    holds init's zeros): plan entries are meant for the step index they were planned for. One host read of
    the count, so compiled steps skip the check (they trust the plan)."""
    if reuses and not torch.compiler.is_compiling() and int(count) == 0:
        raise ValueError(f"decision: {method}'s planned decision reuses cached values, but this state has not "
                         "computed any yet (its first call); pass plan[0] for the first call of a state, or "
                         "decision=None")


def zeros_like_meta(meta: Any) -> Any:
    return tree_map(lambda m: m.zeros(), meta, is_leaf=lambda m: isinstance(m, TensorMeta))


def batch_halves(inputs: Inputs) -> tuple[int, dict[str, Tensor]]:
    """The conditional half of a batched [uncond; cond] input dict (every tensor with the batch dim)."""
    batch = next(iter(inputs.values())).shape[0]
    if batch % 2:
        raise ValueError(f"inputs: a batched [uncond; cond] input needs an even batch, got {batch}")
    return batch, {name: value[batch // 2:] if value.dim() and value.shape[0] == batch else value
                   for name, value in inputs.items()}
