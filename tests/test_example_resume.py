"""examples/train_sharded.py --resume: an interrupted and resumed run equals an uninterrupted one.

Three runs of the example on the CPU (gloo): N steps straight through; N/2 steps saved; the
rest resumed from that checkpoint. The final class matrix and its momentum, the backbone and
its momentum, the head's replicated state and the losses printed for the resumed steps must be
bit-identical to the uninterrupted run (same world size, same operations in the same order).
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._pytree import tree_flatten

from magloss import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_sharded.py")
SMALL = ["--num-classes", "23", "--batch-size", "6", "--embedding-size", "8", "--device", "cpu", "--lr", "0.2"]


def _run(tmp_path, world, args):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
                if world > 1 else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(launcher + [EXAMPLE] + SMALL + args, cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _losses(stdout):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"step\s+(\d+)\s+loss\s+(\S+)", stdout)}


def _state(path):
    weight, optim = checkpoint.load_full(path)
    backbone = torch.load(os.path.join(path, "backbone.pt"), weights_only=True)
    trainer = torch.load(os.path.join(path, "trainer.pt"), weights_only=True)
    return weight, optim, backbone, trainer


def _assert_equal(a, b):
    """Two nested containers of tensors and numbers: one structure, equal leaves bit for bit."""
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    assert spec_a == spec_b
    for i, (x, y) in enumerate(zip(leaves_a, leaves_b)):
        assert (torch.equal(x, y) if torch.is_tensor(x) else x == y), f"leaf {i} of {spec_a}"


@pytest.mark.parametrize("world, loss, extra", [
    (2, "magface", ["--sample-rate", "0.5"]),           # Partial FC: the sampling step must carry over
    (1, "elastic_arcface", ["--sample-rate", "0.6"]),   # the margin generator must carry over
])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, world, loss, extra):
    common = ["--loss", loss] + extra
    straight = _run(tmp_path, world, common + ["--steps", "4", "--save", str(tmp_path / "straight")])
    _run(tmp_path, world, common + ["--steps", "2", "--save", str(tmp_path / "half")])
    resumed = _run(tmp_path, world, common + ["--steps", "4", "--resume", str(tmp_path / "half"),
                                              "--save", str(tmp_path / "resumed")])
    assert "resumed from" in resumed and "at step 2" in resumed
    assert sorted(_losses(resumed)) == [2, 3]
    assert {k: v for k, v in _losses(straight).items() if k >= 2} == _losses(resumed)
    a, b = _state(str(tmp_path / "straight")), _state(str(tmp_path / "resumed"))
    assert a[3]["step"] == b[3]["step"] == 4
    assert a[1]["momentum_buffer"].abs().sum() > 0 and len(a[3]["backbone_optimizer"]) > 0
    _assert_equal(a, b)
    if world > 1:   # the same checkpoint resumes at another world size (the class matrix reshards)
        other = _run(tmp_path, 1, common + ["--steps", "3", "--resume", str(tmp_path / "half"),
                                            "--save", str(tmp_path / "other")])
        assert sorted(_losses(other)) == [2]
        assert _state(str(tmp_path / "other"))[3]["step"] == 3


def test_resume_refuses_another_loss(tmp_path):
    _run(tmp_path, 1, ["--loss", "arcface", "--steps", "1", "--save", str(tmp_path / "ck")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, EXAMPLE] + SMALL + ["--loss", "cosface", "--steps", "2", "--resume",
                                                                str(tmp_path / "ck")],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "the checkpoint was trained with --loss arcface, this run asks for cosface" in proc.stderr
    assert "Traceback" not in proc.stderr
