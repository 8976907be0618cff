"""python -m magloss.train never loses a run, and fails before it starts.

What can be checked is checked before the first step (damaged data written with the
independent writers of tests/_insightface_files.py, a .bin too small for the folds, options,
the output folder); what goes wrong during a run (a record damaged in the middle of the
file, Ctrl-C, SIGKILL at any point, a failing evaluation) keeps the finished steps, and a
resumed run equals the uninterrupted one bit for bit (see tests/test_train.py for why
equality is the right test at one world size).

Kill points are deterministic: the command runs in a subprocess under a small driver that
wraps one function (the optimizer's step, ``torch.save``, ``os.rename``, ``os.replace``) and
sends a signal at its K-th call (before or after the call): to the process itself, to its
process group (as a terminal or a scheduler does: the DataLoader workers get it too), or to
its parent (torchrun, which forwards it to every rank).
"""

import errno
import multiprocessing
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

pytest.importorskip("PIL.Image")

from _insightface_files import encode, py2_pickle  # noqa: E402
from magloss import train  # noqa: E402
from test_train import N, _assert_same, _checkpoint, _common, _pixels, _rows, write_faces  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """test_train.py's tiny insightface folder (36 faces of 6 identities, 16x16, a 10-pair lfw.bin)."""
    return write_faces(str(tmp_path_factory.mktemp("faces")))


def _copy(faces, tmp_path, name="data"):
    d = tmp_path / name
    shutil.copytree(faces, d)
    return d


def _offsets(folder):
    with open(os.path.join(folder, "train.idx")) as f:
        return {int(k): int(o) for k, o in (line.split("\t") for line in f)}


def _fails(argv, capsys, code=2):
    """Runs the command in this process; returns its stderr after the expected exit."""
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == code
    return " ".join(capsys.readouterr().err.split())


# ------------------------------------------------------------------------ found before the first step
def _truncate(d):
    rec = d / "train.rec"
    with open(rec, "r+b") as f:
        f.truncate(os.path.getsize(rec) - 10)


def _idx_past_end(d):
    off = _offsets(d)
    last = max(off, key=off.get)
    off[last] = os.path.getsize(d / "train.rec") + 64
    (d / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in off.items()))


def _small_bin(d):
    rng = np.random.default_rng(5)
    imgs = [encode(_pixels(rng, np.array([100, 100, 100])), "PNG") for _ in range(16)]
    (d / "tiny.bin").write_bytes(py2_pickle(imgs, [k % 2 == 0 for k in range(8)]))


BEFORE = [
    # (damage, message): each was a traceback during (or after) training
    (_truncate, r"magloss.train: error: DATA_DIR: .*data/train\.rec: record \d+: truncated record"),
    (_idx_past_end, r"magloss.train: error: DATA_DIR: .*data/train\.idx: record \d+: offset \d+ lies past the end "
                    r"of .*data/train\.rec"),
    (lambda d: (d / "property").write_text("3,16,16"), r"DATA_DIR: .*data/property: says 3 classes, but the header "
                                                         r"record of .*train\.rec lists 6 identities"),
    (lambda d: (d / "property").write_text("60,16,16"), r"DATA_DIR: .*data/property: says 60 classes"),
    (_small_bin, r"DATA_DIR: .*data/tiny\.bin: 8 pairs, the 10-fold verification needs at least 10: repair it, or "
                 r"leave it out with --eval-sets lfw"),
]


@pytest.mark.parametrize("damage, message", BEFORE, ids=["truncated-rec", "idx-past-end", "property-3", "property-60",
                                                         "bin-8-pairs"])
def test_damaged_data_is_refused_before_the_first_step(faces, tmp_path, capsys, damage, message):
    d = _copy(faces, tmp_path)
    damage(d)
    out = tmp_path / "run"
    err = _fails(_common(str(d), out, "--batch-size", "8", "--max-steps", "2"), capsys)
    assert re.search(message, err), err
    assert not (out / "checkpoints").exists() and not (out / "train.csv").exists()


def test_a_small_bin_can_be_left_out(faces, tmp_path):
    d = _copy(faces, tmp_path)
    _small_bin(d)
    for sets, evaluated in (("lfw", ["lfw"]), ("", [])):
        out = tmp_path / f"run-{sets}"
        assert train.main(_common(str(d), out, "--batch-size", "8", "--max-steps", "2", "--eval-sets", sets)) == 0
        assert (out / "model.pt").exists()
        assert [e["set"] for e in _rows(out / "eval.csv")] == evaluated if evaluated else not (out / "eval.csv").exists()


def test_output_inside_an_image_folder_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(3)
    root = tmp_path / "people"
    for name in ("ann", "bob"):
        (root / name).mkdir(parents=True)
        for j in range(3):
            (root / name / f"{j}.png").write_bytes(encode(_pixels(rng, rng.integers(0, 256, 3)), "PNG"))
    for out in (root / "run", root, root / "ann" / "run"):
        err = _fails(_common(str(root), out, "--batch-size", "2", "--max-steps", "1"), capsys)
        assert re.search(r"--output: '.*' lies inside the image folder DATA_DIR '.*people', where its folders would "
                         r"become identities", err), err
    assert sorted(os.listdir(root)) == ["ann", "bob"] and sorted(os.listdir(root / "ann")) == ["0.png", "1.png", "2.png"]
    assert train.main(_common(str(root), tmp_path / "outside", "--batch-size", "2", "--max-steps", "1")) == 0


