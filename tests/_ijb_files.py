"""Synthetic IJB-B / IJB-C folders in insightface's exact meta-file formats, for the tests
(tests/test_ijb.py, tests/test_workflow.py)."""

import os

import numpy as np


def make_ijb(root, target="ijbc", seed=0, subjects=12, dim=8, noise=0.9, n_pairs=400, extra_probe_subjects=0):
    """meta/ files in the exact upstream formats; returns (features [N, D], detector scores [N], truth dict)."""
    rng = np.random.default_rng(seed)
    meta = os.path.join(root, "meta")
    os.makedirs(meta, exist_ok=True)
    centers = rng.normal(size=(subjects + extra_probe_subjects, dim))
    faces, feats, scores, tsub = [], [], [], {}
    tid, mid, img = 1, 1000, 1
    gallery_t, probe_t = {}, []
    for subj in range(subjects + extra_probe_subjects):
        n_templates = 1 + rng.integers(1, 4) if subj < subjects else 1 + rng.integers(0, 3)
        for k in range(n_templates):
            tsub[tid] = 1000 + subj
            if k == 0 and subj < subjects:
                gallery_t[tid] = subj
            else:
                probe_t.append(tid)
            for _ in range(int(rng.integers(1, 4))):  # media: a still (1 frame) or a video (several)
                for _ in range(int(rng.integers(1, 4))):
                    faces.append((f"{img}.jpg", tid, mid))
                    f = centers[subj] + noise * rng.normal(size=dim)
                    feats.append(f * rng.uniform(0.3, 3.0))
                    scores.append(rng.uniform(0.5, 1.0))
                    img += 1
                mid += 1
            tid += 1
    with open(os.path.join(meta, f"{target}_face_tid_mid.txt"), "w") as f:
        f.writelines(f"{n} {t} {m}\n" for n, t, m in faces)
    with open(os.path.join(meta, f"{target}_name_5pts_score.txt"), "w") as f:
        for (n, _, _), s in zip(faces, scores):
            pts = " ".join(f"{v:.3f}" for v in rng.uniform(20, 90, size=10))
            f.write(f"{n} {pts} {s:.6f}\n")
    ts = sorted(tsub)
    pairs = set()
    while len(pairs) < n_pairs:
        a, b = rng.choice(ts, 2, replace=False)
        if rng.random() < 0.3:  # enrich genuine pairs
            same = [t for t in ts if tsub[t] == tsub[a] and t != a]
            if same:
                b = rng.choice(same)
        pairs.add((int(a), int(b)))
    pairs = sorted(pairs)
    with open(os.path.join(meta, f"{target}_template_pair_label.txt"), "w") as f:
        f.writelines(f"{a} {b} {int(tsub[a] == tsub[b])}\n" for a, b in pairs)
    g_names = ("G1", "G2") if target == "ijbc" else ("S1", "S2")
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT\n"
    by_t = {}
    for n, t, _ in faces:
        by_t.setdefault(t, []).append(n)

    def csv(path, templates):
        with open(path, "w") as f:
            f.write(header)
            for t in templates:
                for n in by_t[t]:
                    f.write(f"{t},{tsub[t]},img/{n},1,0,0,10,10\n")
    gal = sorted(gallery_t)
    csv(os.path.join(meta, f"{target}_1N_gallery_{g_names[0]}.csv"), [t for t in gal if gallery_t[t] % 2 == 0])
    csv(os.path.join(meta, f"{target}_1N_gallery_{g_names[1]}.csv"), [t for t in gal if gallery_t[t] % 2 == 1])
    csv(os.path.join(meta, f"{target}_1N_probe_mixed.csv"), probe_t)
    truth = {"faces": faces, "tsub": tsub, "pairs": pairs, "gallery": gallery_t, "probes": probe_t, "g_names": g_names}
    return np.array(feats, dtype=np.float32), np.array(scores, dtype=np.float32), truth
