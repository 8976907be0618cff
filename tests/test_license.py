"""The license: an MIT LICENSE file and the SPDX string in pyproject.toml (PEP 639)."""


def test_license_file_and_spdx_string():
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"                       # PEP 639: an SPDX string, not a table
    text = (root / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text
    assert "LICENSE" in meta["project"]["license-files"]