def test_unwritable_output_is_refused(faces, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    err = _fails(_common(faces, tmp_path / "file" / "run", "--batch-size", "8"), capsys)
    assert re.search(r"--output: cannot write into '.*file/run'", err), err


def test_unwritable_config_is_refused_before_the_first_step(faces, tmp_path, capsys):
    """config.json is written with the other output checks: a failure is one line naming it, exit 2,
    and no step is trained (a folder in its place makes the rename fail)."""
    out = tmp_path / "run"
    (out / "config.json").mkdir(parents=True)
    err = _fails(_common(faces, out, "--batch-size", "8", "--max-steps", "2"), capsys)
    assert re.search(r"--output: cannot write config\.json: .*config\.json", err), err
    assert not (out / "checkpoints").exists() and not (out / "train.csv").exists()


def test_resume_accepts_the_value_the_run_used(faces, tmp_path, capsys):
    """The checkpoint stores --margin unset (None = the loss's default, 0.5 for ArcFace): giving
    0.5 again is no change; 0.3 is."""
    out = tmp_path / "run"
    assert train.main(_common(faces, out, "--batch-size", "8", "--max-steps", "1", "--eval-every", "0")) == 0
    err = _fails([faces, "--output", str(out), "--resume", "--margin", "0.3"], capsys)
    assert "--margin 0.3 (the checkpoint has the loss's default 0.5)" in err
    assert train.main([faces, "--output", str(out), "--resume", "--margin", "0.5", "--max-steps", "2",
                       "--no-progress"]) == 0
    assert [int(r["step"]) for r in _rows(out / "train.csv")] == [1, 2]


def test_resume_that_does_not_fit_is_refused(faces, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(_common(faces, out, "--batch-size", "8", "--max-steps", "1", "--eval-every", "0")) == 0
    d = _copy(faces, tmp_path)
    (d / "property").write_text("6,32,32")             # another input size: the backbone's FC layer differs
    err = _fails([str(d), "--output", str(out), "--resume", "--no-progress"], capsys)
    assert re.search(r"--resume: the checkpoint '.*step-00000001' does not fit this model \(input size 32x32 from "
                     r"DATA_DIR; another data set\?\)", err), err
    state = out / "checkpoints" / "step-00000001" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])          # a damaged checkpoint file
    err = _fails([faces, "--output", str(out), "--resume", "--no-progress"], capsys)
    assert re.search(r"--resume: cannot read '.*step-00000001/state\.pt'", err), err


