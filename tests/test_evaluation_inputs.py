"""Inputs of magloss.evaluation and magloss.quality: precision (float16/bfloat16 computed in
float32, float64 kept), integer labels, empty inputs, argument messages, and the 1:N search
by blocks against a float64 brute force computed here with numpy."""

import math

import numpy as np
import pytest
import torch

import magloss
from magloss import evaluation as ev
from magloss import quality as mq

LOW = [torch.float16, torch.bfloat16]


# ---------------------------------------------------------------- precision
def _templates_f64(x: np.ndarray, ids: np.ndarray, method: str) -> np.ndarray:
    """aggregate_templates' formula in float64 numpy: t = Σ w_i x̂_i / Σ w_i, then unit norm."""
    out = []
    for t in np.unique(ids):
        rows = x[ids == t].astype(np.float64)
        mag = np.linalg.norm(rows, axis=1, keepdims=True)
        unit = rows / np.maximum(mag, 1e-12)
        w = np.ones_like(mag) if method == "mean" else mag
        v = (unit * w).sum(0) / max(w.sum(), 1e-12)
        out.append(v / max(np.linalg.norm(v), 1e-12))
    return np.array(out)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("method", ["mean", "magnitude"])
def test_templates_of_half_features_with_a_zero_row(dtype, method):
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(1)) * 20
    x[4] = 0.0                                   # one all-zero row (template 1)
    x = x.to(dtype)
    ids = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    t, _ = mq.aggregate_templates(x, ids, method=method)
    assert t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), _templates_f64(x.double().numpy(), ids, method), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", LOW)
def test_magnitude_templates_past_the_half_range(dtype):
    """700 images of magnitude 100: Σ a_i = 70000 > 65504, the largest float16."""
    d = torch.randn(700, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = (100 * d / d.norm(dim=1, keepdim=True)).to(dtype)
    ids = np.arange(700) % 3
    t, _ = mq.aggregate_templates(x, ids, method="magnitude")
    np.testing.assert_allclose(t.numpy(), _templates_f64(x.double().numpy(), ids, "magnitude"), atol=1e-6, rtol=0)


def test_float64_templates_and_magnitudes_stay_float64():
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ids = np.array([1, 1, 2, 2, 2])
    t, _ = mq.aggregate_templates(x, ids, method="magnitude")
    assert t.dtype == torch.float64
    np.testing.assert_allclose(t.numpy(), _templates_f64(x.numpy(), ids, "magnitude"), atol=1e-15, rtol=0)
    assert mq.feature_magnitude(x).dtype == torch.float64


@pytest.mark.parametrize("dtype", LOW)
def test_magnitudes_and_quality_of_half_features(dtype):
    x = torch.full((2, 8), 300.0, dtype=dtype)   # squares 90000 overflow float16
    x[1] = 3.0
    a = mq.feature_magnitude(x)
    assert a.dtype == torch.float32
    assert a.tolist() == pytest.approx([300 * math.sqrt(8), 3 * math.sqrt(8)], rel=1e-6)
    q = mq.quality_score(x, l_a=10, u_a=110)
    assert q.dtype == torch.float32 and q.tolist() == pytest.approx([1.0, 0.0])
    qp = mq.pair_quality(torch.tensor([0.25, 0.5], dtype=dtype), np.array([0.75, 0.125]))
    assert qp.dtype == torch.float64 and qp.tolist() == [0.25, 0.125]


def test_cosine_scores_keeps_float64():
    t = 1e-5                                     # cos t = 1 - 5e-11: float32 rounds it to 1.0
    a = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[math.cos(t), math.sin(t)], [0.0, 2.0]], dtype=torch.float64)
    s = ev.cosine_scores(a, b)
    assert s.dtype == torch.float64
    assert s[0].item() < 1.0 and s[0].item() == pytest.approx(math.cos(t), abs=1e-15)
    assert s[1].item() == 0.0


@pytest.mark.parametrize("dtype", LOW)
def test_cosine_scores_of_half_embeddings_in_float32(dtype):
    rng = np.random.default_rng(4)
    a, b = (torch.tensor(rng.normal(size=(6, 5)) * 100).to(dtype) for _ in range(2))
    s = ev.cosine_scores(a, b)
    a64, b64 = a.double().numpy(), b.double().numpy()
    want = (a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)
    assert s.dtype == torch.float32
    np.testing.assert_allclose(s.numpy(), want, atol=1e-6, rtol=0)


def _verification_set(n=40, seed=5):
    rng = np.random.default_rng(seed)
    same = np.arange(n) % 2 == 0
    scores = np.where(same, 0.5, -0.1) + rng.normal(scale=0.3, size=n)
    return scores, same


