#!/usr/bin/env bash
# The GPU check of magloss's fused CUDA engine, in ONE device call (fits the 10-minute limit):
#
#   bash tests/gpu_check.sh
#
# 1. builds the extension in place: TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .
#    (falls back to `setup.py build_ext --inplace`; skipped with GPU_CHECK_SKIP_BUILD=1),
# 2. runs `pytest -m gpu -q` (junit XML) -- tests/test_cuda_parity.py and every other gpu test,
# 3. runs compute-sanitizer --tool memcheck and --tool racecheck on tests/sanitizer_cases.py,
# 4. optionally the benchmark harness (GPU_CHECK_BENCH=ci|quick|full, if benchmarks/ exists),
# 5. writes a JSON record to $OUT/gpu_check.json and benchmarks/results/gpu_check_<date>.json:
#    GPU name, torch and CUDA versions, git commit, the exact command, pass/fail/skip counts,
#    sanitizer error counts, step exit codes and durations.
#
# Env: OUT (default /tmp/magloss_gpu_check), PYTHON (python3), TORCH_CUDA_ARCH_LIST (9.0),
#      GIT_COMMIT (recorded as is when the working copy has no .git), PYTEST_ARGS (extra args),
#      PYTEST_TIMEOUT (360 s), SANITIZER=0 to skip step 3, GPU_CHECK_SKIP_BUILD=1.
# Exit status: 0 when the build, the tests and the sanitizers are all clean.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUTDIR=${OUT:-/tmp/magloss_gpu_check}
mkdir -p "$OUTDIR" benchmarks/results
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
COMMAND="bash tests/gpu_check.sh${*:+ $*}"
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
export PYTHONDONTWRITEBYTECODE=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
T0=$SECONDS

step() { echo; echo "== $*"; }

# ---- 1. build -------------------------------------------------------------------------------------
build_rc=0
build_s=0
if [[ "${GPU_CHECK_SKIP_BUILD:-0}" != "1" ]]; then
  step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  t=$SECONDS
  MAGLOSS_BUILD_CUDA=1 MAGLOSS_NVCC_THREADS=${MAGLOSS_NVCC_THREADS:-4} \
    $PY -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUTDIR/build.log" 2>&1
  build_rc=$?
  if [[ $build_rc -ne 0 ]]; then
    echo "pip install -e failed (rc=$build_rc); trying setup.py build_ext --inplace"
    MAGLOSS_BUILD_CUDA=1 MAGLOSS_NVCC_THREADS=${MAGLOSS_NVCC_THREADS:-4} \
      $PY setup.py build_ext --inplace >>"$OUTDIR/build.log" 2>&1
    build_rc=$?
  fi
  build_s=$((SECONDS - t))
  tail -n 15 "$OUTDIR/build.log"
  echo "build rc=$build_rc (${build_s} s)"
fi
$PY -c "import magloss; print('extension_status:', magloss.extension_status())" 2>&1 | tee "$OUTDIR/extension_status.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null | tee "$OUTDIR/nvidia_smi.txt" || true

# ---- 2. pytest -m gpu -----------------------------------------------------------------------------
step "pytest -m gpu"
t=$SECONDS
# shellcheck disable=SC2086
timeout "${PYTEST_TIMEOUT:-360}" $PY -m pytest -m gpu -q -p no:cacheprovider \
  --junitxml="$OUTDIR/pytest_gpu.xml" ${PYTEST_ARGS:-} tests 2>&1 | tee "$OUTDIR/pytest_gpu.log" | tail -n 40
pytest_rc=${PIPESTATUS[0]}
pytest_s=$((SECONDS - t))
echo "pytest rc=$pytest_rc (${pytest_s} s)"

# ---- 3. compute-sanitizer -------------------------------------------------------------------------
SAN=""
for c in compute-sanitizer "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
  if command -v "$c" >/dev/null 2>&1; then SAN=$(command -v "$c"); break; fi