# ------------------------------------------------------------------------ the logged accuracy
def test_logged_accuracy_is_that_of_the_step_before_its_update(faces, tmp_path):
    """Step 1's accuracy: its embeddings against the initial class matrix. The learning rate only
    acts in the update, so a huge and a tiny one log the same accuracy; it equals an
    independent float64 arg-max on the initial weights and the first batch."""
    opts = ["--batch-size", "8", "--max-steps", "1", "--warmup-epochs", "0", "--eval-every", "0"]
    acc = {}
    for lr in ("100", "1e-12"):
        out = tmp_path / f"lr{lr}"
        assert train.main(_common(faces, out, *opts, "--lr", lr)) == 0
        acc[lr] = float(_rows(out / "train.csv")[0]["accuracy"])

    args, explicit = train.parse(_common(faces, tmp_path / "fresh", *opts))
    run = train.Run(args, explicit)
    try:
        images, labels, errors = next(iter(run._loader()))
        torch.manual_seed(train._mix(0, 0, 0))               # step 0's flips, as the run draws them
        x = (images.float() - 127.5) / 127.5
        x = torch.where((torch.rand(x.shape[0]) < 0.5)[:, None, None, None], x.flip(-1), x)
        run.backbone.train()
        with torch.no_grad():
            emb = run.backbone(x).double()
        w = run.head.weight.detach().double()
    finally:
        run.close()
    cos = (emb / emb.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    want = (cos.argmax(dim=1) == labels).double().mean().item()
    assert list(errors) == [""] * 8
    assert acc["100"] == acc["1e-12"] == pytest.approx(want, abs=1e-12)


# ------------------------------------------------------------------------ during the run
DRIVER = textwrap.dedent("""
    import multiprocessing.process, os, signal, subprocess, sys, time
    import torch
    from torch.utils.data._utils import signal_handling
    from magloss import train
    from magloss.train.loop import Loop

    # MAGLOSS_TEST_HOOK = "what:K:when:[to-]signal[:substring]": signal at the K-th call of what
    # (whose first arguments contain substring, when given), before or after the call; sent to
    # this process, or with to = "group" to its process group (sent by another process), with
    # "parent" (on rank 0 only) to its parent, torchrun, then waiting until torchrun has
    # forwarded it here
    what, k, when, sig, *sub = os.environ["MAGLOSS_TEST_HOOK"].split(":")
    to, _, sig = sig.rpartition("-")
    received = []
    on_signal = getattr(Loop, "_on_signal", None)       # the run's handler of Ctrl-C and SIGTERM

    def recording(self, signum, frame):
        received.append(signum)
        return on_signal(self, signum, frame)

    if on_signal is not None:
        Loop._on_signal = recording

    def send(signum):
        if to == "group":     # from another process, as a terminal's or a scheduler's
            subprocess.run([sys.executable, "-c", "import os, sys; os.killpg(int(sys.argv[1]), int(sys.argv[2]))",
                            str(os.getpgid(0)), str(int(signum))], check=True, start_new_session=True)
        elif to == "parent":
            os.kill(os.getppid(), signum)
            deadline = time.monotonic() + 60
            while not received and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            os.kill(os.getpid(), signum)

    if to == "parent" and os.environ.get("RANK", "0") != "0":
        k = "0"                       # the other ranks only receive what torchrun forwards
    process = multiprocessing.process.BaseProcess
    owner, name = {"step": (torch.optim.SGD, "step"), "save": (torch, "save"), "rename": (os, "rename"),
                   "replace": (os, "replace"), "worker": (signal_handling, "_set_worker_signal_handlers")}[what]
    original, calls = getattr(owner, name), [0]
    if what == "worker":      # in the K-th process started (a DataLoader worker), as torch sets its
        start = process.start     # SIGTERM handler (which kills the worker) before the run's
                                  # worker_init_fn: the parent counts, the forked child inherits the count

        def counting_start(self, *a, **kw):
            calls[0] += 1
            return start(self, *a, **kw)

        process.start = counting_start

    def hooked(*a, **kw):
        hit = not sub or any(sub[0] in str(v) for v in a[:2])
        calls[0] += hit and what != "worker"
        fire = hit and calls[0] == int(k)
        if fire and when == "before":
            send(getattr(signal, sig))
        out = original(*a, **kw)
        if fire and when == "after":
            send(getattr(signal, sig))
        return out

    setattr(owner, name, hooked)
    torch.set_num_threads(1)
    try:
        status = train.main(sys.argv[1:])
    except SystemExit as exc:
        status = exc.code
    if os.environ.get("MAGLOSS_TEST_STATUS"):     # each rank's exit status (torchrun reports only its own)
        with open(os.environ["MAGLOSS_TEST_STATUS"] + "." + os.environ.get("RANK", "0"), "w") as f:
            f.write(str(status))
    sys.exit(status)
""")


def _hooked(tmp_path, argv, hook):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               MAGLOSS_TEST_HOOK=hook)
    return subprocess.run([sys.executable, str(driver), *argv], env=env, capture_output=True, text=True,
                          timeout=300, start_new_session=True)     # its own process group, for "group-"


RUN = ["--batch-size", "8", "--epochs", "3", "--warmup-epochs", "0.5", "--lr", "0.05", "--save-every", "2",
       "--eval-every", "3", "--max-steps", "6", "--keep-checkpoints", "3"]


