"""fastcache as a drop-in for diffusers' cache hooks (PAB, FasterCache, FirstBlockCache, MagCache, TaylorSeer),
torch.compile-safe, plus two methods diffusers lacks: DBCache (cache-dit's, optionally with TaylorSeer) and TeaCache.

    from fastcache.diffusers import enable_cache, FirstBlockCacheConfig   # was: from diffusers import ...
    enable_cache(pipe, FirstBlockCacheConfig(threshold=0.1))            # or pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
    image = pipe(...)                                                    # the pipeline, unmodified

diffusers is imported lazily (only when a diffusers model is cached), so `import fastcache` never needs it.
"""

from fastcache.diffusers._api import (
    apply_faster_cache,
    apply_first_block_cache,
    apply_pyramid_attention_broadcast,
    cache_context,
    cache_state,
    calibrated_coefficients,
    calibrated_ratios,
    decided_on,
    disable_cache,
    enable_cache,
    reset_cache,
    to_fastcache_config,
)
from fastcache.diffusers._families import FAMILIES
from fastcache.methods.db_cache import DBCacheConfig
from fastcache.methods.faster_cache import FasterCacheConfig
from fastcache.methods.first_block_cache import FirstBlockCacheConfig
from fastcache.methods.mag_cache import MagCacheConfig
from fastcache.methods.pyramid_attention_broadcast import PyramidAttentionBroadcastConfig
from fastcache.methods.sea_cache import SeaCacheConfig
from fastcache.methods.taylorseer import TaylorSeerCacheConfig
from fastcache.methods.teacache import TeaCacheConfig

SUPPORTED_MODELS: tuple[str, ...] = tuple(sorted(FAMILIES))

__all__ = [
    "DBCacheConfig",
    "FasterCacheConfig",
    "FirstBlockCacheConfig",
    "MagCacheConfig",
    "PyramidAttentionBroadcastConfig",
    "SUPPORTED_MODELS",
    "SeaCacheConfig",
    "TaylorSeerCacheConfig",
    "TeaCacheConfig",
    "apply_faster_cache",
    "apply_first_block_cache",
    "apply_pyramid_attention_broadcast",
    "cache_context",
    "cache_state",
    "calibrated_coefficients",
    "calibrated_ratios",
    "decided_on",
    "disable_cache",
    "enable_cache",
    "reset_cache",
    "to_fastcache_config",
]
