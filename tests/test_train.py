"""python -m magloss.train on a tiny insightface folder written in the test.

The folder (train.rec/train.idx/property with insightface's header record, scalar and
vector labels, and an lfw.bin) is written by the independent writers of
tests/_insightface_files.py. Runs are short CPU runs of the tiny backbone on 16×16
images, with one torch thread (the machine's cores are shared: more threads only spin).

Resume is checked **bit for bit**: at one world size, on one machine and one thread
count, every operation of the resumed run is the uninterrupted run's operation on the
same values (same samples, same flips from the per-step seed, the optimizer state and BN
statistics restored exactly), so anything but equality is a bug. At another world size
the arithmetic differs (per-rank BatchNorm statistics, other reduction orders), so there
the check is that the checkpoint *loads* exactly and training continues from its step
and its position in the epoch.
"""

import csv
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("PIL.Image")

from _insightface_files import encode, image_record, py2_pickle, write_recordio  # noqa: E402
from magloss import train  # noqa: E402
from magloss.data import VerificationBin  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES, PER_CLASS, SIZE, PAIRS = 6, 6, 16, 10
N = CLASSES * PER_CLASS


def _pixels(rng, colour):
    return np.clip(colour + rng.integers(-30, 30, size=(SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return write_faces(str(tmp_path_factory.mktemp("faces")))


def write_faces(folder):
    """36 PNG faces of 6 identities (one colour family each), insightface's header and identity
    records, labels alternating scalar / vector form; lfw.bin: 10 pairs, every other one same."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(CLASSES, 3))
    records = [(0, image_record([float(N + 1), float(N + 1 + CLASSES)], b""))]
    for c in range(CLASSES):
        for j in range(PER_CLASS):
            key = 1 + c * PER_CLASS + j
            label = float(c) if j % 2 else [float(c), 0.0]
            records.append((key, image_record(label, encode(_pixels(rng, colours[c]), "PNG"), rec_id=key)))
    for c in range(CLASSES):
        records.append((N + 1 + c, image_record([1.0 + c * PER_CLASS, 1.0 + (c + 1) * PER_CLASS], b"")))
    write_recordio(folder, records, prop=(CLASSES, SIZE, SIZE))
    images, issame = [], []
    for k in range(PAIRS):
        a, b = k % CLASSES, (k % CLASSES if k % 2 == 0 else (k + 1) % CLASSES)
        images += [encode(_pixels(rng, colours[a]), "PNG"), encode(_pixels(rng, colours[b]), "PNG")]
        issame.append(a == b)
    with open(os.path.join(folder, "lfw.bin"), "wb") as f:
        f.write(py2_pickle(images, issame))
    return folder


def _common(faces, out, *extra):
    return [faces, "--network", "tiny", "--embedding-size", "32", "--workers", "0", "--no-progress",
            "--log-every", "1", "--output", str(out), *extra]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _checkpoint(run_dir, step):
    path = os.path.join(run_dir, "checkpoints", f"step-{step:08d}")
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    meta = json.load(open(os.path.join(path, "head", "meta.json")))
    shards = [torch.load(os.path.join(path, "head", s["file"]), weights_only=True) for s in meta["shards"]]
    return state, meta, shards


def _assert_same(a, b, where=""):
    """Nested dicts/lists of tensors and numbers: equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _lr(t, base=0.05, warmup=0.5, epochs=3.0):
    """The schedule, written from its definition: linear warm-up, then half a cosine."""
    if t < warmup:
        return base * t / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / (epochs - warmup))))


def _full_and_resumed(faces, tmp_path, cut_at, steps, *opts):
    """Two runs of the same options (batch 8, lr 0.05, warm-up 0.5 epoch, a checkpoint every
    ``cut_at`` steps): ``full`` runs ``steps`` steps; ``cut`` stops at ``cut_at`` and is resumed
    with only what changes (the rest, loss, schedule, amp, ..., comes from the checkpoint)."""
    opts = ["--batch-size", "8", "--warmup-epochs", "0.5", "--lr", "0.05", "--save-every", str(cut_at), *opts]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train.main(_common(faces, full, *opts, "--max-steps", str(steps))) == 0
    assert train.main(_common(faces, cut, *opts, "--max-steps", str(cut_at))) == 0
    assert train.main([faces, "--output", str(cut), "--resume", "--max-steps", str(steps), "--no-progress"]) == 0
    return full, cut


