"""docs/workflow.md, run as written: every ```bash block of the walkthrough, in order, on a tiny
generated set (photos, an LFW-style pairs.txt, a synthetic IJB-C folder)."""

import json
import os
import re
import subprocess

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("sklearn")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from PIL import Image  # noqa: E402

from _ijb_files import make_ijb  # noqa: E402

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "workflow.md")


def _blocks():
    with open(DOC) as f:
        return re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)


def _tiny_set(root, rng):
    for p in range(6):  # 6 people, 4 photos each
        os.makedirs(os.path.join(root, "photos", f"p{p}"))
        base = rng.integers(0, 256, (40, 36, 3))
        for i in range(4):
            px = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(os.path.join(root, "photos", f"p{p}", f"{i}.jpg"), quality=90)
    names = ["Ann", "Bo_Li", "Cy"]
    for nm in names:
        os.makedirs(os.path.join(root, "lfw", nm))
        for i in range(1, 6):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(
                os.path.join(root, "lfw", nm, f"{nm}_{i:04d}.jpg"))
    lines = [f"{nm}\t{i}\t{i + 1}" for nm in names for i in (1, 3)]  # 6 genuine pairs
    lines += [f"{a}\t{i}\t{b}\t{i + 1}" for i in (1, 4) for a, b in zip(names, names[1:] + names[:1])]  # 6 impostor
    with open(os.path.join(root, "pairs.txt"), "w") as f:
        f.write("1\t12\n" + "\n".join(lines) + "\n")  # 12 pairs: the training's 10-fold evaluation needs >= 10
    ijbc = os.path.join(root, "IJBC")
    make_ijb(ijbc, seed=0, subjects=6, n_pairs=60)
    os.makedirs(os.path.join(ijbc, "loose_crop"))
    with open(os.path.join(ijbc, "meta", "ijbc_face_tid_mid.txt")) as f:
        for line in f:
            Image.fromarray(rng.integers(0, 256, (100, 110, 3), dtype=np.uint8)).save(
                os.path.join(ijbc, "loose_crop", line.split()[0]))


@pytest.mark.slow
def test_every_command_of_the_walkthrough_runs(tmp_path):
    blocks = _blocks()
    assert len(blocks) == 5 and all("python -m magloss." in b or "onnxruntime" in b for b in blocks)
    _tiny_set(str(tmp_path), np.random.default_rng(0))
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    outputs = []
    for block in blocks:
        run = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True, text=True, env=env)
        assert run.returncode == 0, f"{block}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
        outputs.append(run.stdout)
    assert "24 images, 6 identities, 32x32" in outputs[0] and "12 pairs (6 genuine)" in outputs[0]
    assert os.path.isfile(tmp_path / "run" / "model.pt")
    r = json.loads((tmp_path / "ijb.json").read_text())
    assert set(r["verification"]) >= {"TAR@FAR=0.0001", "auc"} and "G1" in r["identification"]
    assert "batch 4: max |Δ| embedding" in outputs[3] and "batch 3" in outputs[3]
    assert "cosine same person" in outputs[4] and "magnitudes" in outputs[4]
