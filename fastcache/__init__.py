"""fastcache: a torch.compile-friendly functional cache engine for diffusion transformers.

    method = fastcache.make(fastcache.FirstBlockCacheConfig(threshold=0.1))
    state = method.init(model, inputs)
    plan = method.plan(timesteps)
    for i, t in enumerate(timesteps):
        out, state = method.step(model, state, inputs_at(t), plan[i])
"""

from fastcache.compiled import CompiledStep, compile_step
from fastcache.control import branch
from fastcache.cuda_graphs import out_of_cuda_graph_pool
from fastcache.diffusers import (
    apply_faster_cache,
    apply_first_block_cache,
    apply_pyramid_attention_broadcast,
    cache_context,
    disable_cache,
    enable_cache,
)
from fastcache.engine import CacheMethod, Plan, load_state, make, trace
from fastcache.methods.db_cache import DBCacheConfig, DBCacheDecision, DBCacheState
from fastcache.methods.faster_cache import FasterCacheConfig, FasterCacheDecision, FasterCacheState
from fastcache.methods.first_block_cache import FirstBlockCacheConfig, FirstBlockCacheState
from fastcache.methods.mag_cache import MagCacheConfig, MagCacheDecision, MagCacheState
from fastcache.methods.pyramid_attention_broadcast import (
    PABDecision,
    PABState,
    PyramidAttentionBroadcastConfig,
)
from fastcache.methods.sea_cache import SeaCacheConfig
from fastcache.methods.taylorseer import TaylorSeerCacheConfig, TaylorSeerDecision, TaylorSeerState
from fastcache.methods.teacache import TeaCacheConfig, TeaCacheDecision, TeaCacheState
from fastcache.protocol import AttentionSite, CacheableModel

__version__ = "0.1.0"

__all__ = [
    "AttentionSite",
    "CacheMethod",
    "CacheableModel",
    "CompiledStep",
    "DBCacheConfig",
    "DBCacheDecision",
    "DBCacheState",
    "FasterCacheConfig",
    "FasterCacheDecision",
    "FasterCacheState",
    "FirstBlockCacheConfig",
    "FirstBlockCacheState",
    "MagCacheConfig",
    "MagCacheDecision",
    "MagCacheState",
    "PABDecision",
    "PABState",
    "Plan",
    "PyramidAttentionBroadcastConfig",
    "SeaCacheConfig",
    "TaylorSeerCacheConfig",
    "TaylorSeerDecision",
    "TaylorSeerState",
    "TeaCacheConfig",
    "TeaCacheDecision",
    "TeaCacheState",
    "apply_faster_cache",
    "apply_first_block_cache",
    "apply_pyramid_attention_broadcast",
    "branch",
    "cache_context",
    "compile_step",
    "disable_cache",
    "enable_cache",
    "load_state",
    "make",
    "out_of_cuda_graph_pool",
    "trace",
]