SCORE_CALLS = [
    ("kfold_verification", lambda s, y: ev.kfold_verification(s, y, n_folds=4)),
    ("best_threshold", lambda s, y: ev.best_threshold(s, y)),
    ("threshold_at_fmr", lambda s, y: ev.threshold_at_fmr(s[~torch.as_tensor(y)], 0.25)),
    ("roc", lambda s, y: {k: v.tolist() if hasattr(v, "tolist") else v for k, v in ev.roc(s, y).items()}),
    ("tar_at_far", lambda s, y: ev.tar_at_far(s, y, fars=(0.1, 0.5))),
    ("error_versus_reject", lambda s, y: mq.error_versus_reject(s, y, s.abs(), fmr=0.25, reject_fractions=(0, 0.3))),
]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name,call", SCORE_CALLS, ids=[c[0] for c in SCORE_CALLS])
def test_half_scores_equal_their_float32_values(name, call, dtype):
    """bf16/fp16 scores are exactly representable in float32: the result must be the float32 one."""
    pytest.importorskip("sklearn")
    scores, same = _verification_set()
    s = torch.tensor(scores).to(dtype)
    assert call(s, same) == call(s.float(), same)


@pytest.mark.parametrize("dtype", LOW)
def test_identification_of_half_embeddings(dtype):
    rng = np.random.default_rng(6)
    g, p = torch.tensor(rng.normal(size=(30, 4))).to(dtype), torch.tensor(rng.normal(size=(12, 4))).to(dtype)
    gl, pl = rng.integers(0, 8, 30), rng.integers(0, 8, 12)
    want = _brute_topk(p.double().numpy(), pl, g.double().numpy(), gl, (1, 3))
    assert ev.identification_topk(p, pl, g, gl, topk=(1, 3), backend="torch") == want


# ---------------------------------------------------------------- 1:N search by blocks
def _brute_topk(p, pl, g, gl, ks):
    """Top-k identification accuracy in float64 numpy: the whole similarity matrix, full sort."""
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    order = np.argsort(-(pn @ gn.T), axis=1, kind="stable")
    hits = gl[order] == pl[:, None]
    return {f"top{k}": int(hits[:, :k].any(1).sum()) / len(p) for k in ks}


@pytest.mark.parametrize("batch_size, gallery_batch_size", [(5, 3), (7, 64), (37, 1), (1000, 1000)])
def test_identification_by_blocks_equals_brute_force(batch_size, gallery_batch_size):
    """Gallery blocks smaller than k (the running merge must carry candidates over), irregular sizes."""
    rng = np.random.default_rng(7)
    g, p = rng.normal(size=(211, 6)), rng.normal(size=(37, 6))
    gl, pl = rng.integers(0, 40, 211), rng.integers(0, 40, 37)
    ks = (1, 3, 7, 50, 300)
    got = ev.identification_topk(torch.tensor(p), pl, torch.tensor(g), gl, topk=ks, backend="torch",
                                 batch_size=batch_size, gallery_batch_size=gallery_batch_size)
    assert got == _brute_topk(p, pl, g, gl, ks)


def test_identification_large_gallery_small_blocks():
    """A 100k-row gallery searched 4096 rows at a time (25 blocks), float64, against the brute force."""
    rng = np.random.default_rng(8)
    g, p = rng.normal(size=(100_000, 8)), rng.normal(size=(64, 8))
    gl, pl = rng.integers(0, 5_000, 100_000), rng.integers(0, 5_000, 64)
    gl[rng.integers(0, 100_000, 64)] = pl       # some probes have a gallery mate
    ks = (1, 5, 100)
    got = ev.identification_topk(p, pl, g, gl, topk=ks, backend="torch", batch_size=16, gallery_batch_size=4096)
    assert got == _brute_topk(p, pl, g, gl, ks)


# ---------------------------------------------------------------- labels, empty inputs, messages
def _ident_args(**kw):
    rng = np.random.default_rng(9)
    args = dict(probe=rng.normal(size=(4, 3)), probe_labels=np.array([0, 1, 2, 3]),
                gallery=rng.normal(size=(5, 3)), gallery_labels=np.array([0, 1, 2, 3, 4]), backend="torch")
    args.update(kw)
    return args


