"""The module's code is valid on every Python Slicer ships: 3.9 (Slicer 5.8) to 3.13.

Each interpreter found on this machine compiles every file and imports the Lib modules that need only
the standard library (the others need Slicer's VTK, tested in the other files here).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

MODULE = ROOT / "MedReasonerSlicer"
STDLIB_ONLY = ["errors", "parameters", "terminology", "remote_client", "worker_client", "install"]


def interpreter(version: str) -> str | None:
    found = shutil.which(f"python{version}")
    candidates = ([found] if found else []) + sorted(glob.glob(os.path.expanduser(
        f"~/.pyenv/versions/{version}.*/bin/python{version}")))
    for path in candidates:  # a pyenv shim can exist and still refuse to run
        if subprocess.run([path, "-c", "pass"], capture_output=True).returncode == 0:
            return path
    return None


@pytest.mark.parametrize("version", ["3.9", "3.10", "3.12", "3.13"])
def test_module_compiles_and_imports(version, tmp_path):
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} here")
    files = [str(p) for p in MODULE.rglob("*.py")]
    assert len(files) > 10
    code = ("import sys, py_compile\n"
            f"for f in {files!r}:\n"
            f"    py_compile.compile(f, cfile={str(tmp_path / 'x.pyc')!r}, doraise=True)\n"
            f"sys.path.insert(0, {str(MODULE)!r})\n"
            + "".join(f"import MedReasonerLib.{m}\n" for m in STDLIB_ONLY))
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_removed_modules():
    for path in MODULE.rglob("*.py"):
        text = Path(path).read_text()
        for gone in ("import imp\n", "import cgi", "from cgi ", "from imp "):
            assert gone not in text, f"{path}: {gone.strip()} is gone in Python 3.12/3.13"
