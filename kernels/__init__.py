"""fastcache.kernels: the hot tensor ops of the cache engine as torch custom ops (namespace `fastcache`).

Each op has a plain-torch implementation (CPU, and the fallback everywhere), a Triton kernel registered for
CUDA where one pays off, a fake implementation for torch.compile, and a float64 `*_reference` used as the test
oracle. The public functions validate their inputs (metadata only: no graph break, no host sync) and call the
op. Importing this package needs neither triton nor a GPU and changes no global torch, inductor or triton
setting.

- `absmean_rel_diff`, `absmean_sums`, `rel_diff_from_sums`: the First-Block-Cache skip predicate.
  `ratio_or_inf_on_host` and `to_fp32`: its ratio from sums read on the host, in the same float32 arithmetic.
- `frequency_split`, `lowpass`: FasterCache's low/high frequency split, in real space (no complex tensors);
  on CUDA the split runs four matmuls or one fused Triton kernel (`impl=`, `set_frequency_split_impl`).
- `fastercache_uncond`: FasterCache's skip-step reconstruction of the unconditional branch.
- `extrapolate`: FasterCache's attention approximation.
"""

from .absmean import (
    absmean_rel_diff,
    absmean_rel_diff_reference,
    absmean_sums,
    absmean_sums_reference,
    ratio_or_inf_on_host,
    rel_diff_from_sums,
    to_fp32,
)
from .extrapolate import extrapolate, extrapolate_reference
from .fastercache_uncond import fastercache_uncond, fastercache_uncond_reference
from .frequency_split import (
    frequency_split,
    frequency_split_impl,
    frequency_split_reference,
    lowpass,
    lowpass_radius,
    lowpass_reference,
    set_frequency_split_impl,
)

__all__ = [
    "absmean_rel_diff",
    "absmean_rel_diff_reference",
    "absmean_sums",
    "absmean_sums_reference",
    "extrapolate",
    "extrapolate_reference",
    "fastercache_uncond",
    "fastercache_uncond_reference",
    "frequency_split",
    "frequency_split_impl",
    "frequency_split_reference",
    "lowpass",
    "lowpass_radius",
    "lowpass_reference",
    "ratio_or_inf_on_host",
    "rel_diff_from_sums",
    "set_frequency_split_impl",
    "to_fp32",
]
