#!/usr/bin/env bash
# One call on a lent GPU machine with nothing but this repository: build the extension, run the
# cuda-marked tests, run every benchmark, print a short table LAST. Budget: under 8 minutes in all.
#
#   bash benchmarks/gpu_check.sh            # results under $OUT (the device tool's output folder) or a temp dir
#
# Uses the machine's own python3/torch/triton (nothing is installed). Per-step time limits keep the whole
# run inside the budget even when one step hangs; a failed step is reported and the rest still run.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FASTVL_BUILD_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
CSV="$OUT/results.csv"
status() { printf '%-28s %s\n' "$1" "$2" | tee -a "$OUT/status.txt"; }
start=$(date +%s)

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if timeout 240 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  status build "ok ($(( $(date +%s) - start )) s)"
else
  status build "FAILED (see build.log)"; tail -30 "$OUT/build.log"
fi
"$PY" -m fastvl.info > "$OUT/info.txt" 2>&1; head -4 "$OUT/info.txt"

timeout 180 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/ops tests/models tests/tasks > "$OUT/cuda_tests.log" 2>&1
status "cuda tests (rc $?)" "$(tail -1 "$OUT/cuda_tests.log")"

run_bench() {  # name, time limit, extra args
  local name=$1 limit=$2; shift 2
  [ -f "benchmarks/bench_$name.py" ] || { status "bench_$name" "absent"; return; }
  if timeout "$limit" "$PY" -m "benchmarks.bench_$name" --csv "$CSV" "$@" > "$OUT/bench_$name.log" 2>&1; then
    status "bench_$name" "ok"
  else
    status "bench_$name" "FAILED or timed out (rc $?; see bench_$name.log)"; tail -5 "$OUT/bench_$name.log"
  fi
}
run_bench ot 60
run_bench attention 120
run_bench losses 90
run_bench adv_perturb 40
run_bench e2e_uniter 90 --config base
run_bench villa 90 --reps 15 --warmup 3
run_bench retrieval 120 --amp --budget-s 60
status total "$(( $(date +%s) - start )) s"

echo; echo "== cuda tests"; grep -E "passed|failed|error" "$OUT/cuda_tests.log" | tail -3
echo; echo "== speed-ups over the eager reference (p50 time) and throughput"
[ -f "$CSV" ] && "$PY" - "$CSV" <<'PYEOF'
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
