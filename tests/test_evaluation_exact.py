"""Exact rank arithmetic, NaN rejection, scalar arguments and unmeasurable rates in
magloss.evaluation and magloss.quality.

Expected values come from brute force over every candidate threshold, with the rate
given as an exact decimal fraction (numerator, denominator) typed into the table, so
no floating-point product decides a count.
"""

import warnings

import numpy as np
import pytest
import torch

from magloss import evaluation as ev
from magloss import quality as mq


def brute_threshold(impostors, num, den):
    """Lowest impostor score t with #(s > t)·den <= num·n (the decision rule score > t)."""
    s = np.asarray(impostors, dtype=np.float64)
    ok = [t for t in np.unique(s) if np.count_nonzero(s > t) * den <= num * s.size]
    return min(ok)


FMR_CASES = [  # scores, fmr as typed, its exact value num/den
    (np.arange(100.0), 0.29, (29, 100)),
    (np.arange(10000.0), 3e-4, (3, 10000)),
    (np.arange(1000.0)[::-1], 0.007, (7, 1000)),
    (np.linspace(-1, 1, 37), 0.1, (1, 10)),
    (np.arange(50.0) % 7, 0.3, (3, 10)),          # ties
    (np.arange(10.0), 0.7, (7, 10)),
]


@pytest.mark.parametrize("scores,fmr,exact", FMR_CASES, ids=[f"n{c[0].size}-fmr{c[1]}" for c in FMR_CASES])
def test_threshold_at_fmr_is_the_lowest_allowed(scores, fmr, exact):
    assert ev.threshold_at_fmr(scores, fmr) == brute_threshold(scores, *exact)


def test_threshold_at_fmr_issue_values():
    # worked by hand: 29 of 100 impostors may pass -> threshold 70 (scores 71..99 pass)
    assert ev.threshold_at_fmr(np.arange(100.0), 0.29) == 70.0
    # 3 of 10000 may pass -> 9996 (9997, 9998, 9999 pass)
    assert ev.threshold_at_fmr(np.arange(10000.0), 3e-4) == 9996.0


@pytest.mark.parametrize("value,n,floor,ceil", [
    (0.29, 100, 29, 29), (3e-4, 10000, 3, 3), (0.1, 70, 7, 7), (0.1, 75, 7, 8),
    (0.57, 100, 57, 57), (1e-3, 999, 0, 1), (0.5, 0, 0, 0),
])
def test_fraction_count_is_exact(value, n, floor, ceil):
    assert ev.fraction_count(value, n) == floor
    assert ev.fraction_count(value, n, "ceil") == ceil


@pytest.mark.parametrize("P,r,rejected", [(100, 0.29, 29), (100, 0.57, 57), (37, 0.3, 11), (1000, 0.001, 1)])
def test_error_versus_reject_rejects_the_exact_count(P, r, rejected):
    # quality = pair index: the first `rejected` pairs go; the genuine pairs among them are known
    rng = np.random.default_rng(P)
    genuine = np.zeros(P, dtype=bool)
    genuine[::2] = True
    scores = rng.normal(size=P)
    # the last rejected pair is a clear false non-match: rejecting one pair fewer changes the FNMR
    genuine[rejected - 1], scores[rejected - 1] = True, -10.0
    out = mq.error_versus_reject(scores, genuine, np.arange(P, dtype=np.float64), fmr=0.5, reject_fractions=[r])
    thr = out["threshold"]
    kept = np.arange(P) >= rejected
    expected = np.count_nonzero(kept & genuine & (scores <= thr)) / np.count_nonzero(kept & genuine)
    assert out["fnmr"] == [expected]
    assert out["reject_fraction"] == [r]


NAN_CALLS = [
    ("impostor_scores", lambda bad: ev.threshold_at_fmr(bad, 0.1)),
    ("scores", lambda bad: ev.kfold_verification(bad, np.arange(8) % 2, n_folds=2)),
    ("scores", lambda bad: ev.best_threshold(bad, np.arange(8) % 2)),
    ("scores", lambda bad: mq.error_versus_reject(bad, np.arange(8) % 2, np.arange(8.0), fmr=0.5)),
    ("quality", lambda bad: mq.error_versus_reject(np.arange(8.0), np.arange(8) % 2, bad, fmr=0.5)),
    ("magnitudes", lambda bad: mq.quality_score(magnitudes=bad, l_a=10, u_a=110)),
    ("quality_a", lambda bad: mq.pair_quality(bad, np.ones(8))),
    ("features", lambda bad: mq.quality_score(torch.tensor(bad).view(4, 2), l_a=10, u_a=110)),
    ("features", lambda bad: mq.aggregate_templates(torch.tensor(bad).view(4, 2))),
    ("emb_a", lambda bad: ev.cosine_scores(torch.tensor(bad).view(4, 2), torch.ones(4, 2))),
    ("probe", lambda bad: ev.identification_topk(torch.tensor(bad).view(4, 2), [0, 1, 2, 3],
                                                 torch.ones(3, 2), [0, 1, 2], backend="torch")),
]


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name,call", NAN_CALLS, ids=[f"{i}-{c[0]}" for i, c in enumerate(NAN_CALLS)])
def test_nan_or_inf_is_an_error_naming_the_argument(name, call, bad_value):
    bad = np.linspace(0.0, 1.0, 8)
    bad[5] = bad_value
    with pytest.raises(ValueError, match=rf"^{name}: expected finite values, got (nan|inf) at index"):
        call(bad)


