"""Tests of the Slicer module's library against Slicer's real MRML libraries (``slicer-core``).

They run in their own environment (``.venv-slicer``, built by ``make slicer-env``) because slicer-core
pins its own VTK and numpy; the worker and the MONAI Label server they drive run in the project's
``.venv`` (``MEDREASONER_PYTHON``), as a user's separate CUDA environment would.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "MedReasonerSlicer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tools"))

import slicer_headless as headless  # noqa: E402

STATE = headless.init()
MAIN_PYTHON = os.environ.get("MEDREASONER_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
# the worker's environment: one torch thread (faster on a shared 2-core machine), nothing downloaded
WORKER_ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false"}
DOUBLE = str(ROOT / "tests" / "doubles.py")


def pytest_collection_modifyitems(config, items):
    if not Path(MAIN_PYTHON).exists():
        skip = pytest.mark.skip(reason=f"the project's Python {MAIN_PYTHON} is missing (run make setup)")
        for item in items:
            if "needs_worker" in item.keywords:
                item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_worker: drives the real worker or server from the project's .venv")


@pytest.fixture
def scene():
    """The one headless scene, emptied after each test."""
    yield STATE.scene
    STATE.scene.Clear(0)


def blob_volume(path: Path, direction, n: int = 8, seed: int = 0, size: int = 32) -> Path:
    """An int16 volume of ``n`` slices with a bright off-centre blob, written with SimpleITK."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[0:n, 0:size, 0:size]
    a = 60 + 20 * rng.random((n, size, size))
    a += 500 * ((((y - 14) / 7.0) ** 2 + ((x - 19) / 5.0) ** 2) <= 1)
    image = sitk.GetImageFromArray(a.astype(np.int16))
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-12.5, 30.0, 7.25))
    image.SetDirection(tuple(float(v) for v in np.asarray(direction, float).ravel()))
    sitk.WriteImage(image, str(path))
    return path


def oblique_direction():
    """A right-handed oblique LPS direction (rotations about z and x)."""
    ca, sa, cb, sb = math.cos(0.35), math.sin(0.35), math.cos(0.2), math.sin(0.2)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cb, -sb], [0, sb, cb]])
    return rz @ rx


# LAS in RAS terms = i to patient left, j anterior, k superior: in LPS that is diag(1, -1, 1), det < 0
LEFT_HANDED = np.diag([1.0, -1.0, 1.0])
