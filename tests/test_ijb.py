"""magloss.ijb on synthetic IJB folders written in insightface's column formats, against a brute-force
float64 computation of every metric written here (loops over templates, pairs, probes, thresholds)."""

import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from _ijb_files import make_ijb
from magloss import ijb

pytest.importorskip("sklearn")


# -------------------------------------------------------------------- brute force (float64)
def bf_templates(feats, scores, faces, weight):
    """Upstream's loops: per template, per media mean of weighted unit features, sum, normalize."""
    f = feats.astype(np.float64)
    norms = np.linalg.norm(f, axis=1)
    w = np.ones(len(f))
    if weight in ("both", "detector"):
        w = w * np.float64(np.float32(scores))  # the scores as the file prints them, read back
    if weight in ("both", "magnitude"):
        w = w * norms
    u = f / norms[:, None] * w[:, None]
    out = {}
    for t in sorted({t for _, t, _ in faces}):
        media = {}
        for i, (_, ti, m) in enumerate(faces):
            if ti == t:
                media.setdefault(m, []).append(u[i])
        v = sum(np.mean(rows, axis=0) for rows in media.values())
        out[t] = v / np.linalg.norm(v)
    return out


def bf_tar(scores, labels, far):
    """max TP/n_gen over thresholds t (score >= t accepted) with FP(t) <= floor(far * n_imp), exactly."""
    n_imp = int((labels == 0).sum())
    allowed = math.floor(Fraction(repr(far)) * n_imp)
    best = 0.0
    for t in sorted(set(scores.tolist())) + [np.inf]:
        acc = scores >= t
        if np.count_nonzero(acc & (labels == 0)) <= allowed:
            best = max(best, np.count_nonzero(acc & (labels == 1)) / (labels == 1).sum())
    return best


def bf_identification(tf, truth, gallery_templates, fpirs=(0.01, 0.1), ranks=(1, 5, 10)):
    tsub = truth["tsub"]
    g_sub = [tsub[g] for g in gallery_templates]
    mated, ranks_of, mate_scores, best = [], [], [], []
    for p in sorted(set(truth["probes"])):
        s = [float(tf[p] @ tf[g]) for g in gallery_templates]
        best.append(max(s))
        is_mated = tsub[p] in g_sub
        mated.append(is_mated)
        if is_mated:
            m = max(sc for sc, gs in zip(s, g_sub) if gs == tsub[p])
            ranks_of.append(1 + sum(1 for sc, gs in zip(s, g_sub) if gs != tsub[p] and sc >= m))
            mate_scores.append(m)
        else:
            ranks_of.append(None)
            mate_scores.append(None)
    n_m = sum(mated)
    out = {f"rank{r}": sum(1 for mt, rk in zip(mated, ranks_of) if mt and rk <= r) / n_m for r in ranks}
    nm_best = [b for b, mt in zip(best, mated) if not mt]
    for f in fpirs:
        k = math.floor(Fraction(repr(f)) * len(nm_best))
        t = min(c for c in nm_best if sum(1 for b in nm_best if b > c) <= k)  # lowest threshold with FPIR <= f
        out[f"tpir@fpir={f:g}"] = sum(1 for mt, rk, ms in zip(mated, ranks_of, mate_scores)
                                      if mt and rk == 1 and ms > t) / n_m
    return out


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("weight", ["both", "detector", "magnitude", "none"])
def test_template_pooling_matches_the_loops(tmp_path, weight):
    feats, scores, truth = make_ijb(str(tmp_path), seed=1)
    lay = ijb.IJBLayout(str(tmp_path), "IJBC")
    _, t, m = ijb.read_face_tid_mid(lay.face_tid_mid)
    _, _, sc = ijb.read_name_5pts_score(lay.landmarks)
    norms, w = ijb.face_weights(feats, sc, weight)
    uniq, tf = ijb.template_features(feats, t, m, w, norms, chunk=7)  # chunks split templates and media
    want = bf_templates(feats, scores, truth["faces"], weight)
    assert uniq.tolist() == sorted(want)
    np.testing.assert_allclose(tf, np.stack([want[u] for u in uniq]), atol=2e-6)