def test_nan_quality_pair_is_not_kept_as_the_best():
    # before: a NaN quality sorted last (best quality) and was never rejected; now it is an error
    with pytest.raises(ValueError, match="quality"):
        mq.error_versus_reject([0.9, 0.1, 0.8, 0.2], [1, 0, 1, 0], [0.5, float("nan"), 0.7, 0.2], fmr=0.5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_scalar_arguments_equal_one_element_sequences():
    rng = np.random.default_rng(0)
    scores, same = rng.normal(size=400), np.arange(400) % 2 == 0
    scores[same] += 1.0
    assert ev.tar_at_far(scores, same, fars=1e-2) == ev.tar_at_far(scores, same, fars=[1e-2])
    assert ev.tar_at_far(scores, same, fars=np.float64(0.1)) == ev.tar_at_far(scores, same, fars=(0.1,))
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(1))
    lab = torch.arange(30) % 10
    one = ev.identification_topk(x, lab, x[:10], lab[:10], topk=1, backend="torch")
    assert one == ev.identification_topk(x, lab, x[:10], lab[:10], topk=[1], backend="torch")
    out = mq.error_versus_reject(scores, same, np.abs(scores), fmr=0.1, reject_fractions=0.2)
    assert out["reject_fraction"] == [0.2]
    with pytest.raises(ValueError, match="topk"):
        ev.identification_topk(x, lab, x[:10], lab[:10], topk=1.5, backend="torch")
    with pytest.raises(ValueError, match="fars"):
        ev.tar_at_far(scores, same, fars=float("nan"))


def brute_tar(scores, same, num, den):
    """max TPR over thresholds t (pair accepted when score >= t, as sklearn's ROC) with
    false accepts·den <= num·n_impostor."""
    s, y = np.asarray(scores), np.asarray(same, bool)
    best = 0.0
    for t in np.concatenate([np.unique(s), [np.inf]]):
        if np.count_nonzero((s >= t) & ~y) * den <= num * np.count_nonzero(~y):
            best = max(best, np.count_nonzero((s >= t) & y) / np.count_nonzero(y))
    return best


@pytest.mark.parametrize("n_imp,far,exact", [(100, 0.29, (29, 100)), (1000, 0.003, (3, 1000)),
                                             (333, 0.1, (1, 10)), (57, 0.57, (57, 100))])
def test_tar_at_far_counts_false_accepts_exactly(n_imp, far, exact):
    rng = np.random.default_rng(n_imp)
    imp = rng.normal(size=n_imp)
    gen = rng.normal(loc=1.0, size=120)
    scores = np.concatenate([gen, imp])
    same = np.r_[np.ones(120, bool), np.zeros(n_imp, bool)]
    assert ev.tar_at_far(scores, same, fars=far)[far] == brute_tar(scores, same, *exact)


def test_unmeasurable_far_warns():
    scores = np.r_[np.linspace(0.5, 1, 10), np.linspace(0, 0.6, 50)]
    same = np.r_[np.ones(10, bool), np.zeros(50, bool)]
    with pytest.warns(UserWarning, match=r"fars=0.01 is below 1/50"):
        ev.tar_at_far(scores, same, fars=0.01)
    with pytest.warns(UserWarning, match=r"fmr=0.001 is below 1/50"):
        ev.threshold_at_fmr(scores[~same], 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ev.tar_at_far(scores, same, fars=0.02)     # 1 of 50: measurable, no warning
        ev.threshold_at_fmr(scores[~same], 0.02)


def test_return_types_follow_the_convention():
    rng = np.random.default_rng(3)
    scores, same = rng.normal(size=60), np.arange(60) % 3 == 0
    assert type(ev.threshold_at_fmr(scores[~same], 0.1)) is float
    assert type(ev.best_threshold(scores, same)) is float
    assert all(type(v) is float for v in ev.tar_at_far(scores, same, fars=[0.1, 0.5]).values())
    k = ev.kfold_verification(scores, same, n_folds=3)
    assert type(k["accuracy_mean"]) is float and all(type(a) is float for a in k["fold_accuracies"])
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    top = ev.identification_topk(x, torch.arange(10) % 3, x[:3], torch.arange(3), topk=(1, 2), backend="torch")
    # exact ratios of counts (a float32 mean would give e.g. 0.30000001192092896)
    hits1 = sum(int(i % 3 == int(torch.argmax(torch.nn.functional.normalize(x[i], dim=0)
                                               @ torch.nn.functional.normalize(x[:3], dim=1).T)))
                for i in range(10))
    assert top["top1"] == hits1 / 10 and type(top["top1"]) is float
    r = ev.roc(scores, same)
    assert r["fpr"].dtype == np.float64 and type(r["auc"]) is float
    assert isinstance(ev.cosine_scores(x, x), torch.Tensor)
    assert isinstance(mq.quality_score(x, l_a=0.5, u_a=3.0), torch.Tensor)
    e = mq.error_versus_reject(scores, same, np.abs(scores), fmr=0.2)
    assert type(e["threshold"]) is float and all(type(v) is float for v in e["fnmr"])
