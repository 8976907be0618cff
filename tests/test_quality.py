"""magloss.quality against hand-computed features and curves."""

import math

import pytest
import torch

from magloss import quality as mq


# ---------------------------------------------------------------- magnitudes / scores
def test_feature_magnitude_hand():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-5.0, 12.0]])
    assert mq.feature_magnitude(x).tolist() == pytest.approx([5.0, 0.0, 13.0])


@pytest.mark.parametrize(
    "mags, l_a, u_a, expected",
    [
        ([10.0, 60.0, 110.0], 10.0, 110.0, [0.0, 0.5, 1.0]),
        ([5.0, 200.0, 35.0], 10.0, 110.0, [0.0, 1.0, 0.25]),  # clamped outside [l_a, u_a]
        ([2.0, 3.0], 1.0, 5.0, [0.25, 0.5]),
    ],
)
def test_quality_score_from_magnitudes(mags, l_a, u_a, expected):
    assert mq.quality_score(magnitudes=mags, l_a=l_a, u_a=u_a).tolist() == pytest.approx(expected)


def test_quality_score_takes_range_from_loss_and_features():
    class FakeLoss:
        l_a, u_a = 10.0, 110.0

    x = torch.tensor([[36.0, 48.0]])  # |x| = 60
    assert mq.quality_score(x, loss=FakeLoss()).tolist() == pytest.approx([0.5])
    # explicit bounds win over the loss's
    assert mq.quality_score(x, loss=FakeLoss(), u_a=70.0).tolist() == pytest.approx([50 / 60])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(magnitudes=[1.0], l_a=5.0, u_a=5.0),  # empty range
        dict(magnitudes=[1.0], l_a=None, u_a=5.0),  # missing bound
        dict(magnitudes=[1.0], features=[[1.0]], l_a=0.0, u_a=1.0),  # both inputs
        dict(l_a=0.0, u_a=1.0),  # no input
        dict(magnitudes=[[1.0]], l_a=0.0, u_a=1.0),  # wrong rank
    ],
)
def test_quality_score_bad_input(kwargs):
    with pytest.raises(ValueError):
        mq.quality_score(**kwargs)


@pytest.mark.parametrize("qa, qb, expected", [([0.2, 0.9], [0.5, 0.1], [0.2, 0.1]), ([3.0], [3.0], [3.0])])
def test_pair_quality_is_min(qa, qb, expected):
    assert mq.pair_quality(qa, qb).tolist() == pytest.approx(expected)


def test_pair_quality_shape_mismatch():
    with pytest.raises(ValueError, match="quality_a and quality_b"):
        mq.pair_quality([1.0, 2.0], [1.0])


# ---------------------------------------------------------------- templates
# Two images of one identity: x1 = (3, 4) (|x1| = 5, unit (0.6, 0.8)),
# x2 = (0, 15) (|x2| = 15, unit (0, 1)).
X1, X2 = [3.0, 4.0], [0.0, 15.0]


@pytest.mark.parametrize(
    "method, normalize, expected",
    [
        # plain mean of units: ((0.6 + 0) / 2, (0.8 + 1) / 2) = (0.3, 0.9)
        ("mean", False, [0.3, 0.9]),
        ("mean", True, [0.3 / math.sqrt(0.9), 0.9 / math.sqrt(0.9)]),
        # MagFace+: (5·(0.6, 0.8) + 15·(0, 1)) / 20 = (3, 19) / 20 = (0.15, 0.95)
        ("magnitude", False, [0.15, 0.95]),
        ("magnitude", True, [3 / math.sqrt(370), 19 / math.sqrt(370)]),
    ],
)
def test_template_single_identity(method, normalize, expected):
    t, ids = mq.aggregate_templates(torch.tensor([X1, X2]), method=method, normalize=normalize)
    assert ids.tolist() == [0]
    assert t.shape == (1, 2)
    assert t[0].tolist() == pytest.approx(expected)


def test_templates_grouped_by_id():
    # ids out of order; identity 7 has one image (-2, 0) -> unit (-1, 0)
    x = torch.tensor([X2, [-2.0, 0.0], X1])
    t, ids = mq.aggregate_templates(x, template_ids=[3, 7, 3], method="magnitude", normalize=False)
    assert ids.tolist() == [3, 7]
    assert t[0].tolist() == pytest.approx([0.15, 0.95])
    assert t[1].tolist() == pytest.approx([-1.0, 0.0])


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(features=torch.ones(2, 2), method="median"), ValueError),
        (dict(features=torch.ones(2, 2), template_ids=[0]), ValueError),
        (dict(features=torch.ones(2, 2), template_ids=[0.5, 1.0]), TypeError),
        (dict(features=torch.ones(2)), ValueError),
    ],
)
def test_templates_bad_input(kwargs, err):
    with pytest.raises(err):
        mq.aggregate_templates(**kwargs)


# ---------------------------------------------------------------- error-versus-reject
def _erc_case():
    # 4 impostors (scores 0.5, 0.4, 0.3, 0.2) and 4 genuine (0.9, 0.1, 0.8, 0.15).
    # fmr=0.25 -> k=1 -> threshold = 2nd highest impostor = 0.4.
    # genuine errors (score <= 0.4): 0.1 and 0.15 -> FNMR 2/4 before rejection.
    scores = [0.5, 0.4, 0.3, 0.2, 0.9, 0.1, 0.8, 0.15]
    same = [0, 0, 0, 0, 1, 1, 1, 1]
    # the two failing genuine pairs have the lowest quality
    quality = [0.5, 0.6, 0.7, 0.8, 0.9, 0.1, 0.95, 0.2]
    return scores, same, quality


@pytest.mark.parametrize(
    "fractions, expected",
    [
        # floor(r·8) pairs rejected: 0 -> 2/4; 1 (q=0.1 genuine) -> 1/3; 2 -> 0/2;
        # 3 (q=0.5 impostor) -> 0/2
        ([0.0, 0.125, 0.25, 0.375], [0.5, 1 / 3, 0.0, 0.0]),
        ([0.1], [0.5]),  # floor(0.8) = 0 pairs rejected
    ],
)
def test_erc_hand_case(fractions, expected):
    scores, same, quality = _erc_case()
    out = mq.error_versus_reject(scores, same, quality, fmr=0.25, reject_fractions=fractions)
    assert out["threshold"] == pytest.approx(0.4)
    assert out["achieved_fmr"] == pytest.approx(0.25)
    assert out["fnmr"] == pytest.approx(expected)


def test_erc_reversed_quality_does_not_help():
    scores, same, quality = _erc_case()
    bad = [-q for q in quality]  # the failing pairs are now the best
    out = mq.error_versus_reject(scores, same, bad, fmr=0.25, reject_fractions=[0.0, 0.25])
    # rejecting the two "worst" = genuine 0.95 and 0.9 -> remaining genuine 0.1, 0.15 both fail
    assert out["fnmr"] == pytest.approx([0.5, 1.0])


def test_erc_nan_when_no_genuine_left():
    out = mq.error_versus_reject([0.9, 0.1], [1, 0], [0.0, 1.0], fmr=0.5, reject_fractions=[0.5])
    assert math.isnan(out["fnmr"][0])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fmr=0.0),
        dict(fmr=1.0),
        dict(reject_fractions=[1.0]),
        dict(quality=[0.1, 0.2]),
        dict(is_genuine=[1] * 8),
    ],
)
def test_erc_bad_input(kwargs):
    scores, same, quality = _erc_case()
    args = dict(scores=scores, is_genuine=same, quality=quality)
    args.update(kwargs)
    with pytest.raises(ValueError):
        mq.error_versus_reject(**args)