@pytest.mark.parametrize("target, seed", [("IJBC", 2), ("IJBB", 3)])
def test_evaluate_matches_brute_force(tmp_path, target, seed):
    feats, scores, truth = make_ijb(str(tmp_path), target.lower(), seed=seed, extra_probe_subjects=4, noise=1.2)
    fars = (1e-2, 5e-2, 0.1, 0.3)
    with pytest.warns(UserWarning, match="not measurable"):  # 1e-2 of < 100 impostors
        r = ijb.evaluate(str(tmp_path), target, features=feats, fars=fars)
    tf = bf_templates(feats, scores, truth["faces"], "both")
    s = np.array([tf[a] @ tf[b] for a, b in truth["pairs"]])
    lab = np.array([int(truth["tsub"][a] == truth["tsub"][b]) for a, b in truth["pairs"]])
    for f in fars:
        assert r["verification"][f"TAR@FAR={f:g}"] == pytest.approx(bf_tar(s, lab, f), abs=1e-12)
    assert r["pairs"] == len(truth["pairs"]) and r["genuine"] == int(lab.sum())
    ident = r["identification"]
    gal = sorted(truth["gallery"])
    for j, name in enumerate(truth["g_names"]):
        g_templates = [t for t in gal if truth["gallery"][t] % 2 == j]
        want = bf_identification(tf, truth, g_templates)
        got = ident[name]
        assert got["mated"] + got["non_mated"] == len(set(truth["probes"]))
        for k, v in want.items():
            assert got[k] == pytest.approx(v, abs=1e-12), (name, k)
    for k in ident["mean"]:
        assert ident["mean"][k] == pytest.approx(np.mean([ident[g][k] for g in truth["g_names"]]))


def test_identification_hand_case():
    """Two gallery subjects, four probes: ranks, FPIR threshold and TPIR by hand."""
    e = np.eye(3, dtype=np.float32)
    gallery, g_sub = e[:2], np.array([10, 20])
    c = lambda a, b: np.array([a, b, math.sqrt(max(0.0, 1 - a * a - b * b))], dtype=np.float32)  # noqa: E731
    probes = np.stack([c(0.9, 0.1), c(0.3, 0.6), c(0.5, 0.2), c(0.7, 0.1), c(0.1, 0.7)])
    # mated: rank 1 (0.9); rank 2 (0.3 < 0.6); rank 2 (0.2 < 0.5); non-mated (best 0.7); rank 1 at exactly 0.7
    p_sub = np.array([10, 10, 20, 30, 20])
    with pytest.warns(UserWarning, match=r"fpirs=0.5 is below 1/1 \(one non-mated search"):
        r = ijb.identification(probes, p_sub, gallery, g_sub, ranks=(1, 2), fpirs=(0.5,))
    assert r["mated"] == 4 and r["non_mated"] == 1
    assert r["rank1"] == pytest.approx(2 / 4) and r["rank2"] == 1.0
    # one non-mated search, best 0.7: floor(0.5 * 1) = 0 may pass → t = 0.7; a mate must score > t:
    # only 0.9 does (the rank-1 mate at exactly 0.7 does not)
    assert r["threshold@fpir=0.5"] == pytest.approx(0.7, abs=1e-6) and r["tpir@fpir=0.5"] == pytest.approx(1 / 4)


def test_rank_counts_ties_against_the_probe():
    gallery = np.array([[1, 0], [1, 0]], dtype=np.float32)
    r = ijb.identification(np.array([[1, 0]], dtype=np.float32), np.array([1]), gallery, np.array([1, 2]), ranks=(1, 2), fpirs=())
    assert r["rank1"] == 0.0 and r["rank2"] == 1.0


@pytest.mark.parametrize("method, block_bytes", [("matmul", 4 * 50 * 7), ("gather", 4 * 16 * 37), ("auto", 1 << 20),
                                                 ("matmul", 1 << 20)])
def test_pair_scores_in_blocks_equal_float64(method, block_bytes):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 16)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    uniq = np.arange(100, 150) * 3
    a, b = rng.integers(0, 50, 1000), rng.integers(0, 50, 1000)
    s = ijb.pair_scores(f, uniq, uniq[a], uniq[b], block_bytes=block_bytes, method=method)
    np.testing.assert_allclose(s, np.einsum("nd,nd->n", f[a].astype(np.float64), f[b].astype(np.float64)), atol=1e-6)


