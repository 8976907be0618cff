"""tests/gpu_check.sh without a GPU: the record, the step judges and the exit status of a dry run.

Run with this interpreter (a CPU torch: the extension step is skipped, "this torch has no CUDA"),
so the dry run does not pass and the script must say so; the pytest and bench steps run their CPU
stand-ins and are judged from their outputs. With the GPU machine's torch and a prebuilt extension
the same dry run passes (docs/cuda.md, "Prebuilt extension").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """Two dry runs with this interpreter: without and with GPU_CHECK_DRY_RUN=1."""
    out = {}
    for flag in ("0", "1"):
        d = tmp_path_factory.mktemp(f"gpu_check_{flag}")
        env = dict(os.environ, PYTHON=sys.executable, OUT=str(d), GPU_CHECK_DRY_RUN=flag, GIT_COMMIT="test",
                   CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        p = subprocess.run(["bash", "tests/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        out[flag] = (p, json.loads((d / "gpu_check.json").read_text()), d)
    return out


def test_dry_run_record(dry_runs):
    p, rec, d = dry_runs["0"]
    assert rec["dry_run"] and rec["commit"] == "test" and not rec["ok"]
    steps = {s["name"]: s for s in rec["steps"]}
    assert list(steps) == ["versions", "extension", "pytest", "memcheck", "racecheck", "bench"]
    assert steps["versions"]["status"] == "ok"
    assert steps["extension"]["status"] == "skipped" and "has no CUDA" in steps["extension"]["detail"]
    # the stand-ins ran and were judged from their outputs
    assert steps["pytest"]["status"] == "ok", (steps["pytest"], (d / "pytest.log").read_text()[-2000:])
    assert rec["pytest"]["passed"] > 0 and rec["pytest"]["failed"] == 0
    log = (d / "pytest.log").read_text()   # both paths' runs, the second one's tests counted too
    assert "== MAGLOSS_PATH=speed" in log and log.count(" passed") == 2
    assert steps["bench"]["status"] == "ok", steps["bench"]
    # run 1 (speed) every provider, run 2 (flat) the stand-in of the fused one, named "[flat]"
    assert {r["provider"] for r in rec["benchmark"]["results"]} == {"eager", "floor", "floor[flat]"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rec["benchmark"]["results"])
    for tool in ("memcheck", "racecheck"):
        assert steps[tool]["status"] == "skipped" and "dry run" in steps[tool]["detail"]
    assert not rec["dry_run_ok"]          # the extension could not be loaded with a CPU torch
    assert len((d / "summary.txt").read_text().splitlines()) >= 6


@pytest.mark.parametrize("flag", ["0", "1"])
def test_dry_run_exit_status(dry_runs, flag):
    """No GPU and a dry run that did not pass: exit 1 whether or not a dry run was expected."""
    p, rec, _ = dry_runs[flag]
    assert p.returncode == 1, p.stdout[-3000:]
    assert "GPU CHECK: NOT OK" in p.stdout


GPU_PYTHON = os.environ.get("MAGLOSS_GPU_PYTHON")   # the GPU machine's interpreter (docs/cuda.md)


@pytest.mark.skipif(not GPU_PYTHON, reason="MAGLOSS_GPU_PYTHON (the GPU machine's Python and torch) not set")
def test_dry_run_passes_with_the_gpu_machines_torch(tmp_path):
    """With the GPU machine's torch and the prebuilt extension carried: the extension installs and
    imports, the dry run passes, exit 0 only where a dry run is expected; magloss/ is left clean."""
    codes = {}
    for flag in ("1", "0"):
        env = dict(os.environ, PYTHON=GPU_PYTHON, OUT=str(tmp_path / flag), GPU_CHECK_DRY_RUN=flag,
                   GIT_COMMIT="test", OMP_NUM_THREADS="1")
        p = subprocess.run(["bash", "tests/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
        rec = json.loads((tmp_path / flag / "gpu_check.json").read_text())
        assert rec["dry_run"] and rec["dry_run_ok"] and not rec["ok"], p.stdout[-3000:]
        assert rec["extension"]["how"] in ("prebuilt", "built") and rec["extension"]["status"]["compiled"]
        codes[flag] = p.returncode
    assert codes == {"1": 0, "0": 1}
    assert not list((ROOT / "magloss").glob("_C*.so"))