FLOAT_LABEL_CALLS = [
    ("labels", lambda: ev.sample_pairs([0.4, 0.6, 0.6, 1.0], 4)),
    ("probe_labels", lambda: ev.identification_topk(**_ident_args(probe_labels=np.array([0.4, 0.6, 1.0, 2.0])))),
    ("gallery_labels", lambda: ev.identification_topk(**_ident_args(gallery_labels=torch.tensor([0.0, 1, 2, 3, 4])))),
    ("labels_true", lambda: ev.clustering_scores([0.4, 0.6], [0, 1])),
    ("labels_pred", lambda: ev.clustering_scores([0, 1], np.array([0.0, 1.0]))),
    ("template_ids", lambda: mq.aggregate_templates(torch.ones(2, 2), [0.4, 0.6])),
    ("template_ids", lambda: mq.aggregate_templates(torch.ones(2, 2), torch.tensor([True, False]))),
    ("labels_true", lambda: ev.clustering_scores(torch.tensor([0, 1], dtype=torch.bfloat16), [0, 1])),
]


@pytest.mark.parametrize("name,call", FLOAT_LABEL_CALLS, ids=[f"{i}-{c[0]}" for i, c in enumerate(FLOAT_LABEL_CALLS)])
def test_labels_must_be_integers(name, call):
    pytest.importorskip("sklearn")
    with pytest.raises(TypeError, match=rf"^{name}: expected integer labels, got dtype"):
        call()


def test_float_labels_are_not_merged():
    """0.4 and 0.6 truncated to 0 made two identities one: clustering them apart scored as a miss."""
    pytest.importorskip("sklearn")
    with pytest.raises(TypeError):
        ev.clustering_scores([0.4, 0.6], [0, 1])
    assert ev.clustering_scores([4, 6], [0, 1])["f_score"] == 0.0    # no pair is together in either


EMPTY_CALLS = [
    ("labels_true", lambda: ev.clustering_scores([], [])),
    ("labels", lambda: ev.sample_pairs([], 4)),
    ("features", lambda: ev.cluster_embeddings(np.zeros((0, 3)), 1)),
    ("probe_labels", lambda: ev.identification_topk(**_ident_args(probe=np.zeros((0, 3)), probe_labels=[]))),
    ("emb_a and emb_b", lambda: ev.cosine_scores(np.zeros((2, 0)), np.zeros((2, 0)))),
    ("scores", lambda: ev.kfold_verification([], [])),
]


@pytest.mark.parametrize("name,call", EMPTY_CALLS, ids=[f"{i}-{c[0]}" for i, c in enumerate(EMPTY_CALLS)])
def test_empty_inputs_are_errors_naming_the_argument(name, call):
    pytest.importorskip("sklearn")
    with pytest.raises(ValueError, match=rf"^{name}"):
        call()


MESSAGES = [
    (lambda: ev.identification_topk(**_ident_args(batch_size=0)), ValueError, r"^batch_size: expected a positive integer, got 0"),
    (lambda: ev.identification_topk(**_ident_args(gallery_batch_size=-2)), ValueError, r"^gallery_batch_size: .* got -2"),
    (lambda: ev.identification_topk(**_ident_args(batch_size=2.5)), ValueError, r"^batch_size: expected a positive integer, got 2.5"),
    (lambda: ev.identification_topk(**_ident_args(topk="5")), ValueError, r"^topk: expected a positive integer, got '5'"),
    (lambda: ev.kfold_verification([0.3], [True]), ValueError, r"^scores: need at least n_folds=10 pairs .*got 1$"),
    (lambda: ev.kfold_verification([0.3, 0.1], [1, 0], n_folds=1), ValueError, r"^n_folds: expected an integer >= 2, got 1"),
    (lambda: ev.kfold_verification([0.3, 0.1], [1, 0], n_folds=True), ValueError, r"^n_folds: expected an integer >= 2, got True"),
    (lambda: ev.fraction_count(float("nan"), 10), ValueError, r"^fraction: expected a finite number, got nan"),
    (lambda: ev.fraction_count(0.5, -1), ValueError, r"^n: expected an integer >= 0, got -1"),
    (lambda: ev.threshold_at_fmr([0.1, 0.2], "1e-3"), TypeError, r"^fmr: expected a number, got '1e-3'"),
    (lambda: mq.error_versus_reject([0.1, 0.2], [1, 0], [1.0, 2.0], reject_fractions=["a"]), TypeError,
     r"^reject_fractions: expected a number"),
    (lambda: mq.quality_score(magnitudes=[1.0], l_a="10", u_a=110), TypeError, r"^l_a: expected a number, got '10'"),
    (lambda: ev.sample_pairs([0, 0, 1], 1), ValueError, r"^num_pairs: expected an integer >= 2, got 1"),
    (lambda: ev.cluster_embeddings(np.eye(3), 0), ValueError, r"^n_clusters: expected a positive integer, got 0"),
    (lambda: ev.sample_pairs([0, 0, 1], 4, seed=-1), ValueError, r"^seed: expected an integer >= 0, got -1"),
    (lambda: ev.kfold_verification([0.3, 0.1], [1, 0], n_folds=2, shuffle=True, seed="x"), ValueError,
     r"^seed: expected an integer >= 0, got 'x'"),
    (lambda: ev.cluster_embeddings(np.eye(3), 2, seed=0.5), ValueError, r"^seed: expected an integer >= 0, got 0.5"),
    (lambda: ev.cosine_scores([["a"]], [["b"]]), TypeError, r"^emb_a: expected a tensor or array of real numbers"),
    (lambda: mq.feature_magnitude(torch.ones(2, 2, dtype=torch.bool)), TypeError, r"^features: expected real numbers"),
    (lambda: mq.quality_score(magnitudes=[20.0], loss=magloss.ArcFaceLoss), TypeError,
     r"^loss: expected a loss instance such as MagFaceLoss\(\.\.\.\), got the class ArcFaceLoss"),
    (lambda: mq.quality_score(magnitudes=[20.0], loss=magloss.MagFaceLoss), TypeError, r"^loss: .*the class MagFaceLoss"),
    (lambda: mq.quality_score(magnitudes=[20.0], loss=magloss.ArcFaceLoss(4, 3)), TypeError,
     r"^loss: ArcFaceLoss has no magnitude range \(l_a, u_a\)"),
]


