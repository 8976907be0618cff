#!/usr/bin/env bash
# The GPU check of magloss's fused CUDA engine, in ONE device call of at most 8 minutes:
#
#   GIT_COMMIT=<sha> bash tests/gpu_check.sh
#
# Steps, each under its own deadline; the deadlines add up to 450 s (see CAPS below), and
# time a step leaves unused passes to the next one:
#   versions   GPU, driver, torch, CUDA, nvcc, compute-sanitizer, Python (25 s)
#   extension  the prebuilt magloss._C from .prebuilt/<key>/ if one was carried for this csrc/,
#              torch and arch, else a build (tools/prebuild_ext.py install); then import it (150 s)
#   pytest     both engine paths: pytest -m gpu on every test file that uses the gpu mark with
#              MAGLOSS_PATH=flat (the flat and the kept ops are called directly by their suites), then
#              with MAGLOSS_PATH=speed the tests that reach the ops through the losses' path policy
#              (PATH_TESTS below) (110 s)
#   memcheck   compute-sanitizer --tool memcheck python tests/sanitizer_cases.py (50 s)
#   racecheck  the same with --tool racecheck, our kernels only (50 s)
#   bench      benchmarks/run.py: fused (magloss) on the speed path, eager and the bare products
#              (floor), fp32 and bf16, B=512, C=85,742, D=512, every loss, fwd/bwd/full; then the
#              fused provider again on the flat path (its figures: provider "magloss[flat]" in the
#              record) (65 s)
#
# As soon as a step ends, a line is appended to $OUT/summary.txt and the JSON record
# $OUT/gpu_check.json is rewritten (GPU, driver, torch, CUDA, commit, command, each step's
# status, seconds and deadline, test counts and failures, sanitizer error counts and cases run,
# every benchmark figure), so a call cut short still returns what finished. A sanitizer run is
# clean only if every case of tests/sanitizer_cases.py printed its "passed" line and the error
# summary says 0. Without a GPU (a dry run) the steps that need one are recorded as skipped with
# the reason and the record is still written; the pytest step then runs tests/test_device_backend.py
# (the GPU-only methods of the device objects, against this torch's torch.cuda API, with fakes) through
# the same two-path function, and the bench step the same two runs on the CPU at a tiny shape with the
# eager and floor providers (floor again on the flat path), so that the harness, the record and the
# step judges run here too.
#
# $OUT receives exactly these 8 files (the device tool returns at most 8): gpu_check.json,
# summary.txt, extension.log, pytest.log, memcheck.log, racecheck.log, bench.json, bench.log.
#
# Env: OUT (default /tmp/magloss_gpu_check), PYTHON (python3), GIT_COMMIT (the device copy has
# no .git), TORCH_CUDA_ARCH_LIST (9.0), CUDA_HOME (default: tools/prebuild_ext.py cuda-home),
# GPU_CHECK_TESTS (test files; default every tests/test_*.py that uses the gpu mark),
# GPU_CHECK_DRY_RUN=1 (no GPU expected: exit 0 when the dry run passes).
# The extension step replaces magloss/_C*.so; a dry run removes it again at the end.
# Exit status: 0 when every step is ok (on a GPU), or, with GPU_CHECK_DRY_RUN=1 and no GPU, when
# the dry run passes (versions, extension, pytest and bench ok; the sanitizer steps skipped). A run
# without a GPU and without GPU_CHECK_DRY_RUN=1 exits 1: no GPU where one was expected.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUTDIR=${OUT:-/tmp/magloss_gpu_check}
mkdir -p "$OUTDIR"
WORK=$(mktemp -d /tmp/magloss_gpu_check_work.XXXXXX)
FILES=(gpu_check.json summary.txt extension.log pytest.log memcheck.log racecheck.log bench.json bench.log)
for f in "${FILES[@]}"; do rm -f "$OUTDIR/$f"; done
export PY=${PYTHON:-python3}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (no .git in this copy: pass GIT_COMMIT)")}
export GPU_CHECK_COMMAND="bash tests/gpu_check.sh${*:+ $*}" GPU_CHECK_OUTDIR=$OUTDIR GPU_CHECK_WORK=$WORK
export GPU_CHECK_START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
declare -A CAPS=([versions]=25 [extension]=150 [pytest]=110 [memcheck]=50 [racecheck]=50 [bench]=65)
T0=$SECONDS
CUM=0   # sum of the caps of the steps so far: step i must end by T0 + CUM

