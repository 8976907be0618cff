"""The demo's measurements of one trained model on identities never seen in training:
open-set verification, identification, clustering, the magnitude under graded degradations,
and the error-versus-reject curve with the magnitude as quality."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch

from magloss import evaluation as ev
from magloss import quality as mq

from . import data as dd
from .model import embed

#: Folds of the balanced verification accuracy: the held-out pairs of every seed must fill them.
FOLDS = 10


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
    lab = held_labels.numpy()
    emb = embed(model, held_images, device)
    pairs = open_set_pairs(lab, args.max_genuine_pairs, args.impostor_ratio, seed + 7)
    out: Dict = {}
    out["verification"], out["_roc"] = _verification(emb, pairs)
    out["identification"] = _identification(emb, held_labels, args.enroll, seed + 11)
    if args.cluster:
        out["clustering"] = ev.clustering_scores(lab, ev.cluster_embeddings(emb, int(held_labels.max()) + 1,
                                                                             method="kmeans", seed=seed))
    gen = torch.Generator().manual_seed(seed + 13)   # the degradations, then the mixed set
    out["magnitude_vs_degradation"], out["_relative_magnitude"] = _degradation(model, held_images, levels,
                                                                               device, gen)
    out["error_versus_reject"] = _error_versus_reject(model, held_images, pairs, levels, args.fmr, device, gen)
    out["clean_magnitude_mean"] = float(emb.norm(dim=1).mean())
    out["training"] = _training_summary(trained)
    return out


def _verification(emb: torch.Tensor, pairs):
    """(figures, ROC arrays) of the clean pairs: the balanced 10-fold accuracy, AUC, TAR@FAR."""
    ia, ib, same, bal = pairs
    scores = ev.cosine_scores(emb[ia], emb[ib]).numpy()
    kf = ev.kfold_verification(scores[bal], same[bal], n_folds=FOLDS)
    roc = ev.roc(scores, same)
    n_imp = int((~same).sum())
    fars = [f for f in (1e-3, 1e-2, 1e-1) if f * n_imp >= 1]
    return {
        "genuine_pairs": int(same.sum()),
        "impostor_pairs": n_imp,
        "accuracy": kf["accuracy_mean"],
        "accuracy_fold_std": kf["accuracy_std"],
        "auc": roc["auc"],
        "tar_at_far": {f"{f:g}": v for f, v in ev.tar_at_far(scores, same, fars).items()},
    }, {"fpr": np.asarray(roc["fpr"]), "tpr": np.asarray(roc["tpr"])}


def _identification(emb: torch.Tensor, labels: torch.Tensor, enroll: int, seed: int) -> Dict[str, float]:
    """1:N rank-1 accuracy: the gallery = templates of ``enroll`` random images per identity
    (mean and MagFace+ magnitude-weighted), the probes = the other images."""
    lab = labels.numpy()
    rng = np.random.default_rng(seed)
    enroll_mask = np.zeros(len(lab), dtype=bool)
    for c in range(int(labels.max()) + 1):
        idx = np.flatnonzero(lab == c)
        enroll_mask[rng.choice(idx, size=min(enroll, len(idx) - 1), replace=False)] = True
    ident = {}
    for method in ("mean", "magnitude"):
        tmpl, ids = mq.aggregate_templates(emb[enroll_mask], labels[enroll_mask], method=method)
        r = ev.identification_topk(emb[~enroll_mask], labels[~enroll_mask], tmpl, ids, topk=(1,), backend="torch")
        ident[f"top1_{method}_template"] = r["top1"]
    return ident


def _degradation(model, images: torch.Tensor, levels: Sequence[float], device, gen: torch.Generator):
    """(figures per kind, relative magnitudes per kind): the magnitude of every image at every
    severity of each degradation, its Spearman correlation with the level, and whether the
    mean falls at every level."""
    deg, rel = {}, {}
    for kind in dd.DEGRADATIONS:
        m = torch.stack([embed(model, dd.degrade(images, kind, sev, gen), device).norm(dim=1) for sev in levels])
        means = m.mean(dim=1)
        rel[kind] = (m / means[0]).numpy()
        deg[kind] = {
            "mean_magnitude": means.tolist(),
            "relative_magnitude": (means / means[0]).tolist(),
            "spearman_rho": _spearman(np.repeat(np.arange(len(levels)), m.shape[1]), m.flatten().numpy()),
            "monotonic_decrease": bool((means[1:] < means[:-1]).all()),
        }
    return deg, rel


def _error_versus_reject(model, images: torch.Tensor, pairs, levels: Sequence[float], fmr: float, device,
                         gen: torch.Generator) -> Dict:
    """On a mixed-quality copy (each image a random kind and level): FNMR at ``fmr`` as the
    lowest-quality pairs are rejected, quality = the pair's smaller magnitude, against the
    known level (worst first) as the oracle."""
    ia, ib, same, bal = pairs
    n = images.shape[0]
    kinds = torch.randint(len(dd.DEGRADATIONS), (n,), generator=gen)
    lv = torch.randint(len(levels), (n,), generator=gen)
    mixed = images.clone()
    for k, kind in enumerate(dd.DEGRADATIONS):
        sel = kinds == k
        mixed[sel] = dd.degrade(images[sel], kind, torch.as_tensor(levels)[lv[sel]], gen)
    memb = embed(model, mixed, device)
    mmag = memb.norm(dim=1)
    ms = ev.cosine_scores(memb[ia], memb[ib]).numpy()
    pq = mq.pair_quality(mmag[ia], mmag[ib])
    fractions = [i / 20 for i in range(0, 17)]
    erc = mq.error_versus_reject(ms, same, pq, fmr=fmr, reject_fractions=fractions)
    oracle_q = -torch.maximum(lv[ia], lv[ib]).double()
    erc_oracle = mq.error_versus_reject(ms, same, oracle_q, fmr=fmr, reject_fractions=fractions)
    return {
        "fmr": fmr,
        "reject_fraction": erc["reject_fraction"],
        "fnmr_magnitude": erc["fnmr"],
        "fnmr_oracle_level": erc_oracle["fnmr"],
        "mixed_set_accuracy": ev.kfold_verification(ms[bal], same[bal], n_folds=FOLDS)["accuracy_mean"],
        "spearman_magnitude_vs_level": _spearman(lv.numpy(), mmag.numpy()),
    }


def _training_summary(trained) -> Dict:
    """The last tenth of the training history: loss, batch accuracy, mean magnitude; steps and seconds."""
    h = trained["history"]
    tail = max(1, len(h["loss"]) // 10)
    return {
        "steps": len(h["loss"]),
        "seconds": trained["train_seconds"],
        "final_loss_mean_last10pct": float(np.mean(h["loss"][-tail:])),
        "final_train_accuracy_last10pct": float(np.mean(h["train_accuracy"][-tail:])),
        "final_mean_magnitude": float(np.mean(h["mean_magnitude"][-tail:])),
    }
