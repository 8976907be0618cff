"""The demo's four figures: training curves, magnitude versus degradation, error versus
reject, ROC; one line (or band) per loss in the loss's colour, pooled or per seed."""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np

from . import data as dd


def _smooth(v: Sequence[float], k: int) -> np.ndarray:
    """Moving average over ``k`` values (``v`` itself when ``k <= 1`` or ``v`` is shorter)."""
    v = np.asarray(v, dtype=float)
    if k <= 1 or len(v) < k:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    return (c[k:] - c[:-k]) / k


def make_plots(out_dir: str, runs: Dict, levels: Sequence[float], progress: bool = False) -> List[str]:
    """The four figures, from ``runs[name] = [run_one(...) output per seed]``, written as PNGs
    into ``out_dir``; returns their paths (loss_curves, magnitude_vs_degradation,
    error_vs_reject, roc). The losses get matplotlib's colour cycle in the order of ``runs``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    colors = {name: f"C{i}" for i, name in enumerate(runs)}
    figures = [("loss_curves.png", _training_curves), ("magnitude_vs_degradation.png", _magnitude_vs_degradation),
               ("error_vs_reject.png", _error_vs_reject), ("roc.png", _roc)]
    files = []
    with tqdm(total=len(figures), desc="plot     ", unit="fig", disable=not progress, dynamic_ncols=True) as bar:
        for name, draw in figures:
            fig = draw(plt, runs, colors, levels)
            for a in fig.axes:          # the common finish of every figure
                a.grid(alpha=0.3)
                if a.get_legend_handles_labels()[0]:
                    a.legend(fontsize=7)
            fig.tight_layout()
            files.append(os.path.join(out_dir, name))
            fig.savefig(files[-1], dpi=110)
            plt.close(fig)
            bar.update(1)
    return files


def _training_curves(plt, runs: Dict, colors: Dict[str, str], levels):
    """Loss, batch accuracy and mean magnitude during training, one line per seed."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, rs in runs.items():
        for j, r in enumerate(rs):
            h = r["history"]
            k = max(1, len(h["loss"]) // 50)
            x = np.arange(len(_smooth(h["loss"], k))) + k
            style = {"color": colors[name], "lw": 1.2, "alpha": 1.0 - 0.25 * min(j, 2), "label": f"{name} seed {r['seed']}"}
            for a, key in zip(axes, ("loss", "train_accuracy", "mean_magnitude")):
                a.plot(x, _smooth(h[key], k), **style)
    axes[0].set(title="training loss (MagFace: CE + λ_g·g)", xlabel="step", ylabel="loss")
    axes[1].set(title="training accuracy (batch, plain cosine)", xlabel="step", ylim=(0, 1.02))
    axes[2].set(title="mean feature magnitude (train mode)", xlabel="step", ylabel="||x||")
    return fig


def _magnitude_vs_degradation(plt, runs: Dict, colors: Dict[str, str], levels: Sequence[float]):
    """Per image magnitude / clean mean magnitude at each severity, pooled over seeds: median and middle half."""
    kinds = dd.DEGRADATIONS
    fig, axes = plt.subplots(1, len(kinds), figsize=(14, 3.9), sharey=True)
    for a, kind in zip(axes, kinds):
        for name, rs in runs.items():
            rel = np.concatenate([r["result"]["_relative_magnitude"][kind] for r in rs], axis=1)
            q25, q50, q75 = np.percentile(rel, [25, 50, 75], axis=1)
            rhos = [r["result"]["magnitude_vs_degradation"][kind]["spearman_rho"] for r in rs]
            a.plot(levels, q50, color=colors[name], marker="o",
                   label=f"{name}: median (ρ {min(rhos):+.2f} … {max(rhos):+.2f} over seeds)")
            a.fill_between(levels, q25, q75, color=colors[name], alpha=0.25, label=f"{name}: middle 50% of images")
        a.axhline(1.0, color="gray", lw=0.8)
        a.set(title=kind, xlabel="severity (0 = clean)")
    axes[0].set_ylabel("magnitude / clean mean magnitude")
    n_seeds = len(next(iter(runs.values())))
    fig.suptitle(f"feature magnitude vs degradation: held-out identities, images of {n_seeds} seed(s) pooled")
    return fig


def _error_vs_reject(plt, runs: Dict, colors: Dict[str, str], levels):
    """FNMR as the lowest-quality pairs are rejected: mean over seeds, min-max band, and the oracle."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, rs in runs.items():
        e0 = rs[0]["result"]["error_versus_reject"]
        fr = e0["reject_fraction"]
        f = np.array([r["result"]["error_versus_reject"]["fnmr_magnitude"] for r in rs], dtype=float)
        o = np.array([r["result"]["error_versus_reject"]["fnmr_oracle_level"] for r in rs], dtype=float)
        ax.plot(fr, f.mean(0), color=colors[name], marker="o", ms=3, label=f"{name}: reject by magnitude (mean)")
        ax.fill_between(fr, f.min(0), f.max(0), color=colors[name], alpha=0.2, label=f"{name}: min–max over seeds")
        ax.plot(fr, o.mean(0), color=colors[name], ls=":", label=f"{name}: reject by true degradation level (mean)")
    ax.set(title=f"error vs reject, mixed-quality held-out pairs (FMR={e0['fmr']:g})",
           xlabel="fraction of pairs rejected (lowest quality first)", ylabel="FNMR")
    return fig


def _roc(plt, runs: Dict, colors: Dict[str, str], levels):
    """ROC of the clean pairs with a logarithmic FAR axis, one line per seed."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    lo = 1.0
    for name, rs in runs.items():
        for j, r in enumerate(rs):
            roc = r["result"]["_roc"]
            keep = roc["fpr"] > 0
            lo = min(lo, float(roc["fpr"][keep].min()))
            ax.plot(roc["fpr"][keep], roc["tpr"][keep], color=colors[name], alpha=1.0 - 0.25 * min(j, 2),
                    drawstyle="steps-post",
                    label=f"{name} seed {r['seed']} (AUC {r['result']['verification']['auc']:.3f})")
    ax.set_xscale("log")
    ax.set(xlim=(lo, 1.0), ylim=(0, 1.01), title="ROC, clean held-out pairs",
           xlabel="false accept rate (log scale)", ylabel="true accept rate")
    return fig