done
declare -A san_rc san_errors
for tool in memcheck racecheck; do
  san_rc[$tool]=-1
  san_errors[$tool]=-1
  if [[ "${SANITIZER:-1}" == "0" || -z "$SAN" ]]; then continue; fi
  step "compute-sanitizer --tool $tool"
  extra=()
  # racecheck: only our kernels (cuBLAS's are not ours to check, and slow under racecheck).
  # (kns = kernel-name substring; our kernels live in namespace magloss::engine.)
  if [[ $tool == racecheck ]]; then extra=(--kernel-name kns=magloss); fi
  t=$SECONDS
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 "$SAN" --tool "$tool" "${extra[@]}" \
    $PY tests/sanitizer_cases.py >"$OUTDIR/sanitizer_$tool.log" 2>&1
  san_rc[$tool]=$?
  n=$(grep -Eo "ERROR SUMMARY: [0-9]+" "$OUTDIR/sanitizer_$tool.log" | tail -n 1 | grep -Eo "[0-9]+" || true)
  if [[ -z "$n" && ${#extra[@]} -gt 0 ]]; then  # filter syntax not understood by this version: unfiltered
    echo "(re-running $tool without the kernel filter)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 "$SAN" --tool "$tool" \
      $PY tests/sanitizer_cases.py >"$OUTDIR/sanitizer_$tool.log" 2>&1
    san_rc[$tool]=$?
    n=$(grep -Eo "ERROR SUMMARY: [0-9]+" "$OUTDIR/sanitizer_$tool.log" | tail -n 1 | grep -Eo "[0-9]+" || true)
  fi
  san_errors[$tool]=${n:--1}
  tail -n 14 "$OUTDIR/sanitizer_$tool.log"
  echo "$tool rc=${san_rc[$tool]} errors=${san_errors[$tool]} ($((SECONDS - t)) s)"
done
[[ -z "$SAN" ]] && echo "compute-sanitizer not found: sanitizer step skipped"

# ---- 4. benchmark hook ----------------------------------------------------------------------------
bench_rc=-1
if [[ -n "${GPU_CHECK_BENCH:-}" ]]; then
  step "benchmarks (grid ${GPU_CHECK_BENCH})"
  if [[ -f benchmarks/gpu_run.sh ]]; then
    bash benchmarks/gpu_run.sh "$GPU_CHECK_BENCH" "${GPU_CHECK_BENCH_SECONDS:-120}"
    bench_rc=$?
  elif [[ -f benchmarks/run.py ]]; then
    $PY benchmarks/run.py --device cuda --grid "$GPU_CHECK_BENCH" --max-seconds "${GPU_CHECK_BENCH_SECONDS:-120}"
    bench_rc=$?
  else
    echo "no benchmark harness found: skipped"
  fi
fi

# ---- 5. JSON record -------------------------------------------------------------------------------
step "record"
RECORD="benchmarks/results/gpu_check_${STAMP}.json"
GPU_CHECK_OUTDIR="$OUTDIR" GPU_CHECK_RECORD="$RECORD" GPU_CHECK_COMMAND="$COMMAND" GPU_CHECK_STAMP="$STAMP" \
BUILD_RC=$build_rc BUILD_S=$build_s PYTEST_RC=$pytest_rc PYTEST_S=$pytest_s BENCH_RC=$bench_rc \
MEMCHECK_RC=${san_rc[memcheck]} MEMCHECK_ERRORS=${san_errors[memcheck]} \
RACECHECK_RC=${san_rc[racecheck]} RACECHECK_ERRORS=${san_errors[racecheck]} TOTAL_S=$((SECONDS - T0)) \
$PY - <<'PY'
import json, os, subprocess, xml.etree.ElementTree as ET

env = os.environ
out = env["GPU_CHECK_OUTDIR"]
rec = {"date_utc": env["GPU_CHECK_STAMP"], "command": env["GPU_CHECK_COMMAND"]}
try:
    import torch
    rec["torch"] = torch.__version__
    rec["cuda"] = torch.version.cuda
    rec["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    rec["capability"] = list(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None
except Exception as exc:  # still write the record
    rec["torch_error"] = repr(exc)
try:
    import magloss
    rec["extension_status"] = magloss.extension_status()
except Exception as exc:
    rec["extension_status"] = {"error": repr(exc)}
commit = env.get("GIT_COMMIT")
if not commit:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        commit = "unknown (no .git in this copy; pass GIT_COMMIT)"
rec["git_commit"] = commit
counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
failed = []
try:
    root = ET.parse(os.path.join(out, "pytest_gpu.xml")).getroot()
    for case in root.iter("testcase"):
        counts["tests"] += 1
        kinds = {child.tag for child in case}
        name = f"{case.get('classname')}::{case.get('name')}"
        if "failure" in kinds:
            counts["failed"] += 1
            failed.append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            failed.append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
except Exception as exc:
    counts["junit_error"] = repr(exc)
rec["pytest"] = dict(counts, rc=int(env["PYTEST_RC"]), seconds=int(env["PYTEST_S"]), failed_tests=failed[:50])
rec["build"] = {"rc": int(env["BUILD_RC"]), "seconds": int(env["BUILD_S"]),
                "torch_cuda_arch_list": env.get("TORCH_CUDA_ARCH_LIST")}
rec["sanitizer"] = {
    "memcheck": {"rc": int(env["MEMCHECK_RC"]), "errors": int(env["MEMCHECK_ERRORS"])},
    "racecheck": {"rc": int(env["RACECHECK_RC"]), "errors": int(env["RACECHECK_ERRORS"])},
    "note": "-1 = not run; cases: tests/sanitizer_cases.py with PYTORCH_NO_CUDA_MEMORY_CACHING=1",
}
rec["benchmark_rc"] = int(env["BENCH_RC"])
rec["total_seconds"] = int(env["TOTAL_S"])
ok = (rec["build"]["rc"] == 0 and rec["pytest"]["rc"] == 0 and counts["passed"] > 0
      and all(v["rc"] == -1 or (v["rc"] == 0 and v["errors"] == 0)
              for k, v in rec["sanitizer"].items() if k != "note"))
rec["ok"] = bool(ok)
text = json.dumps(rec, indent=2)
for path in (os.path.join(out, "gpu_check.json"), env["GPU_CHECK_RECORD"]):
    with open(path, "w") as f:
        f.write(text + "\n")
print(text)
PY
cp "$RECORD" "$OUTDIR/" 2>/dev/null || true
echo "record: $RECORD (also $OUTDIR/gpu_check.json)"
san_ok=1
for tool in memcheck racecheck; do
  if [[ ${san_rc[$tool]} -ne -1 ]] && [[ ${san_rc[$tool]} -ne 0 || ${san_errors[$tool]} -ne 0 ]]; then san_ok=0; fi
done
if [[ $build_rc -eq 0 && $pytest_rc -eq 0 && $san_ok -eq 1 ]]; then
  echo "GPU CHECK: OK"
  exit 0
fi
echo "GPU CHECK: FAILED (build=$build_rc pytest=$pytest_rc memcheck=${san_errors[memcheck]} racecheck=${san_errors[racecheck]})"
exit 1
