"""tools/prebuild_ext.py: the key that decides whether a carried extension may be used, the
toolkit lookup, and the install step, on a scratch source tree (no compiler, no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import prebuild_ext  # noqa: E402

SUFFIX = prebuild_ext._ext_suffix()


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A source tree with csrc/ and setup.py, and an empty prebuilt folder."""
    (tmp_path / "csrc" / "sub").mkdir(parents=True)
    (tmp_path / "csrc" / "engine.cu").write_text("kernel v1\n")
    (tmp_path / "csrc" / "sub" / "b.h").write_text("header\n")
    (tmp_path / "setup.py").write_text("setup()\n")
    (tmp_path / "magloss").mkdir()
    monkeypatch.setattr(prebuild_ext, "ROOT", tmp_path)
    monkeypatch.setenv("MAGLOSS_PREBUILT_DIR", str(tmp_path / ".prebuilt"))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    return tmp_path


# each edit must change the key; the key must not change without one
EDITS = [
    ("a byte of a kernel", lambda t, mp: (t / "csrc" / "engine.cu").write_text("kernel v2\n")),
    ("a header in a subfolder", lambda t, mp: (t / "csrc" / "sub" / "b.h").write_text("header!\n")),
    ("a new source file", lambda t, mp: (t / "csrc" / "extra.cpp").write_text("")),
    ("a renamed file, same bytes", lambda t, mp: (t / "csrc" / "engine.cu").rename(t / "csrc" / "engine2.cu")),
    ("setup.py (compile flags)", lambda t, mp: (t / "setup.py").write_text("setup(x=1)\n")),
    ("the arch list", lambda t, mp: mp.setenv("TORCH_CUDA_ARCH_LIST", "8.0")),
    ("the torch version", lambda t, mp: mp.setattr(torch, "__version__", "0.0.0+other")),
    ("torch's CUDA version", lambda t, mp: mp.setattr(torch.version, "cuda", "99.9")),
]


@pytest.mark.parametrize("what,edit", EDITS, ids=[e[0] for e in EDITS])
def test_key_changes_with_every_input(tree, monkeypatch, what, edit):
    before = prebuild_ext.key()
    assert prebuild_ext.key() == before            # deterministic
    edit(tree, monkeypatch)
    assert prebuild_ext.key() != before, what


def test_key_ignores_files_outside_csrc(tree):
    before = prebuild_ext.key()
    (tree / "magloss" / "losses.py").write_text("changed\n")
    (tree / "README.md").write_text("changed\n")
    assert prebuild_ext.key() == before


def test_install_copies_the_matching_artefact(tree):
    k = prebuild_ext.key()
    folder = tree / ".prebuilt" / k
    folder.mkdir(parents=True)
    (folder / f"_C{SUFFIX}").write_bytes(b"\x7fELF stand-in")
    (tree / "magloss" / "_C.stale.so").write_bytes(b"old")   # an earlier build is replaced
    assert prebuild_ext.install(allow_build=False) == "prebuilt"
    assert (tree / "magloss" / f"_C{SUFFIX}").read_bytes() == b"\x7fELF stand-in"
    assert not (tree / "magloss" / "_C.stale.so").exists()


def test_install_refuses_a_stale_artefact(tree):
    old = tree / ".prebuilt" / "0123456789abcdef"     # built from other sources
    old.mkdir(parents=True)
    (old / f"_C{SUFFIX}").write_bytes(b"stale")
    with pytest.raises(RuntimeError, match=prebuild_ext.key()):
        prebuild_ext.install(allow_build=False)
    assert not list((tree / "magloss").glob("_C*.so"))


