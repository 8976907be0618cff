"""The two commands as packages: every name they offered is importable from the package,
``python -m`` runs them, the installed script calls the entry point that exits, and the
demo's loss factory builds any loss of the registry."""

import inspect
import os
import subprocess
import sys
import tomllib

import pytest

from magloss import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the public names of the single-file modules the packages replace (users, docs and tests import them)
NAMES = {
    "magloss.train": ["LOSSES", "LOSS_OPTIONS", "CHECKPOINT_FORMAT", "EVAL_FOLDS", "UsageError", "Stopped",
                      "build_parser", "parse", "loss_kwargs", "DevicePlan", "decide_device", "Schedule",
                      "GlobalBatchSampler", "resize", "Resize", "open_data", "Log", "Run", "load_model", "main"],
    "magloss.demo": ["EXTRAS", "SmallCNN", "embed", "make_loss", "train_one", "open_set_pairs", "evaluate", "run_one",
                     "run_all", "make_plots", "build_parser", "METRICS", "summarize", "UsageError", "FOLDS",
                     "load_data", "main", "cli"],
}


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


@pytest.mark.parametrize("package", sorted(NAMES))
def test_the_public_names_stay_importable(package):
    mod = __import__(package, fromlist=["*"])
    missing = [n for n in NAMES[package] + list(getattr(mod, "__all__", [])) if not hasattr(mod, n)]
    assert not missing, f"{package} lacks {missing}"
    assert os.path.isdir(os.path.dirname(mod.__file__)) and mod.__file__.endswith("__init__.py")


@pytest.mark.parametrize("package, option", [("magloss.train", "--sample-rate"), ("magloss.demo", "--losses")])
def test_python_m_help(package, option):
    r = subprocess.run([sys.executable, "-m", package, "--help"], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: python -m {package}") and option in r.stdout


def test_the_demo_script_exits_with_one_line():
    """The console script runs ``sys.exit(entry())``: the entry point must report a bad option as
    one line and exit status 2 (main itself raises UsageError and returns a dict)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        target = tomllib.load(f)["project"]["scripts"]["magloss-demo"]
    module, func = target.split(":")
    code = f"import sys\nfrom {module} import {func} as entry\nsys.exit(entry(['--steps', '0']))\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "magloss.demo: error: --steps must be >= 1, got 0", r.stderr


@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_the_demo_builds_every_registered_loss(name):
    from magloss import demo

    args = demo.build_parser().parse_args(["--scale", "30", "--l-m", "0.4", "--arcface-margin", "0.3"])
    head = demo.make_loss(name, args, 16, 7)
    assert type(head) is registry.LOSSES[name]
    params = inspect.signature(registry.LOSSES[name].__init__).parameters
    expected = {"scale": 30.0} if "scale" in params else {}
    if name == "magface":
        expected.update(l_a=10.0, u_a=110.0, l_m=0.4, u_m=0.8, lambda_g=35.0)
    if name == "arcface":
        expected.update(margin=0.3)
    assert demo.loss_kwargs(name, args) == expected


@pytest.mark.parametrize("losses, extra, message", [
    ("magface,nosuch", [], r"--losses: unknown loss 'nosuch'; expected names from: softmax, normface"),
    ("cosface,cosface", [], r"--losses: cosface named twice"),
    ("arcface", ["--no-arcface"], r"--losses: no loss to train \(got 'arcface' and --no-arcface\)"),
])
def test_demo_losses_errors(tmp_path, losses, extra, message):
    from magloss import demo

    with pytest.raises(demo.UsageError, match=message):
        demo.main(["--losses", losses, *extra, "--out", str(tmp_path / "o"), "--no-progress"])


def test_demo_with_other_losses(tmp_path):
    """Two losses other than the default pair: each trained and measured, the first compared with the second."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from magloss import demo
    from test_demo import FAST, _check_outputs

    out = str(tmp_path / "out")
    report = demo.main(FAST + ["--dataset", "digits", "--no-cluster", "--losses", "cosface,subcenter_arcface",
                               "--out", out])
    on_disk = _check_outputs(out, report, ["cosface", "subcenter_arcface"])
    assert on_disk["model"]["cosface"] == {"scale": 64.0} and on_disk["model"]["subcenter_arcface"] == {"scale": 64.0}
    assert "CosFace verifies better than SubCenterArcFace (accuracy)" in on_disk["verdict"]["holds_in_seeds"]
