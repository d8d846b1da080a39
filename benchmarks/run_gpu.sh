#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the whole test suite on CUDA, run every benchmark, and
# write the tables. Meant for `device run` (10-minute limit): `bash benchmarks/run_gpu.sh`.
# Output goes to $OUT when set (the device tool's folder), else benchmarks/results/gpu-run/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu-run}"
mkdir -p "$out"
log="$out/run_gpu.log"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
status=0

step() {
  echo "=== $* ===" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== exit $rc ===" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}

step nvidia-smi
step python3 -c "import torch, sys; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0)); sys.exit(0 if torch.cuda.is_available() else 1)"
# Build against the torch already installed there (no isolated build: it would fetch a second torch).
step python3 -m pip install --no-build-isolation --no-deps -e . -q
step python3 -c "import agm_fast, json; print(json.dumps(agm_fast.backend_info(), indent=1))"
step python3 -m pytest -q -p no:cacheprovider -rs tests
# Every benchmark prints its machine line and tables; they are collected in one file (the device tool returns at
# most 8 files). The result files go to the repository's results folder and their JSON lines are gathered below.
results=benchmarks/results
for b in bench_shapley bench_ogm_scores bench_ogm_ge bench_agm_step bench_cggm_step; do
  echo "=== $b ===" >>"$out/tables.md"
  python3 -m "agm_fast.benchmarks.$b" --device cuda --out "$results" 2>&1 | tee -a "$out/tables.md" "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
cat "$results"/*.jsonl >"$out/results.jsonl" 2>/dev/null || true
echo "tables and logs in $out"
exit $status
