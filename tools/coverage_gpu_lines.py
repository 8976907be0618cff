#!/usr/bin/env python3
"""Lines of the Python code that the CPU test run never executes, and which of them are GPU-only.

Reads coverage.py's JSON report of a CPU run of the suite and writes a summary: per file, the lines
not run, as ranges, with those that look GPU-only (the line, or a condition it sits under, names
CUDA or a GPU: ``cuda``, ``GPU``, ``is_available``, ``sync_debug``; the ``else``/``elif`` of such a
condition counts too, as it may be the CPU side) listed apart as candidates. They are then judged
and reviewed by hand (docs/cuda.md, "GPU-only lines"); the rest are CPU-reachable lines the
suite does not run (error branches, optional packages), not GPU code.

    coverage json -o /tmp/cov.json
    python tools/coverage_gpu_lines.py /tmp/cov.json --command "<how the run was made>" \
        --json benchmarks/results/coverage_cpu_<date>.json --markdown docs/coverage.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, Iterable, List

GPU_WORDS = re.compile(r"cuda|\bGPU\b|is_available|sync_debug", re.I)
HEADER = re.compile(r"^\s*(if|elif|else|with|for|while|try|except|finally)\b|^\s*\w+\s*=.*\bif\b.*\belse\b")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def enclosing_headers(lines: List[str], n: int) -> List[str]:
    """The text of the block headers line n (1-based) sits under, innermost first, up to its def/class;
    an ``else``/``elif`` also brings the ``if`` it belongs to."""
    out, level = [], _indent(lines[n - 1])
    for i in range(n - 2, -1, -1):
        text = lines[i]
        if not text.strip() or text.lstrip().startswith("#") or _indent(text) >= level:
            continue
        level = _indent(text)
        if re.match(r"^\s*(def|class|async def)\b", text):
            break
        out.append(text)
        if re.match(r"^\s*(else|elif)\b", text):   # its if: the nearest if at the same indentation above
            for j in range(i - 1, -1, -1):
                if _indent(lines[j]) == level and re.match(r"^\s*if\b", lines[j]):
                    out.append(lines[j])
                    break
    return out


def gpu_only(lines: List[str], n: int) -> bool:
    """Whether line n looks GPU-only: it, or a header it sits under, names CUDA or a GPU."""
    return bool(GPU_WORDS.search(lines[n - 1]) or any(GPU_WORDS.search(h) for h in enclosing_headers(lines, n)))


def ranges(ns: Iterable[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    out, ns = [], sorted(ns)
    for n in ns:
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def summarize(report: dict, root: Path) -> Dict[str, dict]:
    files = {}
    for name, data in sorted(report["files"].items()):
        missing = data["missing_lines"]
        if not missing:
            continue
        lines = (root / name).read_text().splitlines()
        gpu = [n for n in missing if gpu_only(lines, n)]
        files[name] = {"statements": data["summary"]["num_statements"], "missing": len(missing),
                       "missing_lines": ranges(missing), "gpu_only_candidates": ranges(gpu),
                       "gpu_only_count": len(gpu)}
    return files


def markdown(files: Dict[str, dict], command: str, totals: dict, note: str = "") -> str:
    head = [
        "# Lines the CPU test run does not execute",
        "",
        "Made by `tools/coverage_gpu_lines.py` from coverage.py's report of one CPU run of the whole suite",
        "(no GPU; the fused engine ran under the CPU emulator, subprocesses measured too):",
        "",
        f"    {command}",
        "",
        *([note, ""] if note else []),
        f"{totals['covered_lines']} of {totals['num_statements']} statements ran "
        f"({totals['percent_covered']:.1f} %). Per file: every line not run, then the ones that look",
        "GPU-only (the line, or a condition it sits under, names CUDA or a GPU). Those were reviewed by",
        "hand: the ones that are really GPU-only are listed, with why and how they were reviewed, in",
        "[cuda.md](cuda.md#gpu-only-lines); the rest of the lines here are CPU-reachable code the suite",
        "does not run (error branches, optional packages, plotting options), not GPU code.",
        "",
        "| file | statements | not run | lines not run | of which GPU-only candidates |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    rows = [f"| `{name}` | {f['statements']} | {f['missing']} | {f['missing_lines']} | "
            f"{f['gpu_only_candidates'] or '—'} |" for name, f in files.items()]
    return "\n".join(head + rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="coverage.py JSON report (coverage json -o FILE)")
    ap.add_argument("--command", required=True, help="how the coverage run was made (recorded)")
    ap.add_argument("--note", default="", help="a sentence for the markdown, after the command")
    ap.add_argument("--root", default=".", help="the paths in the report are relative to this (default .)")
    ap.add_argument("--json", help="write the summary JSON here")
    ap.add_argument("--markdown", help="write the markdown table here")
    args = ap.parse_args(argv)
    try:
        report = json.loads(Path(args.report).read_text())
        files = summarize(report, Path(args.root))
    except (OSError, ValueError, KeyError) as exc:
        print(f"coverage_gpu_lines: {args.report}: not a readable coverage.py JSON report ({exc})", file=sys.stderr)
        return 1
    totals = report["totals"]
    doc = {"schema": "magloss-coverage/1", "command": args.command, "note": args.note, "coverage_py": report["meta"]["version"],
           "timestamp": report["meta"]["timestamp"], "totals": totals, "files": files}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(files, args.command, totals, args.note))
    n = sum(f["gpu_only_count"] for f in files.values())
    print(f"{len(files)} files with lines not run, {sum(f['missing'] for f in files.values())} lines, "
          f"{n} GPU-only candidates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
