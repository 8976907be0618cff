#!/usr/bin/env python3
"""PNG plots of one results JSON from benchmarks/run.py.

    python benchmarks/plot.py benchmarks/results/RUN.json [--mode full] [--outdir DIR]

For each batch size B in the run, four figures (rows: precision, columns: loss; x: C, log):

* ``<stem>_B<B>_time.png``        median time per call vs C, one line per provider
* ``<stem>_B<B>_memory.png``      peak extra memory vs C (CUDA runs only)
* ``<stem>_B<B>_ratio_eager.png`` time / eager time (same loss, precision, shape); the README's performance targets dashed
* ``<stem>_B<B>_ratio_floor.png`` time / floor time (bare products of the same shapes)

Plain-CE peers (Liger, CCE) and the floor do not depend on the loss and appear in every
column. magloss' fp32-simt run is drawn in the fp32 row. Out-of-memory points are
listed under each panel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.catalog import LOSS_FREE, PLAIN_CE  # noqa: E402

STYLE = {
    "magloss": dict(color="#d62728", marker="o", lw=2.4),
    "magloss (fp32-simt)": dict(color="#ff9896", marker="o", lw=2.0, ls="--"),
    "reference": dict(color="#8c564b", marker="v"),
    "eager": dict(color="#1f77b4", marker="s", lw=2.0),
    "eager-fullmatrix": dict(color="#aec7e8", marker="s"),
    "compile": dict(color="#2ca02c", marker="^"),
    "pml": dict(color="#9467bd", marker="D"),
    "liger": dict(color="#ff7f0e", marker="P", ls="--"),
    "cce": dict(color="#bcbd22", marker="X", ls="--"),
    "torch-lce": dict(color="#17becf", marker="h", ls="--"),
    "torch-lce-chunked": dict(color="#9edae5", marker="H", ls="--"),
    "floor": dict(color="#7f7f7f", marker=".", ls=":", lw=2.0),
}
PLAIN = {p: f"{p} (plain CE)" if p in PLAIN_CE else f"{p} ({what})" for p, what in LOSS_FREE.items()}
TARGET_EAGER = {"fp32": 0.5, "tf32": 0.25, "bf16": 0.25}
TARGET_FLOOR = {"fp32": 1.2, "tf32": 1.5, "bf16": 1.5}


def _series(results: List[dict], mode: str, B: int, precision: str, loss: str) -> Dict[str, Dict[int, dict]]:
    """label -> {C: record} for one panel."""
    out: Dict[str, Dict[int, dict]] = {}
    for r in results:
        if r["mode"] != mode or r["B"] != B:
            continue
        p = r["provider"]
        if p in LOSS_FREE:
            if r["precision"] != precision:
                continue
            label = PLAIN[p]
        elif r["loss"] != loss:
            continue
        elif r["precision"] == precision:
            label = p
        elif precision == "fp32" and r["precision"] == "fp32-simt" and p == "magloss":
            label = "magloss (fp32-simt)"
        else:
            continue
        out.setdefault(label, {})[r["C"]] = r
    return out


def _style(label: str) -> dict:
    key = label.split(" (")[0] if label not in STYLE else label
    return dict(STYLE.get(key, {}), ms=5)


def _value(kind: str, rec: dict, ref: Optional[dict]) -> Optional[float]:
    if rec["status"] != "ok":
        return None
    if kind == "time":
        return rec["median_ms"]
    if kind == "memory":
        return rec["peak_extra_mb"]
    if ref is None or ref["status"] != "ok" or not ref["median_ms"]:
        return None
    return rec["median_ms"] / ref["median_ms"]


def _c_label(c: int) -> str:
    if c >= 1_000_000 and c % 1_000_000 == 0:
        return f"{c // 1_000_000}M"
    if c >= 1000:
        return f"{c / 1000:.4g}k"
    return str(c)


def figure(doc: dict, B: int, kind: str, mode: str, path: Path) -> Path:
    results = doc["results"]
    precisions = [p for p in ("fp32", "tf32", "bf16") if any(r["precision"] == p for r in results)]
    if not precisions:   # e.g. a run with fp32-simt only
        precisions = ["fp32"]
    losses = [l for l in ("arcface", "magface", "cosface") if any(r["loss"] == l for r in results)] or ["arcface"]
    fig, axes = plt.subplots(len(precisions), len(losses), figsize=(4.6 * len(losses), 3.6 * len(precisions)),
                             squeeze=False, sharex=True)
    ylabel = {"time": "median ms per call", "memory": "peak extra MB", "ratio_eager": "time / eager",
              "ratio_floor": "time / floor"}[kind]
    all_C = sorted({r["C"] for r in results if r["B"] == B})
    no_mem = kind == "memory" and all(r.get("peak_extra_mb") is None for r in results)
    handles = {}
    for i, prec in enumerate(precisions):
        for j, loss in enumerate(losses):
            ax = axes[i][j]
            series = _series(results, mode, B, prec, loss)
            ref_label = {"ratio_eager": "eager", "ratio_floor": PLAIN["floor"]}.get(kind)
            ooms = []
            for label, pts in sorted(series.items()):
                if ref_label == label:
                    continue
                xs, ys = [], []
                for C in sorted(pts):
                    rec = pts[C]
                    ref = series.get(ref_label, {}).get(C) if ref_label else None
                    if ref_label and label == "magloss (fp32-simt)" and kind == "ratio_eager":
                        ref = series.get("eager", {}).get(C)       # SIMT vs eager fp32 (the 1080 Ti target)
                    if rec["status"] == "oom":
                        ooms.append(f"{label}@{C:,}")
                    v = _value("ratio" if kind.startswith("ratio") else kind, rec, ref)
                    if v is not None:
                        xs.append(C)
                        ys.append(v)
                if xs:
                    (h,) = ax.plot(xs, ys, label=label, **_style(label))
                    handles.setdefault(label, h)
            if kind.startswith("ratio"):
                ax.axhline(1.0, color="black", lw=0.8)
                tgt = (TARGET_EAGER if kind == "ratio_eager" else TARGET_FLOOR).get(prec)
                if tgt:
                    ax.axhline(tgt, color="#d62728", lw=1.0, ls="--")
                    ax.text(0.01, tgt, f" target {tgt}×", color="#d62728", fontsize=7, va="bottom",
                            transform=ax.get_yaxis_transform())
            ax.set_xscale("log")
            if all_C:
                ax.set_xlim(all_C[0] / 1.25, all_C[-1] * 1.25)
            ax.set_xticks(all_C)
            ax.set_xticklabels([_c_label(c) for c in all_C])
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            if ax.has_data():
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                lo, hi = ax.get_ylim()
                few = hi / max(lo, 1e-12) < 12          # under ~one decade: label the minor ticks too
                ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _, f=few: f"{v:g}" if f else ""))
            ax.set_title(f"{loss} · {prec} · {mode}", fontsize=10)
            if no_mem:
                ax.text(0.5, 0.5, "no allocator statistics\n(CPU run)", ha="center", va="center",
                        transform=ax.transAxes, color="gray")
            if ooms:
                ax.text(0.02, 0.02, "OOM: " + ", ".join(ooms), fontsize=7, color="#d62728",
                        transform=ax.transAxes, va="bottom")
            if i == len(precisions) - 1:
                ax.set_xlabel("classes C")
            if j == 0:
                ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.25)
    env = doc.get("env", {})
    D = sorted({r["D"] for r in results})
    fig.suptitle(f"{ylabel} vs C — B={B}, D={','.join(map(str, D))} — {env.get('gpu', '?')}, "
                 f"torch {env.get('torch', '?')}, commit {str(env.get('commit'))[:8]}", fontsize=11)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(6, len(handles)),
                   fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(json_path, outdir=None, mode: str = "full") -> List[Path]:
    json_path = Path(json_path)
    doc = json.loads(json_path.read_text())
    outdir = Path(outdir) if outdir else json_path.parent
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for B in sorted({r["B"] for r in doc["results"]}):
        for kind in ("time", "memory", "ratio_eager", "ratio_floor"):
            paths.append(figure(doc, B, kind, mode, outdir / f"{json_path.stem}_B{B}_{kind}.png"))
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="a results JSON written by benchmarks/run.py")
    ap.add_argument("--mode", default="full", choices=["fwd", "bwd", "full"])
    ap.add_argument("--outdir", help="default: next to the JSON")
    args = ap.parse_args(argv)
    for p in make_plots(args.json, args.outdir, args.mode):
        print(p)


if __name__ == "__main__":
    sys.exit(main())
