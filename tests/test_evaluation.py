"""Metrics of magloss.evaluation against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from magloss import evaluation as ev

sklearn = pytest.importorskip("sklearn")


# ---------------------------------------------------------------- best_threshold
@pytest.mark.parametrize(
    "scores, same, expected",
    [
        # separable: the only perfect cut is between 0.3 and 0.6
        ([0.1, 0.3, 0.6, 0.9], [0, 0, 1, 1], 0.45),
        # one negative above two positives: cutting at (0.5+0.7)/2 makes 1 error,
        # cutting below 0.2 makes 2 errors: the midpoint 0.6 (first best) wins
        ([0.2, 0.5, 0.7, 0.4, 0.8], [1, 0, 1, 0, 1], 0.6),
        # all genuine: "everything matches" = min - 1
        ([0.3, 0.5], [1, 1], 0.3 - 1.0),
        # all impostor: nothing matches at max score
        ([0.3, 0.5], [0, 0], 0.5),
    ],
)
def test_best_threshold_hand_cases(scores, same, expected):
    assert ev.best_threshold(scores, same) == pytest.approx(expected)


# ---------------------------------------------------------------- k-fold
@pytest.mark.parametrize("n_folds", [2, 5, 10])
def test_separable_scores_give_accuracy_one(n_folds):
    rng = np.random.default_rng(0)
    same = np.tile([True, False], 20)
    scores = np.where(same, rng.uniform(0.6, 1.0, 40), rng.uniform(-1.0, 0.4, 40))
    out = ev.kfold_verification(scores, same, n_folds=n_folds)
    assert out["accuracy_mean"] == 1.0
    assert out["accuracy_std"] == 0.0
    assert len(out["fold_accuracies"]) == n_folds
    assert all(0.4 < t < 0.6 for t in out["thresholds"])


def test_kfold_hand_case():
    # 4 folds of 2 pairs; fold 3 holds a noisy genuine pair (0.1) that only its own
    # threshold could fit.
    scores = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.1, 0.35]
    same = [1, 0, 1, 0, 1, 0, 1, 0]
    out = ev.kfold_verification(scores, same, n_folds=4)
    # folds 0..2: train includes (0.1, same) and (0.35, diff); best cut is the midpoint
    # above 0.35 whose error is only the noisy pair, the first such midpoint:
    # fold 0 train scores {0.2,0.7,0.3,0.1,0.35,0.1(diff)...}; compute by hand below.
    assert out["fold_indices"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # fold 3 (test: 0.1 genuine, 0.35 impostor): train = folds 0..2 is separable
    # between 0.3 and 0.7 -> threshold 0.5 -> genuine 0.1 rejected (wrong), 0.35 rejected (right)
    assert out["thresholds"][3] == pytest.approx(0.5)
    assert out["fold_accuracies"][3] == pytest.approx(0.5)
    # fold 0 (test 0.9/0.1): train scores 0.8 0.2 0.7 0.3 0.1 0.35 with labels
    # 1 0 1 0 1 0: best cut (0.35+0.7)/2 = 0.525 (one error)
    assert out["thresholds"][0] == pytest.approx(0.525)
    assert out["fold_accuracies"] == pytest.approx([1.0, 1.0, 1.0, 0.5])
    assert out["accuracy_mean"] == pytest.approx(0.875)
    assert out["accuracy_std"] == pytest.approx(math.sqrt(3 * 0.125**2 + 0.375**2) / 2)


@pytest.mark.parametrize("fold", [0, 3, 9])
def test_threshold_never_chosen_on_its_test_fold(fold):
    rng = np.random.default_rng(1)
    n = 100
    same = rng.random(n) < 0.5
    scores = np.where(same, rng.normal(0.6, 0.2, n), rng.normal(0.2, 0.2, n))
    base = ev.kfold_verification(scores, same, n_folds=10)
    test_idx = base["fold_indices"][fold]
    # The fold's threshold equals the best threshold of the other folds...
    train_idx = np.setdiff1d(np.arange(n), test_idx)
    assert base["thresholds"][fold] == ev.best_threshold(scores[train_idx], same[train_idx])
    # ...and wrecking the test fold's own scores cannot move it.
    wrecked = scores.copy()
    wrecked[test_idx] = np.where(same[test_idx], -5.0, 5.0)
    out = ev.kfold_verification(wrecked, same, n_folds=10)
    assert out["thresholds"][fold] == base["thresholds"][fold]
    assert out["fold_accuracies"][fold] == 0.0


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(scores=[0.1, 0.2], is_same=[1, 0], n_folds=3), ValueError),
        (dict(scores=[0.1, 0.2], is_same=[1, 0, 1], n_folds=2), ValueError),
        (dict(scores=[0.1, float("nan")], is_same=[1, 0], n_folds=2), ValueError),
        (dict(scores=[0.1, 0.2], is_same=[2, 0], n_folds=2), ValueError),
    ],
)
def test_kfold_bad_input(kwargs, err):
    with pytest.raises(err):
        ev.kfold_verification(**kwargs)


# ---------------------------------------------------------------- FMR / TAR@FAR / ROC
@pytest.mark.parametrize(
    "impostors, fmr, expected",
    [
        ([0.85, 0.5, 0.3, 0.2, 0.1], 0.1, 0.85),  # k=0: nothing above the top impostor
        ([0.85, 0.5, 0.3, 0.2, 0.1], 0.2, 0.5),  # k=1: 0.85 may pass
        ([0.85, 0.5, 0.3, 0.2, 0.1], 0.45, 0.3),  # k=floor(2.25)=2
        ([0.1, 0.2, 0.3, 0.4], 0.5, 0.2),  # unsorted input, k=2
    ],
)
def test_threshold_at_fmr(impostors, fmr, expected):
    assert ev.threshold_at_fmr(impostors, fmr) == pytest.approx(expected)


GEN = [0.9, 0.8, 0.7, 0.4]
IMP = [0.85, 0.5, 0.3, 0.2, 0.1]


@pytest.mark.parametrize(
    "far, tar",
    [
        (0.1, 0.25),  # no impostor may pass: accept only 0.9
        (0.2, 0.75),  # 0.85 passes: accept >= 0.7
        (0.39, 0.75),
        (0.4, 1.0),  # 0.85 and 0.5 pass: accept >= 0.4
        (1.0, 1.0),
    ],
)
def test_tar_at_far_small_known_set(far, tar):
    scores = GEN + IMP
    same = [1] * 4 + [0] * 5
    assert ev.tar_at_far(scores, same, fars=[far])[far] == pytest.approx(tar)


def test_roc_auc_hand_case():
    scores = GEN + IMP
    same = [1] * 4 + [0] * 5
    # AUC = P(genuine > impostor) over the 20 genuine/impostor combos:
    # 0.9 beats 5, 0.8 beats 4, 0.7 beats 4, 0.4 beats 3 -> 16/20
    r = ev.roc(scores, same)
    assert r["auc"] == pytest.approx(16 / 20)
    assert r["fpr"][0] == 0.0 and r["tpr"][-1] == 1.0


# ---------------------------------------------------------------- identification
def _ident_case():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    gallery_labels = [10, 11, 12, 13]
    # probe 0 closest to label 10 (correct); probe 1 closest to 11 then 12, label 12
    # (top1 wrong, top2 right); probe 2 closest to 13 then 10, label 11 (wrong at 2).
    probe = torch.tensor([[2.0, 0.1], [-0.5, 1.0], [0.5, -1.0]])
    probe_labels = [10, 12, 11]
    return probe, probe_labels, gallery, gallery_labels


@pytest.mark.parametrize("topk, expected", [((1,), {"top1": 1 / 3}), ((1, 2), {"top1": 1 / 3, "top2": 2 / 3}), ((4, 9), {"top4": 1.0, "top9": 1.0})])
def test_identification_topk_torch(topk, expected):
    probe, pl, gallery, gl = _ident_case()
    out = ev.identification_topk(probe, pl, gallery, gl, topk=topk, backend="torch", batch_size=2)
    assert out == pytest.approx(expected)


def test_identification_faiss_matches_torch():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    g = rng.normal(size=(50, 8)).astype(np.float32)
    p = rng.normal(size=(30, 8)).astype(np.float32)
    gl = rng.integers(0, 10, 50)
    pl = rng.integers(0, 10, 30)
    a = ev.identification_topk(p, pl, g, gl, topk=(1, 5), backend="torch")
    b = ev.identification_topk(p, pl, g, gl, topk=(1, 5), backend="faiss")
    assert a == pytest.approx(b)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(backend="annoy"),
        dict(topk=(0,)),
        dict(gallery_labels=[1, 2]),
    ],
)
def test_identification_bad_input(kwargs):
    probe, pl, gallery, gl = _ident_case()
    args = dict(probe=probe, probe_labels=pl, gallery=gallery, gallery_labels=gl)
    args.update(kwargs)
    with pytest.raises(ValueError):
        ev.identification_topk(**args)


# ---------------------------------------------------------------- clustering
@pytest.mark.parametrize(
    "true, pred, p, r",
    [
        ([0, 0, 1, 1], [0, 0, 1, 1], 1.0, 1.0),
        ([0, 0, 1, 1], [5, 5, 3, 3], 1.0, 1.0),
        # pairs: (01) TP, (02) FP, (12) FP, (23) FN -> P=1/3, R=1/2
        ([0, 0, 1, 1], [0, 0, 0, 1], 1 / 3, 1 / 2),
        # everything in one cluster: TP=2 of 6 pairs -> P=1/3, R=1
        ([0, 0, 1, 1], [0, 0, 0, 0], 1 / 3, 1.0),
    ],
)
def test_clustering_pairwise_fscore(true, pred, p, r):
    out = ev.clustering_scores(true, pred)
    assert out["precision"] == pytest.approx(p)
    assert out["recall"] == pytest.approx(r)
    assert out["f_score"] == pytest.approx(2 * p * r / (p + r))


@pytest.mark.parametrize("true, pred, nmi", [([0, 0, 1, 1], [1, 1, 0, 0], 1.0), ([0, 1, 0, 1], [0, 0, 1, 1], 0.0)])
def test_clustering_nmi(true, pred, nmi):
    assert ev.clustering_scores(true, pred)["nmi"] == pytest.approx(nmi, abs=1e-12)


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_cluster_embeddings_recovers_directions(method):
    rng = np.random.default_rng(0)
    centers = np.eye(3) * 5
    x = np.concatenate([c + 0.1 * rng.normal(size=(10, 3)) for c in centers])
    y = np.repeat([0, 1, 2], 10)
    pred = ev.cluster_embeddings(x, 3, method=method)
    out = ev.clustering_scores(y, pred)
    assert out["f_score"] == pytest.approx(1.0) and out["nmi"] == pytest.approx(1.0)


# ---------------------------------------------------------------- helpers
def test_cosine_scores_hand():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[6.0, 8.0], [0.0, 2.0]])
    assert ev.cosine_scores(a, b).tolist() == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize("num_pairs", [2, 7, 40])
def test_sample_pairs_balanced_and_correct(num_pairs):
    labels = np.array([0, 0, 0, 1, 1, 2])
    a, b, same = ev.sample_pairs(labels, num_pairs, seed=3)
    assert same.sum() == num_pairs // 2
    assert np.array_equal(labels[a] == labels[b], same)
    assert (a != b).all()
    a2, b2, s2 = ev.sample_pairs(labels, num_pairs, seed=3)
    assert np.array_equal(a, a2) and np.array_equal(b, b2) and np.array_equal(same, s2)