# ------------------------------------------------------------------------------ single process
# MagFace under CPU bf16 autocast (loss parts with a regularizer); the softmax baseline in fp32
# (its bias is a head parameter outside the class matrix: it travels in state.pt); ArcFace with
# Partial FC in one process (a sharded head in a group of one; its sampling step is resumed)
@pytest.mark.parametrize("loss, extra, lambda_g", [("magface", ["--amp", "bf16"], 35.0), ("softmax", [], 0.0),
                                                   ("arcface", ["--sample-rate", "0.5"], 0.0)])
def test_single_process_run_logs_evaluates_and_resumes_bit_exact(faces, tmp_path, loss, extra, lambda_g):
    full, cut = _full_and_resumed(faces, tmp_path, 3, 6, "--epochs", "3", "--loss", loss, "--eval-every", "3", *extra)

    # the log: one row per step, the loss parts add up, the lr is the schedule's
    rows = _rows(full / "train.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    per_epoch = N // 8                                           # 4 steps, the last 4 images dropped
    for r in rows:
        k = int(r["step"])
        t = (k // per_epoch) + (k % per_epoch) * 8 / N           # epochs done after step k
        assert float(r["epoch"]) == pytest.approx(t, abs=1e-12)
        assert float(r["lr"]) == pytest.approx(_lr(t), rel=1e-12)
        assert float(r["loss"]) == pytest.approx(float(r["ce"]) + float(r["reg_weighted"]), rel=1e-5)
        assert float(r["reg_weighted"]) == pytest.approx(lambda_g * float(r["reg"]), rel=1e-5)
        assert 0 < float(r["magnitude_min"]) <= float(r["magnitude_mean"]) <= float(r["magnitude_max"])
        assert 0.0 <= float(r["accuracy"]) <= 1.0
    jsonl = [json.loads(line) for line in open(full / "log.jsonl")]
    assert [j["kind"] for j in jsonl].count("train") == 6 and [j["kind"] for j in jsonl].count("eval") == 2

    # evaluation at steps 3 and 6; step 6's equals an evaluation of the saved model (flip fusion)
    ev = _rows(full / "eval.csv")
    assert [(int(e["step"]), e["set"], int(e["pairs"])) for e in ev] == [(3, "lfw", PAIRS), (6, "lfw", PAIRS)]
    model = train.load_model(str(full / "model.pt"))
    again = VerificationBin(os.path.join(faces, "lfw.bin")).evaluate(model, flip=True)
    assert float(ev[1]["accuracy_mean"]) == again["accuracy_mean"]
    assert float(ev[1]["accuracy_std"]) == again["accuracy_std"]

    # interrupted at 3 and resumed = uninterrupted, bit for bit
    a_state, a_meta, a_shards = _checkpoint(full, 6)
    b_state, b_meta, b_shards = _checkpoint(cut, 6)
    for k in ("step", "epoch", "position", "backbone", "optimizer", "head_state", "schedule"):
        _assert_same(a_state[k], b_state[k], k)
    _assert_same(a_shards, b_shards, "head")
    assert a_state["step"] == 6 and (a_state["epoch"], a_state["position"]) == (1, 16)
    assert ("bias" in a_state["head_state"]) == (loss == "softmax")
    assert (a_meta["extra"].get("step"), b_meta["extra"].get("step")) == ((6, 6) if "--sample-rate" in extra
                                                                          else (None, None))
    b_rows = _rows(cut / "train.csv")
    assert [int(r["step"]) for r in b_rows] == [1, 2, 3, 4, 5, 6]
    volatile = ("images_per_s", "time")
    assert [{k: v for k, v in r.items() if k not in volatile} for r in b_rows] == \
           [{k: v for k, v in r.items() if k not in volatile} for r in rows]
    assert [e["accuracy_mean"] for e in _rows(cut / "eval.csv")] == [e["accuracy_mean"] for e in ev]

    # the class matrix actually trained (it is not the initialization any more)
    assert not torch.equal(a_shards[0]["weight"], _checkpoint(full, 3)[2][0]["weight"])


# The stateful and sub-center losses through the command: their state (AdaFace's norm statistics, CurricularFace's
# t, ElasticFace's generator, K sub-centers per class in the class-matrix checkpoint) must resume
# exactly: interrupted at step 2 and resumed = uninterrupted, bit for bit.
@pytest.mark.parametrize("loss, extra", [("adaface", []), ("curricularface", []),
                                         ("subcenter_arcface", ["--subcenters", "2"]),
                                         ("elastic_arcface", ["--plus"]), ("elastic_cosface", [])])
def test_stateful_losses_resume_bit_exact(faces, tmp_path, loss, extra):
    full, cut = _full_and_resumed(faces, tmp_path, 2, 4, "--epochs", "2", "--loss", loss, "--eval-every", "0", *extra)
    a_state, a_meta, a_shards = _checkpoint(full, 4)
    b_state, b_meta, b_shards = _checkpoint(cut, 4)
    for k in ("backbone", "optimizer", "head_state"):
        _assert_same(a_state[k], b_state[k], k)
    _assert_same(a_shards, b_shards, "head")
    assert a_meta["subcenters"] == (2 if loss == "subcenter_arcface" else 1)
    assert a_shards[0]["weight"].shape[0] == CLASSES * a_meta["subcenters"]
    # the state moved during training (else resuming it would prove nothing)
    if loss != "subcenter_arcface":
        with pytest.raises(AssertionError):
            _assert_same(a_state["head_state"], _checkpoint(full, 2)[0]["head_state"])


def test_resume_refuses_changed_options(faces, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(_common(faces, out, "--batch-size", "8", "--max-steps", "1", "--eval-every", "0")) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.main([faces, "--output", str(out), "--resume", "--network", "r18", "--margin", "0.3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--resume: these options differ from the checkpoint's" in err
    assert "--network r18 (the checkpoint has tiny)" in err and "--margin 0.3 (the checkpoint has the loss's default 0.5)" in err
    with pytest.raises(SystemExit):                    # a finished run's folder is not overwritten silently
        train.main(_common(faces, out, "--batch-size", "8", "--max-steps", "1"))
    assert "already holds a run's checkpoints: pass --resume" in capsys.readouterr().err


# ------------------------------------------------------------------------------ torchrun
def test_torchrun_two_processes_then_resume_at_world_one(faces, tmp_path):
    w2, w1 = tmp_path / "w2", tmp_path / "w1"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "magloss.train", *_common(faces, w2, "--batch-size", "3", "--max-steps", "4", "--save-every", "2",
                                     "--eval-every", "4", "--sample-rate", "0.5", "--lr", "0.05")]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [int(r["step"]) for r in _rows(w2 / "train.csv")] == [1, 2, 3, 4]
    assert [(int(e["step"]), e["set"]) for e in _rows(w2 / "eval.csv")] == [(4, "lfw")]
    state, meta, shards = _checkpoint(w2, 4)
    assert meta["world_size"] == 2 and [s["file"] for s in meta["shards"]] == \
        ["shard-00000-of-00002.pt", "shard-00001-of-00002.pt"]
    assert [(s["start"], s["end"]) for s in meta["shards"]] == [(0, 3), (3, 6)]
    assert (state["world_size"], state["step"], state["epoch"], state["position"]) == (2, 4, 0, 24)
    assert meta["extra"]["step"] == 4                  # Partial FC's step counter travels in meta.json

    # world 1, full softmax this time (sample rate is not fixed by the checkpoint)
    args, explicit = train.parse([faces, "--resume", str(w2), "--output", str(w1), "--max-steps", "6",
                                  "--sample-rate", "1", "--workers", "0", "--no-progress"])
    run = train.Run(args, explicit)
    try:
        assert (run.world, run.step, run.epoch, run.position) == (1, 4, 0, 24)
        assert isinstance(run.head, train.LOSSES["arcface"])  # the plain loss module, no process group
        _assert_same(run.backbone.state_dict(), state["backbone"], "backbone")
        want_w = torch.cat([shards[0]["weight"], shards[1]["weight"]])
        want_m = torch.cat([shards[0]["optim"]["momentum_buffer"], shards[1]["optim"]["momentum_buffer"]])
        assert torch.equal(run.head.weight.detach(), want_w)
        assert torch.equal(run.optimizer.state[run.head.weight]["momentum_buffer"], want_m)
        bb = run.optimizer.state_dict()["state"]
        for i, s in state["optimizer"]["state"].items():
            _assert_same(bb[i], s, f"optimizer state {i}")
        run.train()
    finally:
        run.close()
    rows = _rows(w1 / "train.csv")
    assert [int(r["step"]) for r in rows] == [5, 6]
    assert [float(r["epoch"]) for r in rows] == [pytest.approx(27 / N), pytest.approx(30 / N)]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    state1, meta1, _ = _checkpoint(w1, 6)
    assert (meta1["world_size"], state1["world_size"], state1["step"], state1["position"]) == (1, 1, 6, 30)


# ------------------------------------------------------------------------------ the command line
def test_help_works_without_the_extras():
    code = ("import sys; sys.modules['PIL'] = None; sys.modules['tqdm'] = None; sys.argv = ['x', '--help']; "
            "import runpy; runpy.run_module('magloss.train', run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for action in train.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text, flag
    for name in train.LOSSES:
        assert name in text
    assert "arcface (0.5)" in text and "cosface (0.35)" in text and "sphereface (4)" in text  # per-loss defaults


@pytest.fixture
def no_property(faces, tmp_path):
    d = tmp_path / "np"
    d.mkdir()
    for f in ("train.rec", "train.idx"):
        (d / f).write_bytes(open(os.path.join(faces, f), "rb").read())
    return str(d)


def _used_output(tmp_path):
    (tmp_path / "used" / "checkpoints").mkdir(parents=True)
    (tmp_path / "used" / "checkpoints" / "latest").write_text("step-00000001\n")
    return str(tmp_path / "used")


BAD = [
    (lambda f, t: [str(t / "nope")], r"DATA_DIR: '.*nope' is not a folder"),
    (lambda f, t: ["EMPTY"], r"holds neither train\.rec \(an insightface folder\) nor sub-folders"),
    (lambda f, t: ["NOPROP"], r"has train\.rec but no `property` file"),
    (lambda f, t: [f, "--loss", "circleloss"],
     r"argument --loss: invalid choice: 'circleloss' \(choose from '?softmax'?, '?normface'?, '?cosface'?, "
     r"'?arcface'?, '?combined'?, '?sphereface'?, '?magface'?, '?magcosface'?, '?adaface'?, '?curricularface'?, "
     r"'?subcenter_arcface'?, '?elastic_arcface'?, '?elastic_cosface'?, '?sface'?, '?uniface'?, '?sphereface2'?, "
     r"'?p2sgrad'?\)"),
    (lambda f, t: [f, "--loss", "arcface", "--l-a", "5"],
     r"--l-a is not an option of --loss arcface \(its options: --scale, --margin, --easy-margin, --straight-through\)"),
    (lambda f, t: [f, "--loss", "sphereface", "--margin", "1.5"], r"--margin: --loss sphereface expects an integer"),
    (lambda f, t: [f, "--loss", "arcface", "--margin", "-1"], r"--loss arcface: margin"),
    (lambda f, t: [f, "--loss", "softmax", "--sample-rate", "0.5"], r"--loss softmax has no class-sharded version"),
    (lambda f, t: [f, "--sample-rate", "0"], r"--sample-rate: expected a share of the classes in \(0, 1\]"),
    (lambda f, t: [f, "--batch-size", "40"], r"--batch-size: 40 x 1 processes = 40 images per step, but DATA_DIR "
                                             r"holds 36"),
    (lambda f, t: [f, "--batch-size", "0"], r"--batch-size: expected at least 2 \(BatchNorm needs two images"),
    (lambda f, t: [f, "--batch-size", "1"], r"--batch-size: expected at least 2 .*got 1"),
    (lambda f, t: [f, "--image-size", "20"], r"--image-size: expected multiples of 16"),
    (lambda f, t: [f, "--image-size", "big"], r"argument --image-size: expected H or HxW"),
    (lambda f, t: [f, "--amp", "fp16", "--device", "cpu"], r"--amp fp16: float16 autocast needs a CUDA device"),
    (lambda f, t: [f, "--epochs", "2", "--warmup-epochs", "2"], r"--epochs/--warmup-epochs"),
    # every option in its own words, before any step
    (lambda f, t: [f, "--gamma", "-1", "--schedule", "step"], r"--gamma: expected a decay factor in \(0, 1\]"),
    (lambda f, t: [f, "--gamma", "0"], r"--gamma: expected a decay factor in \(0, 1\] .*got 0\.0"),
    (lambda f, t: [f, "--momentum", "-0.1"], r"--momentum: expected a number in \[0, 1\), got -0\.1"),
    (lambda f, t: [f, "--momentum", "1"], r"--momentum: expected a number in \[0, 1\), got 1\.0"),
    (lambda f, t: [f, "--dropout", "1.5"], r"--dropout: expected a probability in \[0, 1\), got 1\.5"),
    (lambda f, t: [f, "--lr", "inf"], r"--lr: expected a finite number, got inf"),
    (lambda f, t: [f, "--epochs", "nan"], r"--epochs: expected a finite number, got nan"),
    (lambda f, t: [f, "--max-steps", "0"], r"--max-steps: expected a positive integer, got 0"),
    (lambda f, t: [f, "--epochs", "0.1", "--warmup-epochs", "0"], r"--epochs: 0\.1 epochs of 4 steps \(36 images, 8 per step\) is less than "
                                          r"one step: the run would train nothing"),
    (lambda f, t: [f, "--device", "tpu"], r"--device: expected cpu or cuda\[:N\], got 'tpu'"),
    (lambda f, t: [f, "--milestones", "18,10"], r"argument --milestones: expected increasing positive epochs"),
    (lambda f, t: [f, "--eval-sets", "lfw,cfp_fp"], r"--eval-sets: cfp_fp not in DATA_DIR \(it has: lfw\)"),
    (lambda f, t: [f, "--resume", str(t)], r"--resume '.*': no checkpoint there"),
    (lambda f, t: [f, "--output", "USED"], r"--output: '.*used' already holds a run's checkpoints"),
]


@pytest.mark.parametrize("make_argv, pattern", BAD, ids=[p[:40] for _, p in BAD])
def test_bad_arguments_are_reported_in_the_callers_words(faces, tmp_path, no_property, capsys, make_argv, pattern):
    argv = make_argv(faces, tmp_path)
    (tmp_path / "empty").mkdir()
    special = {"NOPROP": lambda: no_property, "USED": lambda: _used_output(tmp_path),
               "EMPTY": lambda: str(tmp_path / "empty")}
    argv = [special[a]() if a in special else a for a in argv]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "out")]
    if "--batch-size" not in argv:
        argv += ["--batch-size", "8"]
    with pytest.raises(SystemExit) as exc:
        train.main(argv + ["--workers", "0", "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "magloss.train: error:" in err and re.search(pattern, " ".join(err.split())), err
    assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_image_folder_with_other_sizes_is_resized(tmp_path):
    """An image folder (one sub-folder per identity), 20×24 images trained at --image-size 16, with
    DataLoader workers: the first image's size is not a multiple of 16, --image-size resizes."""
    rng = np.random.default_rng(1)
    root = tmp_path / "people"
    for name in ["ann", "bob", "cy"]:
        (root / name).mkdir(parents=True)
        for j in range(4):
            px = np.clip(rng.integers(0, 256, size=3) + rng.integers(-20, 20, size=(20, 24, 3)), 0, 255)
            (root / name / f"{j}.png").write_bytes(encode(px.astype(np.uint8), "PNG"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit):                   # 20x24 cannot enter the backbone as it is
        train.main(_common(str(root), out, "--batch-size", "4"))
    assert train.main(_common(str(root), out, "--batch-size", "4", "--image-size", "16", "--max-steps", "3",
                              "--workers", "2", "--loss", "cosface")) == 0
    assert [int(r["step"]) for r in _rows(out / "train.csv")] == [1, 2, 3]
    cfg = json.load(open(out / "config.json"))
    assert (cfg["input_size"], cfg["num_classes"], cfg["images"]) == ([16, 16], 3, 12)
    assert not os.path.exists(out / "eval.csv")       # no .bin set in an image folder: nothing to evaluate
    assert train.load_model(str(out / "model.pt"))(torch.zeros(2, 3, 16, 16)).shape == (2, 32)


def test_resize_keeps_the_right_size_and_resizes_the_others():
    i, j = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    img = (2 * i + 4 * j).to(torch.uint8).expand(3, 32, 32).contiguous()    # a linear ramp
    assert train.Resize((32, 32))(img) is img
    out = train.Resize((16, 16))(img)
    # any symmetric filter maps a ramp to its value at the output pixel's centre (2k + 0.5 in the
    # input); away from the border, where the filter is not cut
    k = torch.arange(16, dtype=torch.float64) * 2 + 0.5
    want = 2 * k[:, None] + 4 * k[None, :]                   # whole numbers: no rounding tie
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    assert torch.equal(out[:, 1:-1, 1:-1].double(), want[1:-1, 1:-1].expand(3, 14, 14))


def _overflow_case(rank, world, results_dir):
    from magloss.train import _overflow_everywhere

    head = torch.nn.Linear(3, 4, bias=False)
    for case, bad_rank in (("one", 1), ("none", None)):
        head.weight.grad = torch.full((4, 3), float(rank + 1))
        if rank == bad_rank:
            head.weight.grad[2, 1] = float("inf")
        _overflow_everywhere(head, None)
        torch.save(head.weight.grad.clone(), os.path.join(results_dir, f"{case}-{rank}.pt"))


def test_fp16_overflow_on_one_shard_makes_every_rank_skip(tmp_path):
    """GradScaler skips a step where *its* gradients overflow; with a sharded class matrix the
    ranks must agree. The helper runs before unscale_: an overflow on rank 1 poisons rank 0."""
    from _dist_utils import spawn

    spawn(_overflow_case, 2, tmp_path, str(tmp_path))
    one = [torch.load(tmp_path / f"one-{r}.pt") for r in range(2)]
    assert torch.isinf(one[0]).all()                                   # rank 0 learned of rank 1's Inf
    assert torch.isinf(one[1]).sum() == 1 and one[1][0, 0] == 2.0      # rank 1 left as it was
    for r in range(2):                                                 # no overflow: nothing changes
        assert torch.equal(torch.load(tmp_path / f"none-{r}.pt"), torch.full((4, 3), float(r + 1)))


def test_export_onnx_at_the_end_matches_the_trained_backbone(faces, tmp_path):
    """--export-onnx writes OUTPUT/model.onnx after model.pt; onnxruntime on it gives the
    normalized embedding and the magnitude of the saved backbone (computed here with torch)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = tmp_path / "run"
    assert train.main(_common(faces, out, "--batch-size", "8", "--max-steps", "2", "--export-onnx")) == 0
    model = train.load_model(str(out / "model.pt"))
    x = torch.rand(3, 3, *model.input_size) * 2 - 1
    with torch.no_grad():
        emb = model(x).double()
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got_emb, got_mag = sess.run(["embedding", "magnitude"], {"images": x.numpy()})
    mag = emb.norm(dim=1)
    np.testing.assert_allclose(got_mag.reshape(-1), mag.numpy(), rtol=1e-4)
    np.testing.assert_allclose(got_emb, (emb / mag[:, None]).numpy(), atol=1e-5)


def test_export_onnx_without_the_extra_is_refused_before_training(faces, tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        train.main(_common(faces, out, "--batch-size", "8", "--max-steps", "2", "--export-onnx"))
    assert exit_.value.code == 2
    assert "error: --export-onnx: ONNX export needs onnx" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