@pytest.fixture(scope="module")
def uninterrupted(faces, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                  # as the killed runs (OMP_NUM_THREADS=1): the same arithmetic
    try:
        assert train.main(_common(faces, out, *RUN)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _same_as_uninterrupted(full, run):
    a_state, _, a_shards = _checkpoint(full, 6)
    b_state, _, b_shards = _checkpoint(run, 6)
    for k in ("step", "epoch", "position", "backbone", "optimizer", "head_state", "schedule"):
        _assert_same(a_state[k], b_state[k], k)
    _assert_same(a_shards, b_shards, "head")
    _assert_same(torch.load(full / "model.pt", weights_only=True), torch.load(run / "model.pt", weights_only=True),
                 "model.pt")
    volatile = ("images_per_s", "time")
    assert [{k: v for k, v in r.items() if k not in volatile} for r in _rows(run / "train.csv")] == \
           [{k: v for k, v in r.items() if k not in volatile} for r in _rows(full / "train.csv")]
    assert [(e["step"], e["accuracy_mean"]) for e in _rows(run / "eval.csv")] == \
           [(e["step"], e["accuracy_mean"]) for e in _rows(full / "eval.csv")]
    assert not [d for d in os.listdir(run / "checkpoints") if d.startswith(".")]   # no leftover of the kill


KILLS = [
    # torch.save calls: step 2's checkpoint (1 head shard, 2 state.pt), step 4's (3, 4), step 6's (5, 6), model.pt (7)
    ("step:3:after:SIGKILL", 2),          # between checkpoints: steps 3 is lost, redone
    ("save:3:before:SIGKILL", 2),         # step 4's checkpoint begun: nothing of it written
    ("save:4:before:SIGKILL", 2),         # step 4's class matrix written, its state.pt not
    ("save:4:after:SIGKILL", 2),          # step 4's files complete in the temporary folder, not renamed
    ("rename:2:after:SIGKILL", 2),        # step 4's folder in place, `latest` still says step 2
    ("replace:2:after:SIGKILL:latest", 4),  # `latest` says step 4, old checkpoints not yet removed
    ("save:7:before:SIGKILL", 6),         # every checkpoint written, model.pt not
    ("save:1:before:SIGKILL", None),      # killed in the first checkpoint: nothing to resume, start again
]


@pytest.mark.parametrize("hook, resumed_at", KILLS, ids=[h for h, _ in KILLS])
def test_killed_anywhere_then_resumed_equals_the_uninterrupted_run(faces, tmp_path, uninterrupted, hook, resumed_at):
    out = tmp_path / "run"
    proc = _hooked(tmp_path, _common(faces, out, *RUN), hook)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    latest = out / "checkpoints" / "latest"
    if resumed_at is None:
        assert not latest.exists()
        assert train.main(_common(faces, out, *RUN)) == 0
    else:
        assert latest.read_text().strip() == f"step-{resumed_at:08d}"
        assert train.main([faces, "--output", str(out), "--resume", "--no-progress"]) == 0
    _same_as_uninterrupted(uninterrupted, out)


def test_killed_while_replacing_a_checkpoint_of_the_same_step(faces, tmp_path, uninterrupted):
    """A run resumed from an older checkpoint into its own folder saves step 4 again: the
    complete step-4 folder is moved aside before the new one takes its name. Killed between
    the two renames, `latest` names a folder that is not there: --resume takes the one moved
    aside, and the run still ends as the uninterrupted one."""
    out = tmp_path / "run"
    assert train.main(_common(faces, out, *RUN[:-4], "--max-steps", "4", "--keep-checkpoints", "3")) == 0
    again = [faces, "--output", str(out), "--resume", str(out / "checkpoints" / "step-00000002"), "--max-steps", "4",
             "--no-progress"]
    proc = _hooked(tmp_path, again, "rename:1:after:SIGKILL:step-00000004")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "checkpoints" / "step-00000004").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert train.main([faces, "--output", str(out), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    _same_as_uninterrupted(uninterrupted, out)


def test_ctrl_c_saves_the_finished_steps_and_says_how_to_resume(faces, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = _hooked(tmp_path, _common(faces, out, *RUN), "step:3:before:SIGINT")   # Ctrl-C during step 3
    assert proc.returncode == 130, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(r"magloss\.train: interrupted at step 3; checkpoint of step 3 in .*run/checkpoints; resume "
                        r"with: python -m magloss\.train .* --output .*run --resume", lines[0]), lines[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    assert not (out / "model.pt").exists()
    assert train.main([faces, "--output", str(out), "--resume", "--no-progress"]) == 0
    _same_as_uninterrupted(uninterrupted, out)


SIGTERMS = [
    # (hook, workers, the step it stops at)
    ("step:3:before:SIGTERM", 0, 3),            # to the process, during step 3: step 3 finishes
    ("step:3:before:group-SIGTERM", 2, 3),      # to the process group: the DataLoader workers get it too
    ("save:4:before:group-SIGTERM", 2, 4),      # during step 4's checkpoint: it is completed, not redone
    ("replace:2:after:SIGTERM:latest", 0, 4),   # between step 4's `latest` and its clean-up
    ("worker:3:after:group-SIGTERM", 2, 4),     # from the 2nd epoch's first worker as it starts (after
]                                               # step 4), before it could ignore the signal itself


@pytest.mark.parametrize("hook, workers, at", SIGTERMS, ids=[h for h, _, _ in SIGTERMS])
def test_sigterm_saves_the_finished_steps_and_resumes_to_the_uninterrupted_run(faces, tmp_path, uninterrupted, hook,
                                                                                workers, at):
    """SIGTERM (a scheduler's preemption, docker stop) is handled as Ctrl-C: the step in progress
    finishes, its checkpoint is written, one line, exit 143 = 128 + SIGTERM; resumed, the run
    ends exactly as the uninterrupted one."""
    out = tmp_path / "run"
    proc = _hooked(tmp_path, _common(faces, out, *RUN, "--workers", str(workers)), hook)
    assert proc.returncode == 128 + signal.SIGTERM == 143, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(rf"magloss\.train: terminated by SIGTERM at step {at}; checkpoint of step {at} in "
                        r".*run/checkpoints; resume with: python -m magloss\.train .* --output .*run --resume",
                        lines[0]), lines[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{at:08d}"
    assert not (out / "model.pt").exists()
    assert train.main([faces, "--output", str(out), "--resume", "--no-progress"]) == 0
    _same_as_uninterrupted(uninterrupted, out)


def _sleeping_worker(ready):
    from magloss.train.inputs import _ignore_stop_signals

    _ignore_stop_signals(0)
    ready.set()
    time.sleep(120)


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="a POSIX rule (sigwaitinfo)")
def test_a_worker_ignores_a_schedulers_sigterm_but_not_its_parents(tmp_path):
    """A DataLoader worker outlives a SIGTERM from another process (a scheduler's, sent to the
    group) and Ctrl-C, so the main process can stop cleanly; its parent's SIGTERM still ends it
    (multiprocessing terminates daemonic children so at exit: ignoring that hung the exit)."""
    from magloss.train.inputs import _stop_signals_blocked

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    worker = ctx.Process(target=_sleeping_worker, args=(ready,), daemon=True)
    with _stop_signals_blocked():
        worker.start()
    try:
        assert ready.wait(60)
        for sig in ("SIGTERM", "SIGINT"):     # from another process
            subprocess.run([sys.executable, "-c", f"import os, signal; os.kill({worker.pid}, signal.{sig})"],
                           check=True, timeout=60)
        worker.join(1.0)
        assert worker.is_alive()
        worker.terminate()                    # the parent's SIGTERM
        worker.join(30)
        assert not worker.is_alive() and worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()


def test_sigterm_under_torchrun_stops_every_rank_at_one_step(faces, tmp_path):
    """torchrun, 2 processes: SIGTERM to torchrun (what a scheduler's preemption sends it),
    which forwards it to both ranks. They stop after the same step, save it together (one
    checkpoint of world size 2) and exit 143; resumed under torchrun, the run ends as an
    uninterrupted one of 2 processes, bit for bit."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MAGLOSS_TEST_HOOK"):
        env.pop(k, None)
    opts = ["--batch-size", "3", "--max-steps", "4", "--eval-every", "0", "--save-every", "3", "--sample-rate", "0.5"]

    def torchrun(out, *extra, hook="step:0:before:SIGTERM"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
               *_common(faces, out, *opts), *extra]
        return subprocess.run(cmd, cwd=str(tmp_path), env=dict(env, MAGLOSS_TEST_HOOK=hook,
                                                               MAGLOSS_TEST_STATUS=str(out) + ".status"),
                              capture_output=True, text=True, timeout=300, start_new_session=True)

    full = torchrun(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "run"
    proc = torchrun(out, hook="step:2:before:parent-SIGTERM")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0                   # torchrun itself ends with its SignalException
    assert [(tmp_path / f"run.status.{r}").read_text() for r in (0, 1)] == ["143", "143"], text[-3000:]
    assert len(re.findall(r"magloss\.train: terminated by SIGTERM", text)) == 1, text[-3000:]     # rank 0's line
    assert re.search(r"magloss\.train: terminated by SIGTERM at step 2; checkpoint of step 2 in .*run/checkpoints; "
                     r"resume with", text), text[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    state, meta, _ = _checkpoint(out, 2)
    assert (state["step"], meta["world_size"]) == (2, 2)
    again = torchrun(out, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    for step in (3, 4):
        a_state, _, a_shards = _checkpoint(tmp_path / "full", step)
        b_state, _, b_shards = _checkpoint(out, step)
        for k in ("step", "epoch", "position", "backbone", "optimizer", "head_state", "schedule"):
            _assert_same(a_state[k], b_state[k], k)
        _assert_same(a_shards, b_shards, "head")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_record_damaged_mid_file_stops_cleanly_with_the_finished_steps(faces, tmp_path, capsys, uninterrupted,
                                                                         workers):
    """A record that only a full read would find (wrong magic word in the middle of the .rec),
    drawn in step 3's batch: exit 2 naming the file and the record, steps 1-2 saved (equal to the
    uninterrupted run's step-2 checkpoint), and the repaired folder resumes to the same end."""
    sampler = train.GlobalBatchSampler(N, 8, 1, 0, 0, 0, 0)
    index = [i for i in list(sampler)[2] if i not in (0, N - 1)][0]    # the first and last are read at open
    key = index + 1                                                     # image keys 1 .. N
    d = _copy(faces, tmp_path)
    rec = d / "train.rec"
    good = rec.read_bytes()
    pos = _offsets(d)[key]
    rec.write_bytes(good[:pos] + b"\0\1\2\3" + good[pos + 4:])
    out = tmp_path / "run"
    err = _fails(_common(str(d), out, *RUN, "--workers", str(workers)), capsys)
    assert re.search(rf"magloss.train: error: .*data/train\.rec: record {key}: wrong magic number 0x03020100 .* "
                     rf"\(training stopped before step 3\); checkpoint of step 2 in .*run/checkpoints; resume with", err)
    assert "Traceback" not in err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    a_state, _, a_shards = _checkpoint(uninterrupted, 2)
    b_state, _, b_shards = _checkpoint(out, 2)
    _assert_same(a_state["backbone"], b_state["backbone"], "backbone")
    _assert_same(a_shards, b_shards, "head")
    rec.write_bytes(good)
    assert train.main([str(d), "--output", str(out), "--resume", "--no-progress"]) == 0
    _same_as_uninterrupted(uninterrupted, out)


# ------------------------------------------------------------------------ durability (fsync)
def _recorder(monkeypatch):
    """Records, in order, every fsync (the path of its descriptor), rename, replace and rmtree
    the process makes; the calls still happen."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name what an fsync'ed descriptor is")
    events = []
    real = {name: getattr(os, name) for name in ("fsync", "rename", "replace")}
    rmtree = shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real["fsync"](fd)

    def moving(name):
        def move(src, dst, *a, **kw):
            events.append((name, os.path.abspath(src), os.path.abspath(dst)))
            return real[name](src, dst, *a, **kw)
        return move

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", moving("rename"))
    monkeypatch.setattr(os, "replace", moving("replace"))
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **kw: (events.append(("rmtree", str(path))),
                                                                  rmtree(path, *a, **kw))[1])
    return events


def test_checkpoint_files_and_folders_are_fsynced_before_latest_names_them(faces, tmp_path, monkeypatch):
    """The order that makes a power loss harmless, checked on the calls of a real run (3
    checkpoints, the oldest removed): every file is fsync'ed before its rename; every folder
    whose entries changed is fsync'ed before the next commit (the rename of the checkpoint's
    folder, the replacement of `latest`); `checkpoints/` is fsync'ed after `latest` changed and
    before anything it named before is removed; the temporary folder and its head/ are
    fsync'ed before the folder takes its name."""
    events = _recorder(monkeypatch)
    out = (tmp_path / "run").resolve()
    root = str(out / "checkpoints")
    assert train.main(_common(faces, out, "--batch-size", "8", "--max-steps", "3", "--save-every", "1",
                              "--keep-checkpoints", "2", "--eval-every", "0")) == 0
    synced = lambda path, lo, hi: any(e == ("fsync", path) for e in events[lo:hi])   # noqa: E731
    moves = [i for i, e in enumerate(events) if e[0] in ("rename", "replace")]
    commits = [i for i in moves if events[i][2] == os.path.join(root, "latest")
               or (events[i][0] == "rename" and os.path.isdir(events[i][2]))]
    assert len([i for i in commits if events[i][2].endswith("latest")]) == 3
    for i in moves:
        _, src, dst = events[i]
        if os.path.basename(src).startswith(".tmp-"):           # a checkpoint's folder takes its name
            start = max([j for j in commits if j < i], default=0)
            for d in (src, os.path.join(src, "head")):
                assert synced(d, start, i), f"{d} not fsync'ed before its rename"
        elif not os.path.isdir(dst):                             # a file replaces its name
            before = max([j for j in moves if j < i and events[j][1] == src], default=-1)
            assert synced(src, before + 1, i), f"{src} not fsync'ed before it became {dst}"
        until = min([j for j in commits if j > i], default=len(events))
        assert synced(os.path.dirname(dst), i + 1, until), f"{os.path.dirname(dst)} not fsync'ed after {events[i]}"
    removals = [i for i, e in enumerate(events) if e[0] == "rmtree" and e[1].startswith(root + os.sep + "step-")]
    assert removals, "the oldest checkpoint was not removed: the test saw no removal to order"
    for i in removals:
        last = max(j for j in commits if j < i and events[j][2].endswith("latest"))
        assert synced(root, last + 1, i), f"{events[i][1]} removed before `latest` was on disk"
    assert synced(str(out), max(j for j in moves if events[j][2] == str(out / "model.pt")) + 1, len(events))


def _failing_fsync(monkeypatch, match, nth=1):
    """os.fsync raising OSError(EIO) at the ``nth`` call on a descriptor whose path contains ``match``."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to choose the descriptor that fails")
    real, calls = os.fsync, [0]

    def fsync(fd):
        if match in os.readlink(f"/proc/self/fd/{fd}"):
            calls[0] += 1
            if calls[0] == nth:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


FSYNC_FAILURES = [
    # (the file whose fsync fails before its rename, at its n-th write; what the line says; the
    # step `latest` still names). RUN saves steps 2, 4 and 6, then writes model.pt.
    ("step-00000004/state.pt", 1, "the checkpoint of step 4", 2),               # rank 0's state file
    ("step-00000004/head/shard-00000-of-00001.pt", 1, "the checkpoint of step 4", 2),   # a class-matrix shard
    ("step-00000004/head/meta.json", 1, "the checkpoint of step 4", 2),
    ("checkpoints/latest", 2, "the checkpoint of step 4", 2),                   # `latest` itself keeps naming step 2
    ("model.pt", 1, "model.pt", 6),                                             # after the last checkpoint
]


@pytest.mark.parametrize("match, nth, what, saved", FSYNC_FAILURES, ids=[os.path.basename(f[0]) for f in FSYNC_FAILURES])
def test_a_failing_fsync_stops_with_one_line_and_keeps_the_previous_checkpoint(faces, tmp_path, capsys, monkeypatch,
                                                                              uninterrupted, match, nth, what, saved):
    """An fsync that fails (EIO: the data may not be on disk) while step 4's checkpoint or
    model.pt is written: exit 1 with one line naming the file, `latest` still names the
    previous complete checkpoint, no temporary file is left in the way, and the resumed run
    ends as the uninterrupted one."""
    out = tmp_path / "run"
    _failing_fsync(monkeypatch, match + ".tmp", nth)
    err = _fails(_common(faces, out, *RUN), capsys, code=1)
    assert re.fullmatch(rf"magloss\.train: error: cannot write {what}: .*{re.escape(match)}: fsync failed: "
                        rf"Input/output error; checkpoint of step {saved} in .*run/checkpoints; resume with: "
                        rf"python -m magloss\.train .* --output .*run --resume", err), err
    assert "Traceback" not in err
    assert (out / "checkpoints" / "latest").read_text() == f"step-{saved:08d}\n"
    assert not [f for _, _, files in os.walk(out) for f in files if ".tmp" in f]
    assert not (out / "model.pt").exists()
    monkeypatch.undo()
    assert train.main([faces, "--output", str(out), "--resume", "--no-progress"]) == 0
    _same_as_uninterrupted(uninterrupted, out)


def _save_with_rank_1_failing(rank, world, group, out_dir):
    """spawn_worlds phase: a 2-rank class matrix saved while rank 1's shard fsync fails."""
    import magloss.distributed as mdist
    from magloss import checkpoint as ckpt

    head = mdist.ShardedArcFaceLoss(4, 6, group=group)
    real = os.fsync
    if rank == 1:
        os.fsync = lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, os.strerror(errno.EIO))) \
            if "shard-00001" in os.readlink(f"/proc/self/fd/{fd}") else real(fd)
    try:
        ckpt.save_class_matrix(os.path.join(out_dir, "ck"), head)
        return "saved"
    except OSError as exc:
        return str(exc)
    finally:
        os.fsync = real


def test_a_rank_whose_shard_fails_stops_every_rank(tmp_path):
    """Under a process group, a shard that cannot be fsync'ed raises on its rank (naming the
    file) and on the others (another rank failed), instead of leaving them in a barrier; no
    meta.json is written, so the folder is never taken for a checkpoint."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to choose the descriptor that fails")
    from _dist_utils import spawn_worlds

    got = spawn_worlds(_save_with_rank_1_failing, [2], tmp_path)
    ck = os.path.join(str(tmp_path), "ck")
    assert got[(2, 1)] == f"[Errno {errno.EIO}] {ck}/shard-00001-of-00002.pt: fsync failed: {os.strerror(errno.EIO)}"
    assert got[(2, 0)] == f"[Errno {errno.EIO}] {ck}: another rank failed to write its part"
    assert sorted(os.listdir(ck)) == ["shard-00000-of-00002.pt"]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_a_file_system_without_directory_fsync_is_skipped(tmp_path, monkeypatch, code):
    """fsync on a directory refused as unsupported (some network file systems): skipped; an
    I/O error on it is an error naming the directory."""
    from magloss import checkpoint as ckpt

    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(code, os.strerror(code)))
                        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")) else real(fd))
    ckpt.write_atomically(str(tmp_path / "f"), lambda f: f.write(b"x"))
    assert (tmp_path / "f").read_bytes() == b"x"
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError, match=rf"{re.escape(str(tmp_path))}: fsync of the directory failed: Input/output"):
        ckpt.fsync_dir(str(tmp_path))


def test_no_directory_fsync_where_the_platform_has_none(tmp_path, monkeypatch):
    """Without os.O_DIRECTORY (Windows: a directory cannot be opened) only the file is fsync'ed."""
    from magloss import checkpoint as ckpt

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_mode), real(fd))[1])
    monkeypatch.delattr(os, "O_DIRECTORY")
    ckpt.write_atomically(str(tmp_path / "f"), lambda f: f.write(b"y"))
    assert (tmp_path / "f").read_bytes() == b"y"
    assert len(synced) == 1 and stat.S_ISREG(synced[0])


