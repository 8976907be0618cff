#!/usr/bin/env bash
# One GPU benchmark call, resumable: bash benchmarks/gpu_run.sh [GRID] [SECONDS] [OUT_JSON]
#
#   GRID      full | quick | ci                  (default full)
#   SECONDS   wall budget of this whole call, build included (default 540, for a 600 s device call):
#             the harness stops starting cases 90 s before it and is interrupted 15 s before it
#   OUT_JSON  default benchmarks/results/h100_<GRID>.json
#
# 1. installs the peers' wheels from .whl/ if present (pytorch-metric-learning, liger-kernel,
#    cut-cross-entropy; see benchmarks/README.md for the download command),
# 2. installs magloss' CUDA extension unless it is already loaded: the prebuilt one carried in
#    .prebuilt/ when it matches, else a build (tools/prebuild_ext.py install),
# 3. runs benchmarks/run.py --resume, so calling it again continues the same JSON,
# 4. copies the JSON (and the build log) to $OUT when run by the device tool.
# Extra harness flags can be passed in BENCH_ARGS, e.g. BENCH_ARGS="--precisions bf16"; BENCH_DEVICE=cpu
# dry-runs the script on a machine without a GPU.
set -u -o pipefail
GRID=${1:-full}
TOTAL=${2:-540}
T0=$(date +%s)
OUT_JSON=${3:-benchmarks/results/h100_${GRID}.json}
OUTDIR=${OUT:-/tmp/bench_out}
mkdir -p "$OUTDIR" benchmarks/results
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if ! $PY -c "import magloss, sys; sys.exit(0 if magloss.extension_status()['fused'] else 1)" 2>/dev/null; then
  echo "installing magloss._C (the carried .prebuilt/<key>/ if it matches, else a build; docs/cuda.md) ..."
  $PY tools/prebuild_ext.py install >"$OUTDIR/build.log" 2>&1 || { tail -40 "$OUTDIR/build.log"; echo "BUILD FAILED: the magloss provider will be skipped"; }
fi
$PY -c "import magloss; print('extension_status:', magloss.extension_status())"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || true

LEFT=$(( TOTAL - ($(date +%s) - T0) ))
SECONDS_BUDGET=$(( LEFT > 150 ? LEFT - 90 : 60 ))
echo "harness budget: --max-seconds $SECONDS_BUDGET, hard stop after $(( LEFT - 15 )) s"
PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=10 $(( LEFT > 75 ? LEFT - 15 : 60 )) $PY benchmarks/run.py --device "${BENCH_DEVICE:-cuda}" --grid "$GRID" --max-seconds "$SECONDS_BUDGET" \
  --resume --out "$OUT_JSON" ${BENCH_ARGS:-} 2>"$OUTDIR/bench_stderr.log"
rc=$?
grep -v '%|' "$OUTDIR/bench_stderr.log" | tail -40
cp "$OUT_JSON" "$OUTDIR/" 2>/dev/null || true
$PY -c "import json,sys; d=json.load(open('$OUT_JSON')); print('records', len(d['results']), 'complete', d['complete'], 'elapsed_s', d.get('elapsed_s'))"
exit $rc