@pytest.mark.parametrize("edit, needle", [
    (("face_tid_mid.txt", "1.jpg 1\n"), "face_tid_mid.txt: line 1"),
    (("face_tid_mid.txt", "1.jpg x 3\n"), "line 1: .*'x' is not an integer"),
    (("template_pair_label.txt", "1 2 5\n"), "label must be 0 or 1"),
    (("template_pair_label.txt", "1 99999 1\n"), "template 99999 has no face"),
    (("name_5pts_score.txt", "1.jpg 1 2 3\n"), "name_5pts_score.txt: line 1"),
    (("name_5pts_score.txt", "9.jpg " + "1 " * 10 + "0.9\n"), "line 1: image '9.jpg', but line 1 of .*'1.jpg'"),
])
def test_bad_meta_files_are_named(tmp_path, edit, needle):
    feats, _, _ = make_ijb(str(tmp_path), seed=4)
    suffix, text = edit
    path = os.path.join(str(tmp_path), "meta", f"ijbc_{suffix}")
    with open(path) as f:
        rest = f.readlines()[1:]
    with open(path, "w") as f:
        f.write(text + "".join(rest))
    with pytest.raises(ijb.IJBError, match=needle):
        ijb.evaluate(str(tmp_path), "IJBC", features=feats)


def test_feature_count_and_nan_are_named(tmp_path):
    feats, _, _ = make_ijb(str(tmp_path), seed=5)
    with pytest.raises(ijb.IJBError, match=r"features: expected \[\d+, D\]"):
        ijb.evaluate(str(tmp_path), "IJBC", features=feats[:-1])
    feats[3, 1] = np.nan
    with pytest.raises(ijb.IJBError, match="row 3 holds NaN"):
        ijb.evaluate(str(tmp_path), "IJBC", features=feats)


def test_model_path_aligns_flips_and_pools(tmp_path):
    """Faces embedded by a tiny backbone: evaluate(model) == evaluate(features computed by hand)."""
    from PIL import Image

    from magloss.backbones import build_backbone
    from magloss.pack import align_face

    _, _, truth = make_ijb(str(tmp_path), seed=6, subjects=4, n_pairs=20)
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "loose_crop")
    lay = ijb.IJBLayout(str(tmp_path), "IJBC")
    names, lms, _ = ijb.read_name_5pts_score(lay.landmarks)
    for n in names:
        Image.fromarray(rng.integers(0, 256, (100, 110, 3), dtype=np.uint8)).save(tmp_path / "loose_crop" / n)
    torch.manual_seed(0)
    net = build_backbone("tiny", 8, (32, 32)).eval()
    manual = []
    with torch.no_grad():
        for n, lm in zip(names, lms):
            x = torch.from_numpy(np.asarray(align_face(Image.open(tmp_path / "loose_crop" / n), lm, 32)).copy())
            x = ((x.permute(2, 0, 1).float() - 127.5) / 127.5)[None]
            manual.append((net(x) + net(x.flip(3)))[0].numpy())
    got = ijb.embed_faces(lay.images, names, lms, net, flip=True, batch_size=5)
    np.testing.assert_allclose(got, np.array(manual), atol=1e-5)
    a = ijb.evaluate(str(tmp_path), "IJBC", model=net, fars=(0.1,), one_to_n=False)
    b = ijb.evaluate(str(tmp_path), "IJBC", features=np.array(manual), fars=(0.1,), one_to_n=False)
    assert a["verification"] == pytest.approx(b["verification"])


def test_cli_writes_table_and_json(tmp_path):
    feats, _, _ = make_ijb(str(tmp_path / "IJBC"), seed=7)
    np.save(tmp_path / "f.npy", feats)
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "magloss.ijb", str(tmp_path / "IJBC"), "--features", str(tmp_path / "f.npy"),
                          "--out", str(tmp_path / "r.json")], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "FAR 0.0001" in run.stdout and "G1" in run.stdout and "tpir@fpir=0.01" in run.stdout
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["identification"]) == {"G1", "G2", "mean"} and len(r["roc"]["fpr"]) == len(r["roc"]["tpr"]) > 1
    bad = subprocess.run([sys.executable, "-m", "magloss.ijb", str(tmp_path / "nope"), "--features", str(tmp_path / "f.npy")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "ROOT" in bad.stderr and "Traceback" not in bad.stderr