def test_cuda_home_prefers_a_complete_toolkit(tree, tmp_path, monkeypatch):
    good = tmp_path / "toolkit"
    (good / "bin").mkdir(parents=True)
    (good / "include").mkdir()
    (good / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (good / "include" / "cuda_runtime_api.h").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(good))
    assert prebuild_ext.cuda_home() == good
    # a root with nvcc but no headers (what torch guesses from a wrapper script) is passed over
    (good / "include" / "cuda_runtime_api.h").unlink()
    try:
        home = prebuild_ext.cuda_home()
    except RuntimeError as exc:
        assert str(good) in str(exc)
    else:
        assert home != good and (home / "include" / "cuda_runtime_api.h").is_file()


def test_cli_key_matches_the_function(tree, capsys):
    assert prebuild_ext.main(["key"]) == 0
    assert capsys.readouterr().out.strip() == prebuild_ext.key()
    assert prebuild_ext.key_parts()["files"] == 3   # 2 under csrc/ + setup.py


# ---- build(): setup.py run in a scratch copy, the artefact filed under its key (a stand-in setup.py) -----
FAKE_SETUP = """
import os, pathlib, sys
assert sys.argv[1:] == ["build_ext", "--inplace"], sys.argv
assert os.environ["MAGLOSS_BUILD_CUDA"] == "1" and os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
assert os.environ["CUDA_HOME"] + "/bin" == os.environ["PATH"].split(os.pathsep)[0]
if os.environ.get("FAKE_BUILD_FAIL"):
    print("csrc/engine.cu(1): error: stand-in compiler error")
    sys.exit(1)
pathlib.Path("magloss/_C" + {suffix!r}).write_bytes(b"built from " + pathlib.Path("csrc/engine.cu").read_bytes())
log = pathlib.Path("build/temp.stand-in/.ninja_log")
log.parent.mkdir(parents=True)
log.write_text("# ninja log v5\\n0\\t2500\\t0\\t/x/engine.o\\tabc\\n100\\t9100\\t0\\t/x/bindings.o\\tdef\\n")
"""


@pytest.fixture
def buildable(tree, tmp_path, monkeypatch):
    """The scratch tree with what setup.py needs, a toolkit directory and a torch that says it has CUDA."""
    (tree / "setup.py").write_text(FAKE_SETUP.format(suffix=SUFFIX))
    (tree / "pyproject.toml").write_text("")
    (tree / "README.md").write_text("")
    kit = tmp_path / "kit"
    (kit / "bin").mkdir(parents=True)
    monkeypatch.setattr(prebuild_ext, "cuda_home", lambda: kit)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    return tree


def test_build_files_the_artefact_under_its_key(buildable, capsys):
    stale = buildable / ".prebuilt" / "0123456789abcdef"
    stale.mkdir(parents=True)
    dest = prebuild_ext.build()
    assert dest == buildable / ".prebuilt" / prebuild_ext.key()
    assert (dest / f"_C{SUFFIX}").read_bytes() == b"built from kernel v1\n"
    info = __import__("json").loads((dest / "key.json").read_text())
    assert info["key"] == dest.name and info["torch_cuda"] == "13.0" and info["arch_list"] == "9.0"
    assert info["compile_seconds"] == {"engine.o": 2.5, "bindings.o": 9.0}
    assert not stale.exists() and not list(buildable.glob("magloss/_C*"))   # the working tree stays clean
    prebuild_ext.build()
    assert "already there" in capsys.readouterr().out
    assert prebuild_ext.install() == "prebuilt"


def test_install_builds_a_missing_artefact(buildable):
    assert prebuild_ext.install() == "built"
    assert (buildable / "magloss" / f"_C{SUFFIX}").read_bytes() == b"built from kernel v1\n"


def test_build_failure_shows_the_compiler_and_files_nothing(buildable, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_BUILD_FAIL", "1")
    assert prebuild_ext.main(["build"]) == 1
    captured = capsys.readouterr()
    assert "stand-in compiler error" in captured.out and "build failed (setup.py exit status 1)" in captured.err
    assert not (buildable / ".prebuilt").exists() or not list((buildable / ".prebuilt").iterdir())


def test_build_needs_a_cuda_torch(tree, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="has no CUDA: cannot build the extension"):
        prebuild_ext.build()
