"""magloss demo: train a small CNN with MagFace (and ArcFace for comparison), verify unseen
identities, and show that the feature magnitude works as a quality score.

Run ``python -m magloss.demo`` (CPU, a few minutes, no download: scikit-learn's built-in
digits) or ``python -m magloss.demo --data DIR`` for a folder of aligned face images, one
sub-folder per identity. ``--device cuda`` runs the same losses through the fused kernels.

What it does:

1. splits the classes into training classes and held-out classes never seen in training;
2. trains the same CNN (ending in ``BatchNorm1d(Linear(x))`` as MagFace's iresnet, so it
   can set the feature magnitude freely) with ``magloss.MagFaceLoss`` and, unless
   ``--no-arcface``, with ``magloss.ArcFaceLoss``;
3. on the held-out classes: 10-fold verification accuracy (LFW protocol), ROC and
   TAR@FAR, rank-1 identification against class templates, k-means clustering;
4. degrades the held-out images at graded severities (blur, noise, occlusion) and
   measures the magnitude at each level (Spearman correlation of magnitude vs level);
5. on a mixed-quality set of held-out pairs, the error-versus-reject curve with the
   pair quality = the smaller magnitude;
6. writes ``report.json`` and PNG plots to ``--out`` and prints a summary table.

Needs the demo extra: ``pip install 'magloss[demo]'`` (scikit-learn, matplotlib, tqdm).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import _demo_data as dd
from . import evaluation as ev
from . import quality as mq


def _require_extras():
    missing = []
    for mod in ("sklearn", "matplotlib", "tqdm", "scipy"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ImportError(
            f"the magloss demo needs {', '.join(missing)}: pip install 'magloss[demo]' "
            "(scikit-learn, matplotlib, tqdm)"
        )


# ----------------------------------------------------------------------------- model
class SmallCNN(nn.Module):
    """A small backbone for ``[N, C, S, S]`` images, ``S`` divisible by 4.

    Two conv stages (each 2 × (3×3 conv, BN, PReLU), then 2×2 max-pool), then
    ``BN2d → dropout → flatten → Linear → BatchNorm1d``: the last BatchNorm (with a
    learnable scale) lets the network put the feature magnitude anywhere, as MagFace's
    iresnet ``features`` layer. Output: ``[N, embedding_size]`` float, NOT normalized.
    """

    def __init__(self, in_channels: int, image_size: int, embedding_size: int = 128, width: int = 32,
                 dropout: float = 0.0, init_magnitude: Optional[float] = None):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"--image-size must be divisible by 4, got {image_size}")

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout)]

        w = width
        self.body = nn.Sequential(
            *block(in_channels, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            nn.BatchNorm2d(2 * w), nn.Dropout(dropout), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * w * (image_size // 4) ** 2, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        if init_magnitude is not None:
            # BN output has unit variance per dimension, so ||x|| starts near gamma * sqrt(D)
            nn.init.constant_(self.features.weight, float(init_magnitude) / math.sqrt(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(self.body(x)))


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Embeddings ``[N, D]`` (float32, CPU) of ``images`` in eval mode."""
    model.eval()
    out = [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


# ----------------------------------------------------------------------------- training
def make_loss(name: str, args, embedding_size: int, num_classes: int) -> nn.Module:
    import magloss

    if name == "magface":
        return magloss.MagFaceLoss(
            embedding_size, num_classes, scale=args.scale, l_a=args.l_a, u_a=args.u_a,
            l_m=args.l_m, u_m=args.u_m, lambda_g=args.lambda_g,
        )
    if name == "arcface":
        return magloss.ArcFaceLoss(embedding_size, num_classes, scale=args.scale, margin=args.arcface_margin)
    raise ValueError(name)


def train_one(name: str, args, images, labels, num_classes: int, device: torch.device, progress: bool) -> Dict:
    """Train backbone + loss head (``name``: "magface" or "arcface") for ``args.steps`` steps.

    ``images``: ``[N, C, S, S]`` float in [0, 1], ``labels``: ``[N]`` int64 in
    ``0..num_classes-1``. Returns ``{"model", "head", "history", "train_seconds"}``;
    ``history`` holds per-step loss, CE part, regularizer part (MagFace), mean
    magnitude and batch accuracy (argmax cosine, no margin).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model = SmallCNN(images.shape[1], images.shape[-1], args.embedding_size, args.width,
                     dropout=args.dropout, init_magnitude=args.init_magnitude).to(device)
    head = make_loss(name, args, args.embedding_size, num_classes).to(device)
    # no weight decay on the last BatchNorm: it sets the magnitude, which the loss must control
    feat = list(model.features.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in feat)]
    groups = [
        {"params": rest + list(head.parameters()), "weight_decay": args.weight_decay},
        {"params": feat, "weight_decay": 0.0},
    ]
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm)))
    )
    n = images.shape[0]
    hist = {"loss": [], "ce": [], "reg": [], "mean_magnitude": [], "train_accuracy": []}
    perm = torch.randperm(n, generator=gen)
    pos = 0
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"train {name:7s}", disable=not progress, leave=True, dynamic_ncols=True)
    model.train()
    for step in bar:
        if pos + args.batch_size > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        x = dd.random_shift(images[idx], args.shift, gen)
        x = dd.random_degrade(x, args.train_degrade, gen)
        x, y = x.to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
        emb = model(x)
        if name == "magface":
            parts = head(emb, y, return_parts=True)
            loss, ce, reg = parts.loss, float(parts.ce.detach()), float(parts.reg.detach())
        else:
            loss = head(emb, y)
            ce, reg = float(loss.detach()), float("nan")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            w = torch.nn.functional.normalize(head.weight.detach(), dim=1)
            acc = float(((torch.nn.functional.normalize(emb.detach(), dim=1) @ w.T).argmax(1) == y).float().mean())
            mag = float(emb.detach().norm(dim=1).mean())
        hist["loss"].append(float(loss.detach()))
        hist["ce"].append(ce)
        hist["reg"].append(reg)
        hist["mean_magnitude"].append(mag)
        hist["train_accuracy"].append(acc)
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{float(loss.detach()):.2f}", mag=f"{mag:.1f}", acc=f"{acc:.2f}")
    bar.close()
    return {"model": model, "head": head, "history": hist, "train_seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- evaluation
def _spearman(x: Sequence[float], y: Sequence[float]) -> Dict:
    from scipy.stats import spearmanr

    r = spearmanr(x, y)
    return {"rho": float(r.statistic if hasattr(r, "statistic") else r[0]), "p_value": float(r.pvalue if hasattr(r, "pvalue") else r[1])}


def evaluate(name, trained, args, held_images, held_labels, device, levels) -> Dict:
    """All held-out measurements of one trained model.

    ``held_images``: ``[N, C, S, S]`` float in [0, 1] of classes never seen in training,
    ``held_labels``: ``[N]`` int64 in ``0..K-1``; ``levels``: degradation severities.
    Returns a JSON-ready dict (plus ``_roc`` with numpy arrays for the plot): open-set
    verification, identification, clustering, magnitude vs degradation, error versus
    reject, training summary.
    """
    model = trained["model"]
    out: Dict = {}
    n_held = int(held_labels.max()) + 1

    # -- open-set verification on clean held-out images
    emb = embed(model, held_images, device)
    mags = emb.norm(dim=1)
    ia, ib, same = ev.sample_pairs(held_labels.numpy(), args.pairs, seed=args.seed + 7)
    scores = ev.cosine_scores(emb[ia], emb[ib]).numpy()
    kf = ev.kfold_verification(scores, same, n_folds=10)
    roc = ev.roc(scores, same)
    fars = [f for f in (1e-3, 1e-2, 1e-1) if f * (~same).sum() >= 1]
    out["verification"] = {
        "num_pairs": int(len(same)),
        "accuracy_mean": kf["accuracy_mean"],
        "accuracy_std": kf["accuracy_std"],
        "chance": 0.5,
        "auc": roc["auc"],
        "tar_at_far": {f"{f:g}": v for f, v in ev.tar_at_far(scores, same, fars).items()},
    }
    out["_roc"] = roc

    # -- 1:N identification: gallery = templates of the first `enroll` images per class
    rng = np.random.default_rng(args.seed + 11)
    enroll_mask = np.zeros(len(held_labels), dtype=bool)
    for c in range(n_held):
        idx = np.flatnonzero(held_labels.numpy() == c)
        enroll_mask[rng.choice(idx, size=min(args.enroll, len(idx) - 1), replace=False)] = True
    ident = {"gallery_images_per_class": args.enroll, "chance_top1": 1.0 / n_held}
    for method in ("mean", "magnitude"):
        tmpl, ids = mq.aggregate_templates(emb[enroll_mask], held_labels[enroll_mask], method=method)
        r = ev.identification_topk(emb[~enroll_mask], held_labels[~enroll_mask], tmpl, ids, topk=(1,), backend="torch")
        ident[f"top1_{method}_template"] = r["top1"]
    out["identification"] = ident

    # -- clustering of the held-out embeddings
    if args.cluster:
        pred = ev.cluster_embeddings(emb, n_held, method="kmeans", seed=args.seed)
        out["clustering"] = ev.clustering_scores(held_labels.numpy(), pred)

    # -- magnitude vs graded degradation
    gen = torch.Generator().manual_seed(args.seed + 13)
    deg = {}
    for kind in dd.DEGRADATIONS:
        means, stds, all_lv, all_mag = [], [], [], []
        for li, sev in enumerate(levels):
            m = embed(model, dd.degrade(held_images, kind, sev, gen), device).norm(dim=1)
            means.append(float(m.mean()))
            stds.append(float(m.std()))
            all_lv += [li] * len(m)
            all_mag += m.tolist()
        sp = _spearman(all_lv, all_mag)
        level_sp = _spearman(list(range(len(levels))), means)
        deg[kind] = {
            "severity": list(levels),
            "mean_magnitude": means,
            "std_magnitude": stds,
            "relative_magnitude": [v / means[0] for v in means],
            "spearman_rho": sp["rho"],
            "spearman_p": sp["p_value"],
            "level_means_spearman_rho": level_sp["rho"],
            "monotonic_decrease": all(b < a for a, b in zip(means, means[1:])),
        }
    rhos = [deg[k]["spearman_rho"] for k in dd.DEGRADATIONS]
    deg["mean_spearman_rho"] = float(np.mean(rhos))
    out["magnitude_vs_degradation"] = deg

    # -- error-versus-reject on a mixed-quality set: each image gets a random kind and level
    kinds = torch.randint(len(dd.DEGRADATIONS), (len(held_labels),), generator=gen)
    lv = torch.randint(len(levels), (len(held_labels),), generator=gen)
    mixed = held_images.clone()
    for k, kind in enumerate(dd.DEGRADATIONS):
        m = kinds == k
        mixed[m] = dd.degrade(held_images[m], kind, torch.as_tensor(levels)[lv[m]], gen)
    memb = embed(model, mixed, device)
    mmag = memb.norm(dim=1)
    ia, ib, same = ev.sample_pairs(held_labels.numpy(), args.pairs, seed=args.seed + 17)
    ms = ev.cosine_scores(memb[ia], memb[ib]).numpy()
    pq = mq.pair_quality(mmag[ia], mmag[ib])
    fractions = [i / 20 for i in range(0, 17)]
    erc = mq.error_versus_reject(ms, same, pq, fmr=args.fmr, reject_fractions=fractions)
    # reference: rejecting by the known (oracle) degradation level, worst first
    oracle_q = -torch.maximum(lv[ia], lv[ib]).double()
    erc_oracle = mq.error_versus_reject(ms, same, oracle_q, fmr=args.fmr, reject_fractions=fractions)
    kmix = ev.kfold_verification(ms, same, n_folds=10)
    out["error_versus_reject"] = {
        "fmr": args.fmr,
        "reject_fraction": erc["reject_fraction"],
        "fnmr_magnitude": erc["fnmr"],
        "fnmr_oracle_level": erc_oracle["fnmr"],
        "threshold": erc["threshold"],
        "mixed_set_accuracy_mean": kmix["accuracy_mean"],
        "mixed_set_accuracy_std": kmix["accuracy_std"],
        "spearman_magnitude_vs_level": _spearman(lv.tolist(), mmag.tolist())["rho"],
    }
    if hasattr(trained["head"], "l_a"):
        q = mq.quality_score(magnitudes=mags, loss=trained["head"])
        out["clean_quality_score_mean"] = float(q.mean())
    out["clean_magnitude_mean"] = float(mags.mean())
    h = trained["history"]
    tail = max(1, len(h["loss"]) // 10)
    out["training"] = {
        "steps": len(h["loss"]),
        "seconds": trained["train_seconds"],
        "final_loss_mean_last10pct": float(np.mean(h["loss"][-tail:])),
        "final_train_accuracy_last10pct": float(np.mean(h["train_accuracy"][-tail:])),
        "final_mean_magnitude": float(np.mean(h["mean_magnitude"][-tail:])),
    }
    return out


# ----------------------------------------------------------------------------- plots
def _smooth(v: Sequence[float], k: int) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    if k <= 1 or len(v) < k:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    return (c[k:] - c[:-k]) / k


def make_plots(out_dir: str, results: Dict, histories: Dict) -> List[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    colors = {"magface": "tab:blue", "arcface": "tab:orange"}
    files = []

    def save(fig, name):  # the common finish of every figure
        for a in fig.axes:
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=8)
        fig.tight_layout()
        files.append(os.path.join(out_dir, name))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    # loss curves + magnitude during training
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, h in histories.items():
        k = max(1, len(h["loss"]) // 50)
        x = np.arange(len(_smooth(h["loss"], k))) + k
        axes[0].plot(x, _smooth(h["loss"], k), color=colors[name], label=f"{name} total")
        if name == "magface":
            axes[0].plot(x, _smooth(h["ce"], k), color=colors[name], ls="--", label="magface CE part")
        axes[1].plot(x, _smooth(h["train_accuracy"], k), color=colors[name], label=name)
        axes[2].plot(x, _smooth(h["mean_magnitude"], k), color=colors[name], label=name)
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[1].set(title="training accuracy (batch, no margin)", xlabel="step", ylim=(0, 1.02))
    axes[2].set(title="mean feature magnitude", xlabel="step", ylabel="||x||")
    save(fig, "loss_curves.png")

    # magnitude vs degradation (relative to the clean magnitude, so models compare)
    kinds = dd.DEGRADATIONS
    fig, axes = plt.subplots(1, len(kinds), figsize=(14, 3.8), sharey=True)
    for a, kind in zip(axes, kinds):
        for name, r in results.items():
            d = r["magnitude_vs_degradation"][kind]
            rel = np.asarray(d["relative_magnitude"])
            err = np.asarray(d["std_magnitude"]) / d["mean_magnitude"][0]
            a.errorbar(d["severity"], rel, yerr=err, color=colors[name], marker="o", capsize=3,
                       label=f"{name} (ρ={d['spearman_rho']:.2f}, clean |x|={d['mean_magnitude'][0]:.1f})")
        a.set(title=f"{kind}", xlabel="severity (0 = clean)")
    axes[0].set_ylabel("magnitude / clean magnitude")
    fig.suptitle("feature magnitude vs degradation, held-out classes (mean ± std)")
    save(fig, "magnitude_vs_degradation.png")

    # error versus reject
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, r in results.items():
        e = r["error_versus_reject"]
        ax.plot(e["reject_fraction"], e["fnmr_magnitude"], color=colors[name], marker="o", ms=3, label=f"{name}: reject by magnitude")
        ax.plot(e["reject_fraction"], e["fnmr_oracle_level"], color=colors[name], ls=":", label=f"{name}: reject by true degradation level")
        ax.axhline(e["fnmr_magnitude"][0], color=colors[name], lw=0.8, alpha=0.5)
    ax.set(title=f"error vs reject, mixed-quality held-out pairs (FMR={next(iter(results.values()))['error_versus_reject']['fmr']:g})",
           xlabel="fraction of pairs rejected (lowest quality first)", ylabel="FNMR")
    save(fig, "error_vs_reject.png")

    # ROC
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for name, r in results.items():
        roc = r["_roc"]
        ax.plot(roc["fpr"], roc["tpr"], color=colors[name], label=f"{name} (AUC={roc['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=0.8)
    ax.set(title="ROC, clean held-out pairs", xlabel="false accept rate", ylabel="true accept rate")
    save(fig, "roc.png")
    return files


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m magloss.demo",
        description="Train a small CNN with MagFace (and ArcFace), verify held-out identities, and show magnitude as quality.",
    )
    p.add_argument("--data", default=None, help="folder of aligned face images, one sub-folder per identity (default: scikit-learn digits, no download)")
    p.add_argument("--out", default="magloss_demo_out", help="output directory for report.json and the PNGs (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1200, help="training steps per model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--image-size", type=int, default=None, help="default: 16 for digits, 32 for --data")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="image channels for --data (default: %(default)s)")
    p.add_argument("--max-per-class", type=int, default=None, help="cap images per identity for --data")
    p.add_argument("--holdout-classes", type=int, default=None, help="classes held out for open-set tests (default: 3 for digits, 20%% for --data)")
    p.add_argument("--embedding-size", type=int, default=128)
    p.add_argument("--width", type=int, default=16, help="channels of the first conv stage (default: %(default)s)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout before the embedding layer (default: %(default)s)")
    p.add_argument("--init-magnitude", type=float, default=22.6,
                   help="initial feature magnitude, via the last BatchNorm's scale; MagFace's iresnet starts at sqrt(512)=22.6 (default: %(default)s)")
    p.add_argument("--shift", type=int, default=1, help="random translation augmentation, pixels (default: %(default)s)")
    p.add_argument("--train-degrade", type=float, default=0.5,
                   help="probability that a training image gets a random blur/noise/occlusion of random severity, for both losses (default: %(default)s)")
    p.add_argument("--scale", type=float, default=64.0)
    p.add_argument("--l-a", type=float, default=10.0)
    p.add_argument("--u-a", type=float, default=110.0)
    p.add_argument("--l-m", type=float, default=0.45)
    p.add_argument("--u-m", type=float, default=0.8)
    p.add_argument("--lambda-g", type=float, default=35.0)
    p.add_argument("--arcface-margin", type=float, default=0.5)
    p.add_argument("--no-arcface", action="store_true", help="skip the ArcFace comparison")
    p.add_argument("--no-cluster", dest="cluster", action="store_false", help="skip k-means clustering")
    p.add_argument("--levels", type=int, default=6, help="degradation levels including clean (default: %(default)s)")
    p.add_argument("--pairs", type=int, default=4000, help="verification pairs per set (default: %(default)s)")
    p.add_argument("--enroll", type=int, default=5, help="gallery images per held-out class for identification (default: %(default)s)")
    p.add_argument("--fmr", type=float, default=1e-2, help="FMR of the error-versus-reject curve (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    return p


def _versions() -> Dict[str, Optional[str]]:
    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for mod in ("sklearn", "scipy", "matplotlib", "tqdm"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            v[mod] = None
    try:
        import magloss

        v["magloss"] = getattr(magloss, "__version__", None)
        v["magloss_extension"] = str(magloss.extension_status()) if hasattr(magloss, "extension_status") else None
    except Exception as exc:  # pragma: no cover
        v["magloss"] = f"unavailable: {exc}"
    return v


def _summary(report: Dict) -> str:
    res = report["results"]
    names = list(res)
    rows = [("metric", *names)]

    def row(label, fn, fmt="{:.3f}"):
        vals = []
        for n in names:
            try:
                vals.append(fmt.format(fn(res[n])))
            except (KeyError, TypeError):
                vals.append("-")
        rows.append((label, *vals))

    row("open-set verif. acc (10-fold)", lambda r: f"{r['verification']['accuracy_mean']:.3f} ± {r['verification']['accuracy_std']:.3f}", "{}")
    row("open-set ROC AUC", lambda r: r["verification"]["auc"])
    for far in res[names[0]]["verification"]["tar_at_far"]:
        row(f"TAR @ FAR={far}", lambda r, far=far: r["verification"]["tar_at_far"][far])
    row("rank-1 ident. (mean template)", lambda r: r["identification"]["top1_mean_template"])
    row("rank-1 ident. (MagFace+ tmpl)", lambda r: r["identification"]["top1_magnitude_template"])
    row("clustering pairwise F", lambda r: r["clustering"]["f_score"])
    row("clustering NMI", lambda r: r["clustering"]["nmi"])
    row("clean magnitude (mean)", lambda r: r["clean_magnitude_mean"], "{:.1f}")
    for kind in dd.DEGRADATIONS:
        row(f"Spearman(|x|, {kind})", lambda r, k=kind: r["magnitude_vs_degradation"][k]["spearman_rho"])
        row(f"  |x| severe/clean ({kind})", lambda r, k=kind: r["magnitude_vs_degradation"][k]["relative_magnitude"][-1])
    row("Spearman(|x|, level), mixed set", lambda r: r["error_versus_reject"]["spearman_magnitude_vs_level"])
    row("mixed-set verif. acc", lambda r: r["error_versus_reject"]["mixed_set_accuracy_mean"])
    fmr = res[names[0]]["error_versus_reject"]["fmr"]
    row(f"FNMR@FMR={fmr:g}, no reject", lambda r: r["error_versus_reject"]["fnmr_magnitude"][0])
    i30 = res[names[0]]["error_versus_reject"]["reject_fraction"].index(0.3)
    row("FNMR, 30% lowest |x| rejected", lambda r: r["error_versus_reject"]["fnmr_magnitude"][i30])
    row("train seconds", lambda r: r["training"]["seconds"], "{:.0f}")
    w = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def _verdict(report: Dict) -> Dict:
    res = report["results"]
    mf = res["magface"]
    acc = mf["verification"]["accuracy_mean"]
    deg = mf["magnitude_vs_degradation"]
    rhos = {k: deg[k]["spearman_rho"] for k in dd.DEGRADATIONS}
    v = {
        "open_set_accuracy_above_chance": bool(acc - 2 * mf["verification"]["accuracy_std"] > 0.5 and acc > 0.6),
        "magface_magnitude_falls_with_every_degradation": all(r < 0 for r in rhos.values()),
        "magface_monotonic_per_kind": {k: deg[k]["monotonic_decrease"] for k in dd.DEGRADATIONS},
    }
    notes = [f"MagFace open-set verification accuracy {acc:.3f} on held-out classes (chance 0.5)."]
    notes.append("MagFace Spearman(magnitude, degradation level): " + ", ".join(f"{k} {r:+.3f}" for k, r in rhos.items()) + ".")
    if "arcface" in res:
        ad = res["arcface"]["magnitude_vs_degradation"]
        arh = {k: ad[k]["spearman_rho"] for k in dd.DEGRADATIONS}
        v["magface_clearer_than_arcface"] = {k: rhos[k] < arh[k] for k in dd.DEGRADATIONS}
        v["magface_clearer_than_arcface_on_average"] = bool(deg["mean_spearman_rho"] < ad["mean_spearman_rho"])
        notes.append("ArcFace Spearman(magnitude, degradation level): " + ", ".join(f"{k} {r:+.3f}" for k, r in arh.items()) + ".")
        worse = [k for k in dd.DEGRADATIONS if not v["magface_clearer_than_arcface"][k]]
        if worse:
            notes.append("On " + ", ".join(worse) + " the MagFace magnitude does NOT fall more clearly than ArcFace's (same backbone, same data).")
        e_m, e_a = mf["error_versus_reject"], res["arcface"]["error_versus_reject"]
        i = e_m["reject_fraction"].index(0.3)
        notes.append(
            f"Error-versus-reject at FMR={e_m['fmr']:g}: rejecting the 30% lowest-magnitude pairs takes MagFace's FNMR "
            f"{e_m['fnmr_magnitude'][0]:.3f} -> {e_m['fnmr_magnitude'][i]:.3f}, ArcFace's {e_a['fnmr_magnitude'][0]:.3f} -> {e_a['fnmr_magnitude'][i]:.3f}."
        )
    not_mono = [k for k, ok in v["magface_monotonic_per_kind"].items() if not ok]
    if not_mono:
        notes.append("MagFace mean magnitude is not strictly decreasing level by level for: " + ", ".join(not_mono) + ".")
    if not v["magface_magnitude_falls_with_every_degradation"]:
        notes.append("The MagFace magnitude does not fall with every kind of degradation on this data: see magnitude_vs_degradation.")
    v["notes"] = notes
    return v


def _jsonable(o):
    """Strict JSON: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return float(o) if math.isfinite(float(o)) else None
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def _check_args(args) -> None:
    checks = [
        (args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
        (args.batch_size >= 2, f"--batch-size must be >= 2, got {args.batch_size}"),
        (args.levels >= 2, f"--levels must be >= 2, got {args.levels}"),
        (args.pairs >= 20, f"--pairs must be >= 20 (10 folds of both kinds), got {args.pairs}"),
        (0.0 < args.fmr < 1.0, f"--fmr must be in (0, 1), got {args.fmr}"),
        (args.enroll >= 1, f"--enroll must be >= 1, got {args.enroll}"),
        (0.0 <= args.train_degrade <= 1.0, f"--train-degrade must be in [0, 1], got {args.train_degrade}"),
        (args.embedding_size >= 2, f"--embedding-size must be >= 2, got {args.embedding_size}"),
        (args.width >= 1, f"--width must be >= 1, got {args.width}"),
        (args.holdout_classes is None or args.holdout_classes >= 1, f"--holdout-classes must be >= 1, got {args.holdout_classes}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the demo; returns the report dict (also written to ``<out>/report.json``)."""
    _require_extras()
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    _check_args(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but torch.cuda.is_available() is False")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    if args.data is None:
        size = args.image_size or 16
        images, labels, class_names = dd.load_digits_dataset(size)
        dataset = {"name": "sklearn.datasets.load_digits (ships with scikit-learn; no download)"}
        n_hold = args.holdout_classes or 3
    else:
        size = args.image_size or 32
        images, labels, class_names = dd.load_image_folder(args.data, size, args.channels, max_per_class=args.max_per_class)
        dataset = {"name": f"image folder {os.path.abspath(args.data)}"}
        n_hold = args.holdout_classes or max(2, round(0.2 * len(class_names)))
    train_cls, held_cls = dd.split_classes(len(class_names), n_hold, args.seed)
    tr_x, tr_y = dd.subset(images, labels, train_cls)
    he_x, he_y = dd.subset(images, labels, held_cls)
    dataset.update({
        "images": int(images.shape[0]), "image_shape": list(images.shape[1:]), "classes": len(class_names),
        "train_classes": [class_names[c] for c in train_cls], "held_out_classes": [class_names[c] for c in held_cls],
        "train_images": int(tr_x.shape[0]), "held_out_images": int(he_x.shape[0]),
    })
    levels = dd.severity_levels(args.levels)

    if device.type == "cuda":
        import magloss

        print(f"magloss extension: {magloss.extension_status()}", flush=True)
    names = ["magface"] + ([] if args.no_arcface else ["arcface"])
    results, histories = {}, {}
    for name in names:
        trained = train_one(name, args, tr_x, tr_y, len(train_cls), device, args.progress)
        histories[name] = trained["history"]
        results[name] = evaluate(name, trained, args, he_x, he_y, device, levels)

    files = make_plots(args.out, results, histories)
    report = {
        "command": " ".join(["python -m magloss.demo"] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else list(argv))]),
        "args": vars(args),
        "versions": _versions(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "seed": args.seed,
        "dataset": dataset,
        "model": {
            "backbone": f"SmallCNN(width={args.width}) -> Linear -> BatchNorm1d({args.embedding_size})",
            "magface": {"scale": args.scale, "l_a": args.l_a, "u_a": args.u_a, "l_m": args.l_m, "u_m": args.u_m, "lambda_g": args.lambda_g},
            "arcface": None if args.no_arcface else {"scale": args.scale, "margin": args.arcface_margin},
            "optimizer": f"SGD(momentum=0.9, nesterov, lr={args.lr}, wd={args.weight_decay}), warmup + cosine, {args.steps} steps, batch {args.batch_size}",
            "augmentation": f"random shift ±{args.shift}px; p={args.train_degrade} random blur/noise/occlusion at uniform severity",
        },
        "degradation_severities": levels,
        "results": {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in results.items()},
        "plots": [os.path.basename(f) for f in files],
    }
    report["verdict"] = _verdict(report)
    report["elapsed_seconds"] = time.perf_counter() - t_start
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(_jsonable(report), f, indent=2, allow_nan=False)
    print()
    print(_summary(report))
    print()
    for line in report["verdict"]["notes"]:
        print("* " + line)
    print(f"\nelapsed {report['elapsed_seconds']:.0f} s; report and plots in {os.path.abspath(args.out)}: report.json, "
          + ", ".join(report["plots"]))
    return report


if __name__ == "__main__":
    main()