def _with_bad_magic(faces, tmp_path, key):
    """A copy of the faces folder whose record ``key`` starts with a wrong magic number."""
    d = _copy(faces, tmp_path)
    rec = d / "train.rec"
    data = bytearray(rec.read_bytes())
    pos = _offsets(d)[key]
    data[pos:pos + 4] = b"\0\1\2\3"
    rec.write_bytes(bytes(data))
    return d


def test_a_damaged_record_in_the_first_batch_saves_nothing(faces, tmp_path, capsys):
    index = [i for i in list(train.GlobalBatchSampler(N, 8, 1, 0, 0, 0, 0))[0] if i not in (0, N - 1)][0]
    d = _with_bad_magic(faces, tmp_path, index + 1)
    out = tmp_path / "run"
    err = _fails(_common(str(d), out, *RUN), capsys)
    assert re.search(rf"train\.rec: record {index + 1}: wrong magic number .* \(training stopped before step 1\); no "
                     rf"step was finished, nothing saved$", err), err
    assert not (out / "checkpoints").exists()


def test_a_damaged_record_on_one_rank_stops_every_rank_at_the_same_step(faces, tmp_path):
    """torchrun, 2 processes of 3 images: rank 1's batch of step 2 holds the damaged record. Both
    ranks stop before step 2 (no hang in a collective), step 1 is saved, rank 1 names the record."""
    index = [i for i in list(train.GlobalBatchSampler(N, 3, 2, 1, 0, 0, 0))[1] if i not in (0, N - 1)][0]
    d = _with_bad_magic(faces, tmp_path, index + 1)
    out = tmp_path / "w2"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "magloss.train", *_common(str(d), out, "--batch-size", "3", "--max-steps", "4", "--eval-every", "0",
                                     "--sample-rate", "0.5")]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(rf"magloss.train: error: .*train\.rec: record {index + 1}: wrong magic number .* \(training "
                     rf"stopped before step 2\); checkpoint of step 1", text), text[-3000:]
    assert "magloss.train: error: another rank read a damaged record (training stopped before step 2)" in text
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000001"
    state, meta, _ = _checkpoint(out, 1)
    assert (state["step"], meta["world_size"]) == (1, 2)


