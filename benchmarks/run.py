#!/usr/bin/env python3
"""magloss benchmark harness: fused vs eager vs torch.compile vs peers vs the bare-product floor.

One command times forward (fwd), backward (bwd) and forward+backward (full) of every
provider in :mod:`benchmarks.providers` over a grid of (precision, B, C, D, loss), and
writes one JSON per run under benchmarks/results/ plus a markdown table on stdout.

    python benchmarks/run.py --grid quick                     # B=512, C=85,742, D=512, all precisions
    python benchmarks/run.py --grid full --max-seconds 540 --out benchmarks/results/h100_full.json
    python benchmarks/run.py --grid full --resume --out benchmarks/results/h100_full.json   # continue it
    python benchmarks/run.py --grid ci --device cpu           # tiny CPU smoke grid
    python benchmarks/run.py --merge a.json b.json --out merged.json

Per case and mode: ``warmup`` forward+backward calls (these also compile), one call to
estimate the time, then n = clamp(case_seconds / estimate, min_iters, iters) timed calls
(at most 3 when n calls would exceed 10 × case_seconds);
median, p20 and p80 of the n times. CUDA events on CUDA, time.perf_counter on CPU.
Backward-only timing runs a fresh forward before each timed backward (untimed).

Peak extra memory (CUDA only): after gc and a peak reset, max_memory_allocated minus what
was allocated before the call (inputs x, W, labels and every earlier buffer) minus the
bytes of the gradients of x and W (bwd, full). For bwd the peak is taken after the
forward, so it includes the tensors the forward saved. On CPU it is null (no allocator
statistics).

Effective TFLOP/s counts 2·B·D·C flops per matrix product (the shape of record of the README's performance targets) and
the minimal number of products: fwd 1 (X·Wᵀ), bwd 2 (G·W and Gᵀ·X), full 3, for every
provider alike; work a provider does beyond that (recomputing logits, normalizations,
elementwise passes) is not counted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import device as devices  # noqa: E402
from benchmarks import providers as P  # noqa: E402

try:  # optional progress bar
    from tqdm import tqdm as _tqdm
except ImportError:  # pragma: no cover
    _tqdm = None

MODES = ["fwd", "bwd", "full"]
PRODUCTS = {"fwd": 1, "bwd": 2, "full": 3}
SCHEMA = "magloss-bench/1"
SHAPE_OF_RECORD = (512, 85742, 512)   # B, C, D (README.md, Benchmarks)

DEFAULT_PROVIDERS = ["magloss", "reference", "eager", "compile", "pml", "liger", "cce", "torch-lce", "torch-lce-chunked",
                     "floor"]
GRIDS: Dict[str, dict] = {
    # the grid: 2 x 3 shapes x 4 precisions x 3 losses
    "full": dict(B=[128, 512], C=[10000, 85742, 1000000], D=[512], precisions=P.PRECISIONS,
                 losses=P.LOSSES, providers=[p for p in DEFAULT_PROVIDERS if p != "reference"],
                 cuda_settings=dict(iters=30, min_iters=5, case_seconds=0.5)),
    # the shape of record only
    "quick": dict(B=[512], C=[85742], D=[512], precisions=P.PRECISIONS, losses=P.LOSSES,
                  providers=DEFAULT_PROVIDERS),
    # the CPU record of the chunked engine (issue: ratios to the floor, PML and eager at D = 512)
    "cpu": dict(B=[64, 256], C=[10000, 85742, 300000], D=[512], precisions=["fp32"], losses=["arcface"],
                providers=["chunked", "reference", "eager", "pml", "floor"]),
    # CI-sized: runs on CPU in seconds
    "ci": dict(B=[16], C=[300, 1000], D=[32], precisions=["fp32", "bf16"], losses=P.LOSSES,
               providers=["magloss", "reference", "eager", "pml", "liger", "cce", "floor"]),
}


# -- environment ------------------------------------------------------------------------------
def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    except Exception:
        return None


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


def environment(device: str, argv: List[str]) -> dict:
    import magloss

    cuda = device.startswith("cuda")
    dev = devices.for_name(device)
    status = _git("status", "--porcelain", "--untracked-files=no")
    env = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": _git("rev-parse", "HEAD") or os.environ.get("GIT_COMMIT"),   # a copy without .git: the caller's
        "dirty": None if status is None else bool(status),
        "command": "python " + shlex.join(argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "magloss": getattr(magloss, "__version__", None),
        "magloss_extension": magloss.extension_status(),
        "versions": {d: _version(d) for d in ("numpy", "triton", "pytorch-metric-learning", "liger-kernel",
                                              "cut-cross-entropy")},
        "timer": dev.timer_name,
        "threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "flops": "2*B*D*C per matrix product; products counted: fwd 1 (X.W^T), bwd 2 (G.W, G^T.X), "
                 "full 3, for every provider",
        "peak_extra": ("max_memory_allocated after a peak reset minus memory allocated before the call "
                       "(inputs, W) minus the gradients of x and W (bwd, full)") if cuda
                      else ("VmHWM - VmRSS before the call - gradients, fresh process per case "
                            "(benchmarks/cpu_memory.py)" if "--cpu-memory" in argv
                            else "null: no allocator statistics on CPU (see --cpu-memory)"),
    }
    env.update(dev.describe())   # "gpu" (the CPU's name on a CPU run); on CUDA its memory and capability
    return env


# -- timing ---------------------------------------------------------------------------------
# the device object (benchmarks/device.py) waits, times and reads memory statistics: Cuda or Host


def _percentile(xs: List[float], q: float) -> float:
    ys = sorted(xs)
    if len(ys) == 1:
        return ys[0]
    pos = (len(ys) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ys[lo] + (ys[hi] - ys[lo]) * (pos - lo)


def _one_call(runner: "P.Runner", mode: str, ev) -> None:
    """One timed call of ``mode``. For bwd, a fresh forward runs untimed before the start event
    (torch.compile's backward cannot be re-run with retain_graph)."""
    runner.zero_grad()
    if mode == "fwd":
        ev[0].record()
        with runner.context():
            out = runner.fwd()
        ev[1].record()
    elif mode == "bwd":
        with runner.context():
            out = runner.fwd()
        ev[0].record()
        runner.bwd(out, False)
        ev[1].record()
    else:
        ev[0].record()
        with runner.context():
            out = runner.fwd()
        runner.bwd(out, False)
        ev[1].record()
    del out


def _peak_extra_mb(runner: "P.Runner", mode: str, dev: devices.Host) -> Optional[float]:
    """Peak extra MiB of one call of ``mode`` (None without allocator statistics): the peak
    above what was allocated before it, minus the gradients of x and W (bwd, full). For bwd the
    forward runs first, so the peak includes the tensors it saved."""
    if not dev.memory_stats:
        return None
    runner.zero_grad()

    def fwd():
        with runner.context():
            return runner.fwd()

    def call(out=None):
        if mode == "bwd":
            runner.bwd(out, False)
            return None
        out = fwd()
        if mode == "full":
            runner.bwd(out, False)
        return None

    peak, _ = dev.peak_bytes(call, before=fwd if mode == "bwd" else None)
    grads = runner.grad_bytes() if mode != "fwd" else 0
    runner.zero_grad()
    return round((peak - grads) / 2**20, 2)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, getattr(torch.cuda, "OutOfMemoryError", MemoryError))):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "cuda_error_out_of_memory" in msg


