"""tools/coverage_gpu_lines.py: which lines a CPU coverage run left out look GPU-only, on a small
hand-written source file and coverage.py report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import coverage_gpu_lines as cgl  # noqa: E402

SOURCE = """\
import torch


def f(x):
    if torch.cuda.is_available():
        y = x.cuda()
        return y
    elif x.numel() == 0:
        raise ValueError("empty")
    else:
        z = x + 1
    return z


def g(device):
    if device == "cpu":
        return 1
    else:
        return 2
"""
# lines not run on the CPU: 6-7 (under a CUDA condition), 9 (an elif of that condition: a
# candidate, to be judged by hand), 19 (the else of a condition that names no GPU)
MISSING = [6, 7, 9, 19]


def test_candidates_follow_the_enclosing_condition():
    lines = SOURCE.splitlines()
    assert [n for n in MISSING if cgl.gpu_only(lines, n)] == [6, 7, 9]
    assert cgl.enclosing_headers(lines, 9) == ["    elif x.numel() == 0:", "    if torch.cuda.is_available():"]
    assert cgl.enclosing_headers(lines, 19) == ["    else:", "    if device == \"cpu\":"]
    assert not cgl.gpu_only(lines, 12) and not cgl.gpu_only(lines, 19)


def test_ranges():
    assert cgl.ranges([7, 1, 2, 3, 9, 10]) == "1-3, 7, 9-10"
    assert cgl.ranges([]) == ""


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    (tmp_path / "m.py").write_text(SOURCE)
    report = {"meta": {"version": "7.x", "timestamp": "now"},
              "totals": {"covered_lines": 11, "num_statements": 15, "percent_covered": 73.3},
              "files": {"m.py": {"missing_lines": MISSING, "summary": {"num_statements": 15}},
                        "ok.py": {"missing_lines": [], "summary": {"num_statements": 3}}}}
    (tmp_path / "cov.json").write_text(json.dumps(report))
    out_json, out_md = tmp_path / "s.json", tmp_path / "s.md"
    assert cgl.main([str(tmp_path / "cov.json"), "--command", "the run", "--root", str(tmp_path),
                     "--json", str(out_json), "--markdown", str(out_md)]) == 0
    doc = json.loads(out_json.read_text())
    assert doc["command"] == "the run" and list(doc["files"]) == ["m.py"]
    assert doc["files"]["m.py"]["missing_lines"] == "6-7, 9, 19"
    assert doc["files"]["m.py"]["gpu_only_candidates"] == "6-7, 9"
    assert "| `m.py` | 15 | 4 | 6-7, 9, 19 | 6-7, 9 |" in out_md.read_text()
    assert "1 files with lines not run, 4 lines" in capsys.readouterr().out
    assert cgl.main([str(tmp_path / "missing.json"), "--command", "x"]) == 1