def test_a_failing_evaluation_is_reported_and_the_outputs_stay(faces, tmp_path, capsys, monkeypatch):
    from magloss.data import VerificationBin

    def broken(self, *a, **kw):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(VerificationBin, "evaluate", broken)
    out = tmp_path / "run"
    assert train.main(_common(faces, out, "--batch-size", "8", "--max-steps", "2", "--eval-every", "1")) == 0
    err = capsys.readouterr().err
    assert err.count("magloss.train: warning: step 1: evaluation of") == 1
    assert re.search(r"step 2: evaluation of .*lfw\.bin failed, skipped: RuntimeError: out of memory \(simulated\)",
                     err)
    assert (out / "model.pt").exists() and (out / "checkpoints" / "step-00000002" / "state.pt").exists()


# ------------------------------------------------------------------------ device decisions (pure)
DEVICE_CASES = [
    # (device_arg, amp, cuda_available, count, bf16, local_rank, world) -> device, backend, amp, scaler, pin, ids
    ((None, "auto", False, 0, False, 0, 1), ("cpu", "gloo", "off", False, False, None)),
    ((None, "auto", True, 1, True, 0, 1), ("cuda:0", "nccl", "bf16", False, True, None)),
    ((None, "auto", True, 1, False, 0, 1), ("cuda:0", "nccl", "fp16", True, True, None)),      # a V100, a T4
    ((None, "auto", True, 2, True, 1, 2), ("cuda:1", "nccl", "bf16", False, True, [1])),
    ((None, "auto", True, 2, False, 1, 2), ("cuda:1", "nccl", "fp16", True, True, [1])),
    (("cuda", "off", True, 2, True, 1, 2), ("cuda:1", "nccl", "off", False, True, [1])),
    (("cuda:1", "auto", True, 2, True, 0, 1), ("cuda:1", "nccl", "bf16", False, True, None)),
    (("cpu", "auto", True, 2, True, 1, 2), ("cpu", "gloo", "off", False, False, None)),         # torchrun on CPUs
    (("cpu", "bf16", False, 0, False, 0, 2), ("cpu", "gloo", "bf16", False, False, None)),
    ((None, "fp16", True, 1, True, 0, 1), ("cuda:0", "nccl", "fp16", True, True, None)),
]


