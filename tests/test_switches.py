"""The run-time switches (magloss.switches): one table, read by every engine, documented as it is."""

import os
import re

import pytest

from magloss import switches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_readme_table_is_the_switch_table():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert switches.markdown_table() in readme


def test_no_module_reads_a_switch_behind_the_table():
    """Python reads the switches only through magloss.switches; the C++ boundary reads only
    switches of the table."""
    names = {s.name for s in switches.SWITCHES}
    for folder, exts in (("magloss", (".py",)), ("csrc", (".cpp", ".h", ".cu", ".cuh"))):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for fn in files:
                if not fn.endswith(exts) or fn == "switches.py":
                    continue
                with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                    text = f.read()
                if fn.endswith(".py"):
                    assert not re.search(r"environ(\.get)?\(?\[?[\"']MAGLOSS_", text), f"{fn} reads a switch itself"
                else:
                    for name in re.findall(r"getenv\(\"(MAGLOSS_\w+)\"\)", text):
                        assert name in names, f"{fn} reads {name}, which magloss.switches does not list"


@pytest.mark.parametrize("value, expected", [("", False), ("0", False), ("1", True), ("yes", True)])
def test_flag(monkeypatch, value, expected):
    monkeypatch.setenv("MAGLOSS_FORCE_SIMT", value)
    assert switches.flag("MAGLOSS_FORCE_SIMT") is expected


@pytest.mark.parametrize("value, expected", [("", None), ("7", 7), ("4096", 4096)])
def test_positive_int(monkeypatch, value, expected):
    monkeypatch.setenv("MAGLOSS_CHUNK", value)
    assert switches.positive_int("MAGLOSS_CHUNK") == expected


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "wide"])
def test_positive_int_rejects(monkeypatch, value):
    monkeypatch.setenv("MAGLOSS_CHUNK", value)
    with pytest.raises(ValueError, match=f"MAGLOSS_CHUNK: expected a positive integer, got '{re.escape(value)}'"):
        switches.positive_int("MAGLOSS_CHUNK")


@pytest.mark.parametrize("value, expected", [("", "async"), ("1", "async"), ("sync", "sync"), ("0", "off"),
                                             ("off", "off")])
def test_choice(monkeypatch, value, expected):
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", value)
    assert switches.choice("MAGLOSS_CHECK_INPUTS", ("async", "sync", "off"), {"1": "async", "0": "off"}) == expected


def test_choice_rejects_naming_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "later")
    with pytest.raises(ValueError, match=r"MAGLOSS_CHECK_INPUTS: expected 'async' \(default\), 'sync' or 'off', "
                                         r"got 'later'"):
        switches.choice("MAGLOSS_CHECK_INPUTS", ("async", "sync", "off"))


def test_an_unknown_switch_is_an_error():
    with pytest.raises(KeyError, match="MAGLOSS_CHUNKS is not a magloss run-time switch"):
        switches.flag("MAGLOSS_CHUNKS")
