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
#   UNITS         bench_gpu.py units, comma-separated, each run in its own process (default: its DEFAULT_UNITS);
#                 a unit may name its providers after @, joined by +: flux-small-pab@uncached-compiled+fastcache-compiled
#   BENCH_ARGS    extra arguments of bench_gpu.py, e.g. "--providers uncached-compiled,fastcache-compiled"
# Every stage writes its results as soon as it finishes, so a time-out keeps what finished.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT_DIR:-bench/results}}"
TOTAL_S="${TOTAL_S:-450}"
KERNELS_S="${KERNELS_S:-120}"
KERNEL_NUMEL="${KERNEL_NUMEL:-67108864}"
mkdir -p "$OUT_DIR"
# shellcheck source=bench/_gpu_setup.sh
source bench/_gpu_setup.sh
UNITS="${UNITS:-$(cd bench && python3 -c 'from bench_gpu import DEFAULT_UNITS; print(DEFAULT_UNITS)')}"

log "bench_kernels.py (limit ${KERNELS_S} s)"
timeout "$KERNELS_S" python3 bench/bench_kernels.py --skip-cpu --numel "$KERNEL_NUMEL" --out "$OUT_DIR" \
  || log "bench_kernels.py exited with status $?"

# one process per unit: a failure inside CUDA graph trees cannot break the units after it; each appends its rows
rm -f "$OUT_DIR/gpu_bench.json" "$OUT_DIR/gpu_bench.md"
for unit in ${UNITS//,/ }; do
  LEFT=$((TOTAL_S - SECONDS))
  if [ "$LEFT" -lt 45 ]; then
    log "only ${LEFT} s left: $unit not started"
    continue
  fi
  providers=()
  if [[ "$unit" == *@* ]]; then
    providers=(--providers "${unit#*@}")
    providers[1]="${providers[1]//+/,}"
    unit="${unit%%@*}"
  fi
  log "bench_gpu.py --units $unit ${providers[*]} (budget $((LEFT - 10)) s, limit ${LEFT} s)"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  timeout "$LEFT" python3 bench/bench_gpu.py --out "$OUT_DIR" --append --verbose --units "$unit" "${providers[@]}" \
    --budget-s "$((LEFT - 10))" ${BENCH_ARGS:-} || log "bench_gpu.py --units $unit exited with status $?"
done
cat "$OUT_DIR/gpu_bench.md" 2> /dev/null || true
log "done; files in $OUT_DIR:"
ls -l "$OUT_DIR"