def run_case(case: "P.Case", modes: List[str], args, timer: devices.Host) -> List[dict]:
    """All modes of one case; returns records (status ok / oom / error)."""
    base = {"provider": case.provider, "loss": case.loss, "precision": case.precision,
            "B": case.B, "C": case.C, "D": case.D, "label": P.LABELS.get(case.provider, case.provider),
            "plain_ce": case.provider in P.PLAIN_CE}
    flops1 = 2.0 * case.B * case.D * case.C
    records: List[dict] = []
    runner = None

    def fail(mode, exc):
        status = "oom" if _is_oom(exc) else "error"
        rec = dict(base, mode=mode, status=status, median_ms=None, p20_ms=None, p80_ms=None,
                   peak_extra_mb=None, tflops=None, products=PRODUCTS[mode], iters=0,
                   error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        records.append(rec)

    with P.precision_context(case.precision, case.device):
        try:
            runner = P.build(case)
            t0 = time.perf_counter()
            for _ in range(args.warmup):        # warm-up (and compilation) with forward+backward
                runner.zero_grad()
                with runner.context():
                    out = runner.fwd()
                runner.bwd(out, False)
                del out
            timer.synchronize()
            warm_s = time.perf_counter() - t0
        except P.Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - OOM or a provider failure: record, go on
            for m in modes:
                fail(m, exc)
            runner = None
            timer.free()
            return records
        for mode in modes:
            try:
                timer.synchronize()
                t0 = time.perf_counter()
                timer.measure(lambda ev: _one_call(runner, mode, ev), 1)
                timer.synchronize()
                est = max(time.perf_counter() - t0, 1e-6)
                n = int(min(args.iters, max(args.min_iters, args.case_seconds // est)))
                if est * n > 10 * args.case_seconds:     # very slow calls (e.g. a peer at C = 1M): 3 suffice
                    n = min(n, 3)
                times = timer.measure(lambda ev: _one_call(runner, mode, ev), n)
                peak = _peak_extra_mb(runner, mode, timer)
                med = _percentile(times, 0.5)
                records.append(dict(
                    base, mode=mode, status="ok", median_ms=round(med, 5), p20_ms=round(_percentile(times, 0.2), 5),
                    p80_ms=round(_percentile(times, 0.8), 5), peak_extra_mb=peak,
                    tflops=float(f"{flops1 * PRODUCTS[mode] / (med * 1e-3) / 1e12:.4g}"), products=PRODUCTS[mode],
                    iters=n, warmup_s=round(warm_s, 3), notes=runner.notes))
            except Exception as exc:  # noqa: BLE001
                fail(mode, exc)
                timer.free()
    runner = None                   # drop the provider before freeing the device memory
    timer.free()
    return records


def run_interleaved(cases: List["P.Case"], modes: List[str], args, timer: devices.Host):
    """The cases of one shape (same precision, B, C, D), timed in rounds: each round makes one
    call of every case in turn, so that a load change on a shared machine hits every provider
    alike and the ratios of one run stay comparable. n rounds, n from the slowest case's
    estimate as in :func:`run_case`. Returns (records, [(case, reason) of unavailable cases]).
    Each record carries os.getloadavg() at its end (``loadavg``)."""
    runners, records, skipped = {}, [], []
    for case in cases:
        base = {"provider": case.provider, "loss": case.loss, "precision": case.precision, "B": case.B,
                "C": case.C, "D": case.D, "label": P.LABELS.get(case.provider, case.provider),
                "plain_ce": case.provider in P.PLAIN_CE}
        with P.precision_context(case.precision, case.device):
            try:
                runner = P.build(case)
                t0 = time.perf_counter()
                timer.measure(lambda ev: _one_call(runner, "full", ev), args.warmup)
                runners[case] = (runner, base, time.perf_counter() - t0)
            except P.Unavailable as exc:
                skipped.append((case, str(exc)))
            except Exception as exc:  # noqa: BLE001
                records += [dict(base, mode=m, status="oom" if _is_oom(exc) else "error", median_ms=None,
                                 p20_ms=None, p80_ms=None, peak_extra_mb=None, tflops=None,
                                 products=PRODUCTS[m], iters=0, error=f"{type(exc).__name__}: {exc}"[:300])
                            for m in modes]
    for mode in modes:
        n = args.min_iters
        if args.case_seconds > 0:          # size the run from one call of each (case_seconds 0: min_iters)
            est = {}
            for case, (runner, _, _) in runners.items():
                with P.precision_context(case.precision, case.device):
                    est[case] = timer.measure(lambda ev: _one_call(runner, mode, ev), 1)[0] / 1e3
            slowest = max(est.values(), default=1e-6)
            n = int(min(args.iters, max(args.min_iters, args.case_seconds // slowest)))
        times = {case: [] for case in runners}
        for _ in range(n):
            for case, (runner, _, _) in runners.items():
                with P.precision_context(case.precision, case.device):
                    times[case] += timer.measure(lambda ev: _one_call(runner, mode, ev), 1)
        for case, (runner, base, warm_s) in runners.items():
            ts = times[case]
            med = _percentile(ts, 0.5)
            peak = None
            if args.cpu_memory and not timer.cuda:
                from benchmarks import cpu_memory
                peak = cpu_memory.fresh(case.provider, case.loss, case.precision, case.B, case.C, case.D, mode,
                                        torch.get_num_threads())
            elif timer.memory_stats:
                peak = _peak_extra_mb(runner, mode, timer)
            records.append(dict(
                base, mode=mode, status="ok", median_ms=round(med, 5), p20_ms=round(_percentile(ts, 0.2), 5),
                p80_ms=round(_percentile(ts, 0.8), 5), peak_extra_mb=peak,
                tflops=float(f"{2.0 * case.B * case.D * case.C * PRODUCTS[mode] / (med * 1e-3) / 1e12:.4g}"),
                products=PRODUCTS[mode], iters=n, warmup_s=round(warm_s, 3), notes=runner.notes,
                interleaved=True, loadavg=list(os.getloadavg())))
    runners.clear()
    timer.free()
    return records, skipped


# -- grid -------------------------------------------------------------------------------------
def _csv(s: Optional[str], cast=str) -> Optional[list]:
    if s is None:
        return None
    return [cast(v.replace("_", "")) for v in s.split(",") if v.strip()]


def make_cases(grid: dict, device: str) -> List["P.Case"]:
    cases = []
    for precision in grid["precisions"]:
        for B in grid["B"]:
            for C in grid["C"]:
                for D in grid["D"]:
                    for provider in grid["providers"]:
                        if precision == "fp32-simt" and provider not in P.SIMT_PROVIDERS:
                            continue
                        if provider in P.LOSS_FREE:
                            cases.append(P.Case(provider, P.LOSS_FREE[provider], precision, B, C, D, device))
                            continue
                        for loss in grid["losses"]:
                            cases.append(P.Case(provider, loss, precision, B, C, D, device))
    # the shape of record first, so that a run cut by --max-seconds has it
    order = sorted(range(len(cases)), key=lambda i: ((cases[i].B, cases[i].C, cases[i].D) != SHAPE_OF_RECORD, i))
    return [cases[i] for i in order]


def record_key(r: dict):
    return (r["provider"], r["loss"], r["mode"], r["precision"], r["B"], r["C"], r["D"])


# -- output -----------------------------------------------------------------------------------
def _fmt(v, nd=3):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def markdown_table(results: Iterable[dict]) -> str:
    rows = sorted(results, key=lambda r: (r["precision"], r["B"], r["C"], r["D"], r["loss"], r["provider"],
                                          MODES.index(r["mode"])))
    head = ("| provider | loss | precision | B | C | D | mode | median ms | p20 ms | p80 ms | TFLOP/s "
            "| peak extra MB | status |")
    out = [head, "|" + " --- |" * 13]
    for r in rows:
        prov = r["provider"] + (" (plain CE)" if r.get("plain_ce") else "")
        out.append(f"| {prov} | {r['loss']} | {r['precision']} | {r['B']} | {r['C']} | {r['D']} | {r['mode']} "
                   f"| {_fmt(r['median_ms'])} | {_fmt(r['p20_ms'])} | {_fmt(r['p80_ms'])} | {_fmt(r['tflops'], 2)} "
                   f"| {_fmt(r['peak_extra_mb'], 1)} | {r['status']} |")
    return "\n".join(out)


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:40]


def merge(paths: List[Path]) -> dict:
    """Merge result files: one record per key, an ok record beats an oom/error one, later files win ties."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    best: Dict[tuple, dict] = {}
    rank = {"ok": 2, "oom": 1, "error": 0}
    for d in docs:
        for r in d["results"]:
            k = record_key(r)
            if k not in best or rank.get(r["status"], 0) >= rank.get(best[k]["status"], 0):
                best[k] = r
    gpus = {d["env"].get("gpu") for d in docs}
    if len(gpus) > 1:
        print(f"warning: merging runs from different devices: {sorted(map(str, gpus))}", file=sys.stderr)
    out = dict(docs[0])
    out["results"] = list(best.values())
    out["complete"] = all(d.get("complete", False) for d in docs)
    out["merged_from"] = [{"path": str(p), "env": d["env"]} for p, d in zip(paths, docs)]
    skipped = {}
    for d in docs:
        for s in d.get("skipped", []):
            skipped[(s["provider"], s.get("loss"), s.get("precision"))] = s
    out["skipped"] = list(skipped.values())
    return out


# -- main -------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    ap.add_argument("--grid", default="quick", choices=sorted(GRIDS), help="preset grid (default quick)")
    ap.add_argument("--providers", help=f"comma list from {P.PROVIDERS} (default: the grid's)")
    ap.add_argument("--losses", help=f"comma list from {P.LOSSES}")
    ap.add_argument("--precisions", help=f"comma list from {P.PRECISIONS}")
    ap.add_argument("--modes", default="fwd,bwd,full", help="comma list from fwd,bwd,full")
    ap.add_argument("--B", help="override the grid's batch sizes, e.g. 128,512")
    ap.add_argument("--C", help="override the grid's class counts, e.g. 10000,85742")
    ap.add_argument("--D", help="override the grid's embedding sizes")
    ap.add_argument("--out", help="result JSON (default benchmarks/results/<device>_<grid>_<date>.json)")
    ap.add_argument("--iters", type=int, default=None, help="max timed calls per case and mode "
                    "(default 50 on CUDA, 10 on CPU)")
    ap.add_argument("--min-iters", type=int, default=None, help="min timed calls (default 10 CUDA, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="forward+backward warm-up calls per case "
                    "(default 3 CUDA, 1 CPU)")
    ap.add_argument("--case-seconds", type=float, default=None,
                    help="target timed seconds per case and mode; caps the calls between --min-iters and "
                         "--iters (default 1.0 CUDA, 0.5 CPU)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop starting new cases after this many seconds (the JSON says complete=false; "
                         "continue with --resume)")
    ap.add_argument("--resume", action="store_true", help="keep the records already in --out, run the rest")
    ap.add_argument("--shard", help="i/n: run only every n-th case starting at i (1-based)")
    ap.add_argument("--merge", nargs="+", help="merge these result JSONs into --out and print the table")
    ap.add_argument("--interleave", action="store_true",
                    help="time the providers of each shape in rounds (one call of each in turn), so that the "
                         "ratios of a run on a shared machine are comparable; every runner of a shape is alive "
                         "at once (memory!)")
    ap.add_argument("--cpu-memory", action="store_true",
                    help="CPU runs: peak extra memory of each case in a fresh process (benchmarks/cpu_memory.py; "
                         "Linux); with --interleave only")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU runs; default torch's)")
    ap.add_argument("--list", action="store_true", help="print the cases that would run (after --resume/--shard) "
                    "and exit")
    ap.add_argument("--quiet", action="store_true", help="no table on stdout")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    argv_list = list(sys.argv if argv is None else ["benchmarks/run.py", *argv])
    args = parse_args(argv)
    if args.merge:
        if not args.out:
            raise SystemExit("--merge needs --out")
        doc = merge([Path(p) for p in args.merge])
        write_json(Path(args.out), doc)
        if not args.quiet:
            print(markdown_table(doc["results"]))
        return doc

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    grid = dict(GRIDS[args.grid])
    preset = grid.pop("cuda_settings", {}) if cuda else {}
    grid.pop("cuda_settings", None)
    args.iters = args.iters or preset.get("iters") or (50 if cuda else 10)
    args.min_iters = min(args.min_iters or preset.get("min_iters") or (10 if cuda else 3), args.iters)
    if args.warmup is None:
        args.warmup = 3 if cuda else 1
    if args.case_seconds is None:
        args.case_seconds = preset.get("case_seconds", 1.0 if cuda else 0.5)
    for key, val in (("providers", _csv(args.providers)), ("losses", _csv(args.losses)),
                     ("precisions", _csv(args.precisions)), ("B", _csv(args.B, int)), ("C", _csv(args.C, int)),
                     ("D", _csv(args.D, int))):
        if val:
            grid[key] = val
    modes = _csv(args.modes)
    for name, vals, allowed in (("providers", grid["providers"], P.PROVIDERS), ("losses", grid["losses"], P.LOSSES),
                                ("precisions", grid["precisions"], P.PRECISIONS), ("modes", modes, MODES)):
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise SystemExit(f"--{name}: unknown {bad}; choose from {allowed}")

    env = environment(device, argv_list)
    out_path = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results"
        / f"{_slug(env['gpu'])}_{args.grid}_{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M}.json")

    avail = P.availability(device)
    doc = {"schema": SCHEMA, "env": env, "grid": {**grid, "name": args.grid, "modes": modes},
           "settings": {"iters": args.iters, "min_iters": args.min_iters, "warmup": args.warmup,
                        "case_seconds": args.case_seconds, "max_seconds": args.max_seconds, "shard": args.shard},
           "providers": {p: {"label": P.LABELS[p], "available": avail[p] is None, "reason": avail[p]}
                         for p in P.PROVIDERS},
           "results": [], "skipped": [], "complete": False}
    done = set()
    if args.resume and out_path.exists():
        old = json.loads(out_path.read_text())
        doc["results"] = [r for r in old["results"] if r["status"] in ("ok", "oom")]
        doc["skipped"] = old.get("skipped", [])
        doc["resumed_from"] = old.get("resumed_from", []) + [old["env"]]
        done = {record_key(r) for r in doc["results"]}
        print(f"resuming {out_path}: {len(done)} records kept", file=sys.stderr)

    for p in grid["providers"]:
        if avail[p] is not None:
            print(f"skipping provider {p}: {avail[p]}", file=sys.stderr)
    cases = [c for c in make_cases(grid, device) if avail[c.provider] is None]
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        cases = cases[i - 1::n]
    todo = []
    for c in cases:
        missing = [m for m in modes if (c.provider, c.loss, m, c.precision, c.B, c.C, c.D) not in done]
        if missing:
            todo.append((c, missing))

    if args.list:
        from collections import Counter
        for c, missing in todo:
            print(f"{c.provider:10s} {c.loss:9s} {c.precision:9s} B={c.B:<5d} C={c.C:<8d} D={c.D:<4d} {','.join(missing)}")
        per = Counter(c.provider for c, _ in todo)
        print(f"{len(todo)} cases ({sum(len(m) for _, m in todo)} case-modes): "
              + ", ".join(f"{p} {n}" for p, n in per.items()), file=sys.stderr)
        return doc

    timer = devices.for_name(device)
    t_start = time.monotonic()
    if args.interleave:
        _main_interleaved(doc, todo, args, timer, out_path, t_start)
        if not args.quiet:
            print(markdown_table(doc["results"]))
        print(f"\nwrote {out_path} ({len(doc['results'])} records, complete={doc['complete']})", file=sys.stderr)
        return doc
    bar = _tqdm(total=len(todo), unit="case", dynamic_ncols=True, file=sys.stderr) if _tqdm else None
    skipped_keys = {(s["provider"], s.get("loss"), s.get("precision")) for s in doc["skipped"]}
    stopped = False
    for k, (case, missing) in enumerate(todo):
        if args.max_seconds is not None and time.monotonic() - t_start > args.max_seconds:
            stopped = True
            msg = f"--max-seconds {args.max_seconds:g} reached: {len(todo) - k} cases left; rerun with --resume"
            (bar.write if bar else print)(msg)
            break
        label = f"{case.provider} {case.loss} {case.precision} B={case.B} C={case.C} D={case.D}"
        if bar:
            bar.set_postfix_str(label)
        else:
            print(f"[{k + 1}/{len(todo)}] {label}", file=sys.stderr, flush=True)
        try:
            recs = run_case(case, missing, args, timer)
        except P.Unavailable as exc:
            sk = (case.provider, case.loss, case.precision)
            if sk not in skipped_keys:
                skipped_keys.add(sk)
                doc["skipped"].append({"provider": case.provider, "loss": case.loss, "precision": case.precision,
                                       "reason": str(exc)})
                (bar.write if bar else print)(f"skipping {case.provider} {case.loss} {case.precision}: {exc}")
            recs = []
        keys = {record_key(r) for r in recs}
        doc["results"] = [r for r in doc["results"] if record_key(r) not in keys] + recs
        for r in recs:
            if r["status"] != "ok":
                (bar.write if bar else print)(f"{label} {r['mode']}: {r['status']} ({r.get('error')})")
        doc["complete"] = False
        write_json(out_path, doc)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    doc["complete"] = not stopped and not args.shard
    doc["elapsed_s"] = round(time.monotonic() - t_start, 1)
    write_json(out_path, doc)
    if not args.quiet:
        print(markdown_table(doc["results"]))
    print(f"\nwrote {out_path} ({len(doc['results'])} records, complete={doc['complete']})", file=sys.stderr)
    return doc


def _main_interleaved(doc, todo, args, timer, out_path, t_start) -> None:
    groups: Dict[tuple, list] = {}
    for case, missing in todo:
        groups.setdefault((case.precision, case.B, case.C, case.D), []).append((case, missing))
    stopped = False
    doc["env"]["loadavg_start"] = list(os.getloadavg())
    for k, (shape, items) in enumerate(groups.items()):
        if args.max_seconds is not None and time.monotonic() - t_start > args.max_seconds:
            stopped = True
            print(f"--max-seconds {args.max_seconds:g} reached: {len(groups) - k} shapes left; rerun with --resume",
                  file=sys.stderr)
            break
        print(f"[{k + 1}/{len(groups)}] {shape}: {', '.join(c.provider + '/' + c.loss for c, _ in items)}",
              file=sys.stderr, flush=True)
        modes = sorted({m for _, ms in items for m in ms}, key=MODES.index)
        recs, skipped = run_interleaved([c for c, _ in items], modes, args, timer)
        for case, reason in skipped:
            doc["skipped"].append({"provider": case.provider, "loss": case.loss, "precision": case.precision,
                                   "reason": reason})
        keys = {record_key(r) for r in recs}
        doc["results"] = [r for r in doc["results"] if record_key(r) not in keys] + recs
        write_json(out_path, doc)
    doc["env"]["loadavg_end"] = list(os.getloadavg())
    doc["complete"] = not stopped and not args.shard
    doc["elapsed_s"] = round(time.monotonic() - t_start, 1)
    write_json(out_path, doc)


if __name__ == "__main__":
    main()
