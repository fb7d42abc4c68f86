#!/usr/bin/env bash
# The whole GPU benchmark in one call on one CUDA machine (no network), in under 8 minutes:
#   setup (carried wheels, the project) -> versions -> bench_kernels.py (kernel GB/s) -> bench_gpu.py.
#
#   OUT_DIR=$OUT bash bench/gpu.sh          # or: bash bench/gpu.sh OUT_DIR
#
# Wheels the machine lacks (diffusers) are carried in .whl/ (gitignored). Environment knobs:
#   TOTAL_S       whole-script budget in seconds (default 450); bench_gpu.py gets what setup and kernels left
#   KERNELS_S     time limit of bench_kernels.py (default 120)
#   KERNEL_NUMEL  elements per tensor in bench_kernels.py (default 67108864)
#   BENCH_ARGS    extra arguments of bench_gpu.py, e.g. "--units wan-large-fbc,wan-large-pab"
# Every stage writes its results as soon as it finishes, so a time-out keeps what finished.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT_DIR:-bench/results}}"
TOTAL_S="${TOTAL_S:-450}"
KERNELS_S="${KERNELS_S:-120}"
KERNEL_NUMEL="${KERNEL_NUMEL:-67108864}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
log() { echo "[gpu.sh +${SECONDS}s] $*"; }

log "setup"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
# fastcache.kernels lives in the top-level kernels/ folder (setuptools package-dir): an editable install maps
# it; if that fails, a copy of the package with kernels/ in place goes on PYTHONPATH.
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || ! python3 -c "import fastcache.kernels" 2> /dev/null; then
  log "editable install failed: copying the package to /tmp/fastcache-src"
  rm -rf /tmp/fastcache-src && mkdir -p /tmp/fastcache-src
  cp -r fastcache /tmp/fastcache-src/ && cp -r kernels /tmp/fastcache-src/fastcache/kernels
  export PYTHONPATH="/tmp/fastcache-src:${PYTHONPATH:-}"
fi

log "versions"
nvidia-smi -L || true
python3 - << 'EOF'
import platform

import torch

print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")
for name in ("triton", "diffusers", "fastcache"):
    try:
        module = __import__(name)
        print(f"{name} {getattr(module, '__version__', '?')} from {module.__file__}")
    except Exception as error:
        print(f"{name}: not importable ({type(error).__name__}: {error})")
EOF

log "bench_kernels.py (limit ${KERNELS_S} s)"
timeout "$KERNELS_S" python3 bench/bench_kernels.py --skip-cpu --numel "$KERNEL_NUMEL" --out "$OUT_DIR" \
  || log "bench_kernels.py exited with status $?"

LEFT=$((TOTAL_S - SECONDS))
if [ "$LEFT" -lt 60 ]; then
  log "only ${LEFT} s left: bench_gpu.py not started"
  exit 0
fi
# the script skips units that would not fit in its budget; the time-out is a backstop (results are written
# after every unit)
log "bench_gpu.py (budget $((LEFT - 30)) s, limit ${LEFT} s)"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
timeout "$LEFT" python3 bench/bench_gpu.py --out "$OUT_DIR" --budget-s "$((LEFT - 30))" ${BENCH_ARGS:-} \
  || { log "bench_gpu.py exited with status $?"; cat "$OUT_DIR/gpu_bench.md" 2> /dev/null || true; }
log "done; files in $OUT_DIR:"
ls -l "$OUT_DIR"
