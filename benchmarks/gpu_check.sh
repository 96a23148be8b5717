#!/usr/bin/env bash
# One call on a lent GPU machine (one H100 / H200) with nothing but this repository: build the extension, run the
# WHOLE test suite on the GPU, then the benchmarks, and print a short table LAST. Budget: 540 s (9 minutes) in all,
# build included.
#
#   bash benchmarks/gpu_check.sh            # logs under $OUT (the device tool's output folder) or a temp dir
#
# Uses the machine's own python3/torch/triton (nothing is installed). Every step has an explicit time limit, and each
# limit is also capped by what is left of the total budget, so the whole run ends inside BUDGET even when a step
# hangs; a failed or timed-out step is reported and the rest still run. Figures: the benchmarks append to
# $OUT/results/<device>.csv (the harness's columns), which is also copied to benchmarks/results/ in the checkout
# (commit the copy fetched back from $OUT/results/).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-540}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FASTVL_BUILD_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
mkdir -p "$OUT/results"
start=$(date +%s)

# name:seconds. The limits add up to BUDGET minus a 20 s margin for nvidia-smi (5), fastvl.info (10), the summary (5).
STEPS=(build:140 tests:215 bench_ot:15 bench_attention:30 bench_losses:20 bench_adv_perturb:15 bench_e2e_uniter:20
       bench_villa:20 bench_e2e_hero:25 bench_bachgan:20)
total=0; for s in "${STEPS[@]}"; do total=$(( total + ${s#*:} )); done
echo "== gpu_check: ${#STEPS[@]} steps, limits sum to ${total} s of a ${BUDGET} s budget (20 s kept for the rest)"
for s in "${STEPS[@]}"; do printf '   %-20s %4s s\n' "${s%%:*}" "${s#*:}"; done
limit_of() { for s in "${STEPS[@]}"; do [ "${s%%:*}" = "$1" ] && echo "${s#*:}"; done; }
status() { printf '%-28s %s\n' "$1" "$2" | tee -a "$OUT/status.txt"; }
# run_step NAME LOG CMD...: the step's own limit, capped by the time left (minus the 20 s margin).
run_step() {
  local name=$1 log=$2; shift 2
  local limit left t0 rc
  limit=$(limit_of "$name"); left=$(( BUDGET - 20 - ($(date +%s) - start) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 0 ]; then status "$name" "SKIPPED (budget spent)"; return 1; fi
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$log" 2>&1; rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then status "$name" "ok (${took}/${limit} s)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status "$name" "TIMED OUT at ${limit} s (see $log)"
  else status "$name" "FAILED rc $rc (${took}/${limit} s; see $log)"; fi
  return $rc
}

timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
run_step build build.log "$PY" setup.py build_ext --inplace || tail -30 "$OUT/build.log"
timeout 10 "$PY" -m fastvl.info > "$OUT/info.txt" 2>&1; head -4 "$OUT/info.txt"

# The whole suite on the GPU (Triton compiled for real, CUDA kernels, cuda-marked tests), stopping after 10 failures.
run_step tests tests.log "$PY" -m pytest -q -p no:cacheprovider --maxfail=10 --durations=15 -rfEs
status "tests summary" "$(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -1)"

# The benchmarks, with few repetitions (the harness times with CUDA events after warm-up, L2 flushed per call).
CSV="$OUT/results/$( (timeout 5 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo gpu) | head -1 | tr ' /' '__').csv"
bench() {  # name, extra args
  local name=$1; shift
  [ -f "benchmarks/$name.py" ] || { status "$name" "absent"; return; }
  run_step "$name" "$name.log" "$PY" -m "benchmarks.$name" --csv "$CSV" "$@" || tail -5 "$OUT/$name.log" 2>/dev/null
}
bench bench_ot --quick --reps 10 --warmup 3
bench bench_attention --quick --reps 10 --warmup 3
bench bench_losses --quick --reps 10 --warmup 3
bench bench_adv_perturb --quick --reps 10 --warmup 3
bench bench_e2e_uniter --config base --reps 5 --warmup 2
bench bench_villa --reps 5 --warmup 2
bench bench_e2e_hero --quick --videos 16 --reps 3 --warmup 1
bench bench_bachgan --quick --reps 5 --warmup 2 --no-peak
[ -f "$CSV" ] && cp "$CSV" benchmarks/results/ 2>/dev/null
status total "$(( $(date +%s) - start )) s of ${BUDGET} s"

echo; echo "== tests"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
echo; echo "== speed-ups over the eager reference (p50 time) and throughput ($CSV)"
[ -f "$CSV" ] && timeout 5 "$PY" - "$CSV" <<'PYEOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
t = {}
for r in rows:
    if r["metric"] == "time":
        t[(r["op"], r["mode"], r["config"], r["x_value"], r["provider"])] = float(r["p50"])
for (op, mode, cfg, x, prov), v in sorted(t.items()):
    ref = t.get((op, mode, cfg, x, "reference"))
    if prov != "reference" and ref:
        print(f"{op:>10} {mode:>4} x={x:<6} {prov:<26} {v:8.3f} ms  {ref / v:6.2f}x  {cfg[:60]}")
for r in rows:
    if r["metric"] == "throughput":
        print(f"{r['op']:>10} {r['mode']:>4} x={r['x_value']:<6} {r['provider']:<26} {float(r['p50']):8.1f} TFLOP/s")
PYEOF
cat "$OUT/status.txt"
