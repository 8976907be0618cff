#!/usr/bin/env python3
"""Time and peak memory of ``magloss.ijb.evaluate`` on an IJB-C-sized synthetic set.

The set has IJB-C's counts (469,375 faces, 23,124 templates, 15,658,489 template pairs of
which 19,557 genuine, 1:N galleries of 1,772 + 1,759 templates and 19,593 mixed probe
templates), written in insightface's meta formats, with per-face features given as an
``.npy`` (512-d float32, 0.96 GB): no image work, only reading, pooling, pair scoring,
ROC / TAR@FAR and the 1:N search. The evaluation runs in a fresh child process; its
peak resident memory (``ru_maxrss`` of the child; the memory-mapped feature file's pages
count while touched) and the wall time of each stage are recorded.

    python benchmarks/ijb_scale.py                       # generates the set once under /tmp
    python benchmarks/ijb_scale.py --out benchmarks/results/ijb_scale_cpu.json

Options: --dir (where the set lives; reused when present), --scale (fraction of every
count, e.g. 0.01 for a smoke run), --dim.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IJBC = {"faces": 469375, "templates": 23124, "pairs": 15658489, "genuine": 19557, "g1": 1772, "g2": 1759}


def generate(folder: str, scale: float, dim: int, seed: int = 0) -> dict:
    """Write meta/ files and features.npy; returns the counts."""
    rng = np.random.default_rng(seed)
    n_faces = max(50, int(IJBC["faces"] * scale))
    g1, g2 = max(2, int(IJBC["g1"] * scale)), max(2, int(IJBC["g2"] * scale))
    subjects = g1 + g2
    n_templates = max(subjects + 4, int(IJBC["templates"] * scale))
    n_pairs = max(100, int(IJBC["pairs"] * scale))
    n_genuine = max(10, int(IJBC["genuine"] * scale))
    meta = os.path.join(folder, "meta")
    os.makedirs(meta, exist_ok=True)
    # templates: one gallery template per subject, then probe templates of random subjects
    t_subject = np.concatenate([np.arange(subjects), rng.integers(0, subjects, n_templates - subjects)])
    t_ids = np.arange(1, n_templates + 1)
    per_t = 1 + rng.multinomial(n_faces - n_templates, np.ones(n_templates) / n_templates)
    face_t = np.repeat(t_ids, per_t)
    # media: runs of 1..8 faces inside a template
    media = np.empty(n_faces, dtype=np.int64)
    m, start = 1, 0
    for c in per_t:
        pos = 0
        while pos < c:
            k = int(min(c - pos, rng.integers(1, 9)))
            media[start + pos:start + pos + k] = m
            m += 1
            pos += k
        start += c
    names = np.char.add(np.arange(1, n_faces + 1).astype(str), ".jpg")
    with open(os.path.join(meta, "ijbc_face_tid_mid.txt"), "w") as f:
        f.write("\n".join(f"{a} {b} {c}" for a, b, c in zip(names.tolist(), face_t.tolist(), media.tolist())) + "\n")
    scores = rng.uniform(0.5, 1.0, n_faces)
    lm = rng.uniform(20, 90, (n_faces, 10))
    with open(os.path.join(meta, "ijbc_name_5pts_score.txt"), "w") as f:
        f.write("\n".join(n + " " + " ".join(f"{v:.2f}" for v in row) + f" {s:.4f}"
                          for n, row, s in zip(names.tolist(), lm, scores)) + "\n")
    # pairs: genuine among templates of one subject, the rest random
    by_subject = {}
    for t, s in zip(t_ids, t_subject):
        by_subject.setdefault(int(s), []).append(int(t))
    multi = [v for v in by_subject.values() if len(v) > 1]
    gen = [tuple(rng.choice(multi[int(rng.integers(len(multi)))], 2, replace=False)) for _ in range(n_genuine)]
    a = rng.integers(1, n_templates + 1, n_pairs - n_genuine)
    b = rng.integers(1, n_templates + 1, n_pairs - n_genuine)
    t1 = np.concatenate([[g[0] for g in gen], a])
    t2 = np.concatenate([[g[1] for g in gen], b])
    label = (t_subject[t1 - 1] == t_subject[t2 - 1]).astype(np.int64)
    with open(os.path.join(meta, "ijbc_template_pair_label.txt"), "w") as f:
        for s in range(0, t1.size, 1 << 20):
            f.write("\n".join(f"{x} {y} {z}" for x, y, z in zip(t1[s:s + (1 << 20)].tolist(), t2[s:s + (1 << 20)].tolist(),
                                                               label[s:s + (1 << 20)].tolist())) + "\n")
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT\n"

    def csv(name, templates):
        with open(os.path.join(meta, name), "w") as f:
            f.write(header + "".join(f"{t},{t_subject[t - 1]},img/{t}.jpg,1,0,0,10,10\n" for t in templates))
    csv("ijbc_1N_gallery_G1.csv", t_ids[:g1])
    csv("ijbc_1N_gallery_G2.csv", t_ids[g1:subjects])
    csv("ijbc_1N_probe_mixed.csv", t_ids[subjects:])
    # features: subject direction + noise, random magnitudes; written in chunks
    centers = rng.normal(size=(subjects, dim)).astype(np.float32)
    feats = np.lib.format.open_memmap(os.path.join(folder, "features.npy"), mode="w+", dtype=np.float32,
                                      shape=(n_faces, dim))
    subj_of_face = t_subject[face_t - 1]
    for s in range(0, n_faces, 65536):
        e = min(n_faces, s + 65536)
        block = centers[subj_of_face[s:e]] + 4.0 * rng.standard_normal((e - s, dim), dtype=np.float32)
        feats[s:e] = block * rng.uniform(0.2, 2.0, (e - s, 1)).astype(np.float32)
    feats.flush()
    del feats
    counts = {"faces": n_faces, "templates": n_templates, "pairs": int(t1.size), "genuine": int(label.sum()),
              "gallery_G1": g1, "gallery_G2": g2, "probe_templates": n_templates - subjects, "dim": dim}
    with open(os.path.join(folder, "counts.json"), "w") as f:
        json.dump(counts, f)
    return counts


def child(folder: str) -> None:
    """Run the evaluation; print a JSON line with the stage times, total and peak RSS."""
    from magloss import ijb

    t0 = time.perf_counter()
    feats = np.load(os.path.join(folder, "features.npy"), mmap_mode="r")
    r = ijb.evaluate(folder, "IJBC", features=feats)
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds_total": total, "seconds": r["seconds"], "peak_rss_mib": peak,
                      "verification": r["verification"], "identification": r["identification"]["mean"],
                      "templates": r["templates"], "pairs": r["pairs"]}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/magloss-ijb-scale")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--out", help="write the JSON record here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    folder = os.path.join(a.dir, f"scale{a.scale:g}_d{a.dim}")
    if a.child:
        child(folder)
        return 0
    t0 = time.perf_counter()
    if os.path.isfile(os.path.join(folder, "counts.json")):
        with open(os.path.join(folder, "counts.json")) as f:
            counts = json.load(f)
        gen_s = None
    else:
        counts = generate(folder, a.scale, a.dim)
        gen_s = time.perf_counter() - t0
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, __file__, "--child", "--dir", a.dir, "--scale", str(a.scale), "--dim", str(a.dim)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return out.returncode
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec.update({"set": counts, "generate_seconds": gen_s, "host": platform.node(), "cpus": os.cpu_count(),
                "torch_threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "command": "python benchmarks/ijb_scale.py " + " ".join(sys.argv[1:])})
    text = json.dumps(rec, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