@pytest.mark.parametrize("call,err,pattern", MESSAGES, ids=[m[2][:30] for m in MESSAGES])
def test_bad_arguments_are_named(call, err, pattern):
    pytest.importorskip("sklearn")
    with pytest.raises(err, match=pattern):
        call()


@pytest.mark.parametrize("cls, l_a, u_a", [(magloss.MagFaceLoss, 10.0, 110.0), (magloss.MagCosFaceLoss, 20.0, 90.0)])
def test_quality_score_reads_the_range_of_a_magface_loss(cls, l_a, u_a):
    loss = cls(4, 3, l_a=l_a, u_a=u_a, lambda_g=1e6)
    mags = [l_a - 1, (l_a + u_a) / 2, u_a + 5]
    assert mq.quality_score(magnitudes=mags, loss=loss).tolist() == [0.0, 0.5, 1.0]
    # explicit bounds win; a plain object with numeric l_a/u_a still works
    assert mq.quality_score(magnitudes=[l_a], loss=loss, l_a=l_a - 10).tolist() == pytest.approx([10 / (u_a - l_a + 10)])


# every count of magloss.evaluation goes through magloss.validation.check_int: a whole float
# (10.0) is refused like anywhere else in magloss, naming the argument; numpy ints pass
WHOLE_FLOATS = [
    ("n", 0, lambda v: ev.fraction_count(0.29, v), 100),
    ("num_pairs", 2, lambda v: ev.sample_pairs([0, 0, 1, 1, 2], v), 4),
    ("seed", 0, lambda v: ev.sample_pairs([0, 0, 1, 1, 2], 4, seed=v), 3),
    ("n_folds", 2, lambda v: ev.kfold_verification(*_verification_set(), n_folds=v), 4),
    ("seed", 0, lambda v: ev.kfold_verification(*_verification_set(), n_folds=4, shuffle=True, seed=v), 7),
    ("batch_size", 1, lambda v: ev.identification_topk(**_ident_args(batch_size=v)), 2),
    ("gallery_batch_size", 1, lambda v: ev.identification_topk(**_ident_args(gallery_batch_size=v)), 3),
    ("topk", 1, lambda v: ev.identification_topk(**_ident_args(topk=(1, v))), 2),
    ("n_clusters", 1, lambda v: ev.cluster_embeddings(np.eye(4), v), 2),
    ("seed", 0, lambda v: ev.cluster_embeddings(np.eye(4), 2, seed=v), 5),
]


@pytest.mark.parametrize("name, minimum, call, value", WHOLE_FLOATS, ids=[f"{w[0]}-{i}" for i, w in enumerate(WHOLE_FLOATS)])
def test_whole_float_counts_are_refused_like_everywhere_in_magloss(name, minimum, call, value):
    pytest.importorskip("sklearn")                 # cluster_embeddings' k-means
    kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    with pytest.raises(ValueError, match=rf"^{name}: expected {kind}, got {float(value)!r}$"):
        call(float(value))
    want = call(value)
    got = call(np.int64(value))
    assert type(got) is type(want)
    if isinstance(want, tuple):
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    elif isinstance(want, np.ndarray):
        assert np.array_equal(got, want)
    else:
        assert got == want
