#!/usr/bin/env bash
# CUDA-graph probes on the GPU machine, each case in its own process so that one failure cannot leave
# cudagraph trees' state broken for the next (the full bench runs every provider in one process):
#
#   OUT_DIR=$OUT bash bench/gpu_probe.sh            # every case in PROBES, tracebacks in probe_log.txt
#   PROBES="engine-ro|PAB spatial N=2" OUT_DIR=$OUT bash bench/gpu_probe.sh
#
# A case is "unit|engine settings (;-separated)|providers|more arguments": bench_gpu.py --units UNIT
# --settings ... --providers ... --verbose, 10 steps, 1 warm-up and 2 timed rounds, at most CASE_S seconds (default 150:
# a drop-in provider compiles in 15-35 s on an H100 host, and the unit first counts conds in 15 s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT_DIR:-/tmp/probe-out}}"
CASE_S="${CASE_S:-150}"
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/probe_log.txt") 2>&1
# shellcheck source=bench/_gpu_setup.sh
source bench/_gpu_setup.sh
DEFAULT_PROBES="engine-ro|uncached;PAB spatial N=2||
engine-ro|FBC threshold 0.2, split step||
engine-ro|FasterCache uncond N=2, wide ranges||
flux-small-pab||uncached-reduce-overhead,fastcache-reduce-overhead|
flux-small-mag||fastcache-reduce-overhead|"
i=0
while IFS='|' read -r unit settings providers more; do
  [ -z "$unit" ] && continue
  i=$((i + 1))
  log "case $i: unit=$unit settings=$settings providers=$providers $more"
  args=(--units "$unit" --verbose --steps 10 --warmup 1 --repeats 2 --budget-s 1000 --out "/tmp/probe/$i")
  [ -n "$settings" ] && args+=(--settings "$settings")
  [ -n "$providers" ] && args+=(--providers "$providers")
  # shellcheck disable=SC2206  # more: a list of arguments
  [ -n "$more" ] && args+=($more)
  timeout "$CASE_S" python3 bench/bench_gpu.py "${args[@]}" > "/tmp/probe_$i.txt" 2>&1
  status=$?
  # the table and every traceback; the full output of a case that failed
  grep -v '^There are modules' "/tmp/probe_$i.txt" | tail -c 12000
  log "case $i: exit $status"
  if [ -f "/tmp/probe/$i/gpu_bench.md" ]; then
    { echo "## case $i: $unit | $settings | $providers (exit $status)"; cat "/tmp/probe/$i/gpu_bench.md"; echo; } \
      >> "$OUT_DIR/probe_results.md"
  fi
done <<< "${PROBES:-$DEFAULT_PROBES}"
log "done"