@pytest.mark.parametrize("given, want", DEVICE_CASES)
def test_decide_device(given, want):
    plan = train.decide_device(*given)
    dtype = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[want[2]]
    assert (str(plan.device), plan.backend, plan.amp, plan.scaler, plan.pin_memory, plan.ddp_device_ids) == want
    assert plan.amp_dtype == dtype


DEVICE_ERRORS = [
    (("cuda", "auto", False, 0, False, 0, 1), r"--device cuda: no CUDA device is available \(use --device cpu\)"),
    (("cuda:2", "auto", True, 2, True, 0, 1), r"--device: cuda:2 does not exist \(this process sees 2 CUDA "
                                              r"devices\)"),
    ((None, "auto", True, 1, True, 1, 2), r"--device: cuda:1 does not exist \(this process sees 1 CUDA device\)"),
    (("cpu", "fp16", True, 1, True, 0, 1), r"--amp fp16: float16 autocast needs a CUDA device"),
    ((None, "fp16", False, 0, False, 0, 1), r"--amp fp16: float16 autocast needs a CUDA device"),
    ((None, "bf16", True, 1, False, 0, 1), r"--amp bf16: cuda:0 has no bfloat16 support"),
    (("tpu", "auto", False, 0, False, 0, 1), r"--device: expected cpu or cuda\[:N\], got 'tpu'"),
    (("cpu:1", "auto", False, 0, False, 0, 1), r"--device: expected cpu or cuda\[:N\], got 'cpu:1'"),
    (("mps", "auto", False, 0, False, 0, 1), r"--device: expected cpu or cuda\[:N\], got 'mps'"),
]


@pytest.mark.parametrize("given, message", DEVICE_ERRORS)
def test_decide_device_errors(given, message):
    with pytest.raises(train.UsageError, match=message):
        train.decide_device(*given)


def test_the_cpu_run_uses_a_cpu_gradient_scaler(faces, tmp_path):
    args, explicit = train.parse(_common(faces, tmp_path / "run", "--batch-size", "8", "--device", "cpu"))
    run = train.Run(args, explicit)
    try:
        assert run.plan == train.decide_device("cpu", "auto", False, 0, False, 0, 1)
        assert run.scaler._device == "cpu" and not run.scaler.is_enabled()
    finally:
        run.close()