# ---- the record: rebuilt from the step table and the step outputs after every step -------------
record() {  # record STEP: rewrite gpu_check.json, append STEP's line to summary.txt and print it
  GPU_CHECK_STEP=$1 GPU_CHECK_ELAPSED=$((SECONDS - T0)) "$PY" - <<'PY'
import json, os, re, xml.etree.ElementTree as ET
from pathlib import Path

env = os.environ
out, work = Path(env["GPU_CHECK_OUTDIR"]), Path(env["GPU_CHECK_WORK"])

def text(path):
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""

def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None

versions = load(work / "versions.json") or {}
steps = []
for line in text(work / "steps.tsv").splitlines():
    name, rc, seconds, deadline, status, reason, cmd = line.split("\t")
    steps.append(dict(name=name, status=status, rc=None if rc == "" else int(rc), seconds=int(seconds),
                      deadline_s=int(deadline), detail=reason, command=cmd))
rec = {"schema": "magloss-gpu-check/1", "started_utc": env["GPU_CHECK_START"], "command": env["GPU_CHECK_COMMAND"],
       "commit": env["GIT_COMMIT"], "dry_run": not versions.get("cuda_available", False),
       "budget_s": int(env["GPU_CHECK_BUDGET"]), "elapsed_s": int(env["GPU_CHECK_ELAPSED"]), "versions": versions}

def judge(s):
    """Status and detail of a step that ran, from its outputs; fills the step's section of rec."""
    name, rc = s["name"], s["rc"]
    timed_out = rc in (124, 137)
    if name == "versions":
        return ("ok" if rc == 0 and versions else "failed"), (
            f"torch {versions.get('torch')} CUDA {versions.get('torch_cuda')}, GPU {versions.get('gpu')}, "
            f"driver {versions.get('driver')}")
    if name == "extension":
        log = text(out / "extension.log")
        how = re.findall(r"^installed (prebuilt|built) (\w+)", log, re.M)
        st = re.findall(r"^extension_status: (\{.*\})$", log, re.M)
        status = json.loads(st[-1]) if st else None
        rec["extension"] = {"how": how[-1][0] if how else None, "key": how[-1][1] if how else None,
                            "status": status}
        good = rc == 0 and status is not None and status["compiled"]
        return ("ok" if good else "timeout" if timed_out else "failed"), (
            f"{how[-1][0]} {how[-1][1]}" if how else "no extension installed") + (
            f"; {status['reason']}" if status else "")
    if name == "pytest":
        counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        failed = []
        # pytest.xml: the first run (MAGLOSS_PATH=flat); pytest_speed.xml, where the step made one:
        # the second (MAGLOSS_PATH=speed), its tests named with a "[speed] " prefix
        for xml, tag in (("pytest.xml", ""), ("pytest_speed.xml", "[speed] ")):
            if tag and not (work / xml).exists():
                continue
            try:
                for case in ET.parse(work / xml).getroot().iter("testcase"):
                    counts["tests"] += 1
                    kinds = {child.tag for child in case}
                    kind = ("failed" if "failure" in kinds else "errors" if "error" in kinds
                            else "skipped" if "skipped" in kinds else "passed")
                    counts[kind] += 1
                    if kind in ("failed", "errors"):
                        failed.append(f"{tag}{case.get('classname')}::{case.get('name')}")
            except (OSError, ET.ParseError) as exc:
                counts["junit_error"] = f"{xml}: {exc}"
        rec["pytest"] = dict(counts, failed_tests=failed[:100])
        good = rc == 0 and counts["passed"] > 0 and not failed
        return ("ok" if good else "timeout" if timed_out else "failed"), (
            f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped of {counts['tests']}" + ("" if counts["passed"] else "; no test passed"))
    if name in ("memcheck", "racecheck"):
        log = text(out / f"{name}.log")
        errs = re.findall(r"ERROR SUMMARY: (\d+) error", log)
        ran = len(re.findall(r"^sanitizer case \d+/\d+ passed", log, re.M))
        expected = versions.get("sanitizer_cases")
        sec = {"errors": int(errs[-1]) if errs else None, "cases_passed": ran, "cases_expected": expected}
        rec.setdefault("sanitizer", {})[name] = sec
        clean = rc == 0 and sec["errors"] == 0 and expected and ran == expected
        return ("ok" if clean else "timeout" if timed_out else "failed"), (
            f"errors {sec['errors'] if errs else 'no error summary'}, cases passed {ran}/{expected}")
    if name == "bench":
        doc = load(out / "bench.json")
        if doc is None:
            return ("timeout" if timed_out else "failed"), "no bench.json"
        keep = ("provider", "loss", "precision", "B", "C", "D", "mode", "status", "median_ms", "p20_ms", "p80_ms",
                "peak_extra_mb", "tflops", "iters", "error")
        res = [{k: r.get(k) for k in keep} for r in doc["results"]]
        flat = load(work / "bench_flat.json")   # the fused provider's second run, MAGLOSS_PATH=flat (provider "<name>[flat]")
        if flat is not None:
            res += [dict({k: r.get(k) for k in keep}, provider=r.get("provider") + "[flat]") for r in flat["results"]]
            doc["complete"] = doc["complete"] and flat["complete"]
        rec["benchmark"] = {"complete": doc["complete"], "settings": doc["settings"], "grid": doc["grid"],
                            "skipped": doc.get("skipped", []), "results": res}
        bad = [r for r in res if r["status"] != "ok"]
        missing = sorted({p for p in doc["grid"]["providers"] if not doc["providers"][p]["available"]}
                         | {s["provider"] for s in doc.get("skipped", [])})
        if flat is None:
            missing.append("the flat-path run (no bench_flat.json)")
        else:
            missing += sorted({p + "[flat]" for p in flat["grid"]["providers"] if not flat["providers"][p]["available"]}
                              | {s["provider"] + "[flat]" for s in flat.get("skipped", [])})
        good = rc == 0 and doc["complete"] and res and not bad and not missing
        return ("ok" if good else "timeout" if timed_out else "failed"), (
            f"{len(res) - len(bad)}/{len(res)} figures ok, complete={doc['complete']}, "
            f"providers not run: {missing or 'none'}")
    return ("ok" if rc == 0 else "failed"), ""

for s in steps:
    if s["status"] == "ran":
        s["status"], s["detail"] = judge(s)
rec["steps"] = steps
rec["ok"] = bool(steps) and len(steps) == 6 and all(s["status"] == "ok" for s in steps)
# a dry run passes when what can run without a GPU is ok and only the sanitizer steps were skipped
rec["dry_run_ok"] = rec["dry_run"] and len(steps) == 6 and all(
    s["status"] == ("skipped" if s["name"] in ("memcheck", "racecheck") else "ok") for s in steps)
tmp = out / "gpu_check.json.tmp"
tmp.write_text(json.dumps(rec, indent=1) + "\n")
os.replace(tmp, out / "gpu_check.json")
s = next(s for s in reversed(steps) if s["name"] == env["GPU_CHECK_STEP"])
line = f"[{rec['elapsed_s']:4d} s] {s['name']:<9} {s['status']:<7} {s['seconds']:4d} s of {s['deadline_s']:3d}  {s['detail']}"
with open(out / "summary.txt", "a") as f:
    f.write(line + "\n")
print(line, flush=True)
PY
}

add_step() {  # add_step NAME RC SECONDS DEADLINE STATUS DETAIL COMMAND
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6//$'\t'/ }" "${7//$'\t'/ }" >>"$WORK/steps.tsv"
  record "$1"
}

begin() {  # begin NAME: DL = seconds this step may take (its cap plus what earlier steps left unused)
  CUM=$((CUM + CAPS[$1]))
  DL=$((CUM - (SECONDS - T0)))
}

skip() {  # skip NAME REASON (after begin NAME)
  add_step "$1" "" 0 "$DL" skipped "$2" ""
}

run_step() {  # [DESC=what] run_step NAME LOGFILE CMD... (after begin NAME): CMD under DL, output to LOGFILE
  local name=$1 log=$2 dl=$DL t rc desc
  shift 2
  desc=${DESC:-$*}
  echo "== $name (deadline $dl s): $desc"
  if ((dl < 10)); then add_step "$name" "" 0 "$dl" skipped "no time left" "$desc"; return; fi
  t=$SECONDS
  # INT first (pytest still writes its junit XML, the harness keeps its JSON), KILL 5 s later
  timeout --signal=INT --kill-after=5 $((dl - 5)) "$@" >"$log" 2>&1
  rc=$?
  cap_log "$log"
  add_step "$name" "$rc" $((SECONDS - t)) "$dl" ran "" "$desc"
  if [[ $(tail -n 1 "$OUTDIR/summary.txt") != *" ok "* ]]; then tail -n 25 "$log"; fi
}

cap_log() {  # keep a log under 8 MiB (the device tool returns files of at most 16 MiB)
  local f=$1 size
  size=$(stat -c %s "$f" 2>/dev/null || echo 0)
  if ((size > 8 * 2**20)); then
    { head -c $((2 * 2**20)) "$f"; printf '\n[... %d bytes cut ...]\n' "$size"; tail -c $((6 * 2**20)) "$f"; } >"$WORK/cut"
    mv "$WORK/cut" "$f"
  fi
}

export GPU_CHECK_BUDGET=0
for s in versions extension pytest memcheck racecheck bench; do GPU_CHECK_BUDGET=$((GPU_CHECK_BUDGET + CAPS[$s])); done
echo "magloss GPU check: budget $GPU_CHECK_BUDGET s, output in $OUTDIR"

# ---- versions --------------------------------------------------------------------------------
find_sanitizer() {
  local home=$1 c
  for c in "$(command -v compute-sanitizer 2>/dev/null)" "$home/bin/compute-sanitizer" \
           "$home/compute-sanitizer/compute-sanitizer" /usr/local/cuda*/bin/compute-sanitizer \
           /opt/nvidia/*/compute-sanitizer /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
    if [[ -n $c && -x $c ]]; then echo "$c"; return; fi
  done
}
versions() {  # one interpreter (importing torch is the slow part): versions.json
  "$PY" - <<'PY'
import json, os, platform, subprocess, sys
import torch

def line_of(cmd, word=""):
    """The last line of cmd's output that holds word (None if it cannot run)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
        lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip() and word in l]
        return lines[-1].strip() if lines else None
    except (OSError, subprocess.SubprocessError):
        return None

sys.path[:0] = ["tools", "tests"]
import prebuild_ext, sanitizer_cases

try:
    home = str(prebuild_ext.cuda_home())
except RuntimeError as exc:
    print(exc)
    home = None
san = subprocess.run(["bash", "-c", f'find_sanitizer "{home or ""}"'], capture_output=True, text=True).stdout.strip()
cuda = torch.cuda.is_available()
v = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
     "cuda_available": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
     "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
     "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
     "driver": line_of(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
     "cuda_home": home or None, "nvcc": line_of([f"{home}/bin/nvcc", "--version"], "release") if home else None,
     "compute_sanitizer": san or None,
     "compute_sanitizer_version": line_of([san, "--version"], "ersion") if san else None,
     "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"), "cpus": os.cpu_count()}
v["sanitizer_cases"] = len(sanitizer_cases.CASES)
with open(os.path.join(os.environ["GPU_CHECK_WORK"], "versions.json"), "w") as f:
    json.dump(v, f, indent=1)
print(json.dumps(v, indent=1))
PY
}
export -f versions find_sanitizer
begin versions
DESC="python: torch, torch.cuda, nvidia-smi, nvcc --version, compute-sanitizer --version" \
  run_step versions "$WORK/versions.log" bash -c versions
cat "$WORK/versions.log"
jq_py() { "$PY" -c "import json,sys; v=json.load(open('$WORK/versions.json')); print(v.get('$1') or '')" 2>/dev/null; }
GPU=$(jq_py cuda_available)
TORCH_CUDA=$(jq_py torch_cuda)
SAN=$(jq_py compute_sanitizer)
export CUDA_HOME=${CUDA_HOME:-$(jq_py cuda_home)}

# ---- extension -------------------------------------------------------------------------------
extension() {
  local status="import json, magloss, magloss._C; print('extension_status:', json.dumps(magloss.extension_status()))"
  "$PY" tools/prebuild_ext.py install || return $?
  if ! "$PY" -c "$status"; then   # carried but unusable here (another glibc, say): rebuild
    echo "the prebuilt extension does not import here: rebuilding"
    "$PY" tools/prebuild_ext.py build --force && "$PY" tools/prebuild_ext.py install && "$PY" -c "$status"
  fi
}
export -f extension
begin extension
if [[ ! -s $WORK/versions.json ]]; then
  skip extension "the versions step failed (is torch importable?)"
elif [[ -z $TORCH_CUDA ]]; then
  skip extension "this torch has no CUDA: nothing to build or load"
else
  DESC="python tools/prebuild_ext.py install; python -c 'import magloss._C'" \
    run_step extension "$OUTDIR/extension.log" bash -c extension
fi
FUSED=$(grep -c '^extension_status: .*"fused": true' "$OUTDIR/extension.log" 2>/dev/null)

# ---- GPU parity suite, both engine paths --------------------------------------------------------
# only the files that use the gpu mark: collecting the others costs time (the emulator suite
# compiles the kernels for the CPU at collection). Run 1, MAGLOSS_PATH=flat: every such file (the
# flat ops' and the kept ops' suites call their ops directly). Run 2, MAGLOSS_PATH=speed: the tests
# that reach the ops through the losses' path policy (ops.margin_ce_rows). A dry run runs the same
# function on tests/test_device_backend.py (the GPU-only methods of the device objects, with a fake
# torch.cuda), all of it in run 1 and two of its tests in run 2.
both_paths() {
  local rc rc2
  # shellcheck disable=SC2086
  MAGLOSS_PATH=flat "$PY" -m pytest $MARK -q -p no:cacheprovider --tb=short --junitxml="$WORK/pytest.xml" $TESTS
  rc=$?
  echo "== MAGLOSS_PATH=speed: -k '$PATH_K' $PATH_FILES"
  # shellcheck disable=SC2086
  MAGLOSS_PATH=speed "$PY" -m pytest $MARK -q -p no:cacheprovider --tb=short --junitxml="$WORK/pytest_speed.xml" \
    -k "$PATH_K" $PATH_FILES
  rc2=$?
  return $((rc != 0 ? rc : rc2))
}
export -f both_paths
begin pytest
if [[ -z $GPU ]]; then   # dry run
  MARK="" TESTS=tests/test_device_backend.py PATH_FILES=tests/test_device_backend.py PATH_K="parity_harness"
else
  MARK="-m gpu" TESTS=${GPU_CHECK_TESTS:-$(grep -lE "mark\.gpu\b" tests/test_*.py | tr '\n' ' ')}
  PATH_FILES=tests/test_cuda_parity.py
  PATH_K="modules_reductions or autocast_bf16_module or compile_fullgraph or never_waits"
fi
export MARK TESTS PATH_FILES PATH_K WORK
if [[ -z ${TESTS// /} ]]; then
  skip pytest "no test file uses the gpu mark"
else
  DESC="MAGLOSS_PATH=flat pytest $MARK $TESTS; MAGLOSS_PATH=speed pytest $MARK -k '$PATH_K' $PATH_FILES" \
    run_step pytest "$OUTDIR/pytest.log" bash -c both_paths
fi

# ---- compute-sanitizer -----------------------------------------------------------------------
for tool in memcheck racecheck; do
  begin $tool
  if [[ -z $GPU ]]; then skip $tool "no CUDA device visible (dry run)"; continue; fi
  if [[ -z $SAN ]]; then skip $tool "compute-sanitizer not found"; continue; fi
  if [[ $FUSED != 1 ]]; then skip $tool "the fused extension is not in use: no kernel of ours to check"; continue; fi
  args=(--tool "$tool" --print-limit 100 --error-exitcode 99)
  if [[ $tool == racecheck ]]; then   # our kernels only (namespace magloss): cuBLAS is not ours, and slow here
    help=$("$SAN" --help 2>&1)   # the option's name changed between versions
    if [[ $help == *"--kernel-name "* ]]; then args+=(--kernel-name kns=magloss)
    elif [[ $help == *"--filter "* ]]; then args+=(--filter kns=magloss); fi
  fi
  # without the caching allocator each buffer is its own allocation: an overrun is caught
  run_step $tool "$OUTDIR/$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" "${args[@]}" \
    "$PY" tests/sanitizer_cases.py
done

# ---- narrow benchmark, both engine paths ----------------------------------------------------------
# Run 1 (MAGLOSS_PATH=speed) every provider; run 2 (MAGLOSS_PATH=flat) the fused provider again (the
# dry run: floor), recorded as "<provider>[flat]". Run 1 may use 2/3 of the step's time, run 2 the rest.
begin bench
if [[ -n $GPU ]]; then
  BENCH="--device cuda --B 512 --C 85742 --D 512" PROVIDERS=magloss,eager,floor FLAT_PROVIDERS=magloss
else   # dry run: the same harness on the CPU at a tiny shape (no fused provider here)
  BENCH="--device cpu --B 8 --C 300 --D 16" PROVIDERS=eager,floor FLAT_PROVIDERS=floor
fi
BENCH_SECONDS=$((DL > 40 ? (DL - 25) * 2 / 3 : 15))
bench_both() {
  local rc
  # shellcheck disable=SC2086
  MAGLOSS_PATH=speed "$PY" benchmarks/run.py $BENCH --providers "$PROVIDERS" --grid quick --precisions fp32,bf16 \
    --warmup 2 --case-seconds 0.25 --iters 30 --min-iters 5 --max-seconds "$BENCH_SECONDS" --out "$OUTDIR/bench.json"
  rc=$?
  echo "== MAGLOSS_PATH=flat: --providers $FLAT_PROVIDERS"
  # shellcheck disable=SC2086
  MAGLOSS_PATH=flat "$PY" benchmarks/run.py $BENCH --providers "$FLAT_PROVIDERS" --grid quick --precisions fp32,bf16 \
    --warmup 2 --case-seconds 0.25 --iters 30 --min-iters 5 --max-seconds $((BENCH_SECONDS / 2 > 8 ? BENCH_SECONDS / 2 : 8)) \
    --out "$WORK/bench_flat.json" || rc=$?
  return "$rc"
}
export -f bench_both
export BENCH PROVIDERS FLAT_PROVIDERS BENCH_SECONDS OUTDIR WORK
DESC="MAGLOSS_PATH=speed benchmarks/run.py $BENCH --providers $PROVIDERS; MAGLOSS_PATH=flat ... --providers $FLAT_PROVIDERS" \
  run_step bench "$OUTDIR/bench.log" bash -c bench_both
grep '^|' "$OUTDIR/bench.log" >>"$OUTDIR/summary.txt"

rm -rf "$WORK"
if [[ -z $GPU && -s $OUTDIR/extension.log ]]; then
  rm -f magloss/_C*.so   # a dry run does not leave the GPU machine's extension in the package
fi
echo "== record: $OUTDIR/gpu_check.json ($((SECONDS - T0)) s)"
cat "$OUTDIR/summary.txt"
if "$PY" -c "import json,sys; sys.exit(0 if json.load(open('$OUTDIR/gpu_check.json'))['ok'] else 1)"; then
  echo "GPU CHECK: OK"
  exit 0
fi
if [[ -z $GPU ]] && "$PY" -c "import json,sys; sys.exit(0 if json.load(open('$OUTDIR/gpu_check.json'))['dry_run_ok'] else 1)"; then
  if [[ ${GPU_CHECK_DRY_RUN:-0} == 1 ]]; then
    echo "GPU CHECK: DRY RUN OK (no GPU: the sanitizer steps were skipped, pytest and bench ran their CPU stand-ins)"
    exit 0
  fi
  echo "GPU CHECK: NOT OK: no CUDA device visible (the dry run passed; set GPU_CHECK_DRY_RUN=1 where none is expected)"
  exit 1
fi
echo "GPU CHECK: NOT OK (see the steps above)"
exit 1
