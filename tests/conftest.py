"""Shared fixtures: tiny offline models (built once per session) and real images from packages."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

# the repository first: sam2 installs a top-level package also named "training" that would shadow ours
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Everything must work offline: any connection outside loopback fails the test."""
    real = socket.socket.connect

    def guarded(self, addr):
        host = addr[0] if isinstance(addr, tuple) else addr
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
            raise AssertionError(f"test tried to reach the network: {addr}")
        return real(self, addr)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(autouse=True)
def result_records_follow_the_schema(request):
    """Every result.json a test leaves in its tmp_path must validate against the result schema."""
    # asked for before the test runs, so tmp_path is still there when this fixture finishes
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if tmp is None:
        return
    import json

    from medreasoner.engine import validate_record

    for path in tmp.rglob("result.json"):
        validate_record(json.loads(path.read_text()))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'format': CRM folder that answers in format, 'random': untrained CRM, 'sam2': checkpoint}."""
    from medreasoner.models.tiny import build_tiny_crm, build_tiny_sam2

    root = tmp_path_factory.mktemp("tiny")
    return {
        "format": str(build_tiny_crm(root / "crm_format", format_steps=150)),
        "random": str(build_tiny_crm(root / "crm_random", format_steps=0)),
        "sam2": str(build_tiny_sam2(root / "tiny_sam2.pt")),
    }


@pytest.fixture(scope="session")
def ct_path() -> str:
    from pydicom.data import get_testdata_file

    return get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="session")
def ct_image(ct_path):
    from medreasoner.io.images import load_image

    return load_image(ct_path)


@pytest.fixture(scope="session")
def litemedsam():
    from medreasoner.models.asm import load_asm

    return load_asm("litemedsam", device="cpu")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def bundle_scripts():
    """The MONAI bundle's ``scripts`` package, its root on sys.path as `monai.bundle run` arranges (and
    model-zoo's tests do); removed again afterwards so other tests see no ``scripts`` module."""
    bundle = Path(__file__).resolve().parent.parent / "monai_bundle"
    sys.path.insert(0, str(bundle))
    import scripts.inference

    yield scripts.inference
    sys.path.remove(str(bundle))
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]


@pytest.fixture
def bundle_parser(bundle_scripts):
    """``bundle_parser(**override)``: the bundle's inference config parsed with an override dict, as
    ``monai.bundle run --key value`` would (model-zoo's override-dict tests)."""
    from monai.bundle import ConfigParser

    configs = Path(__file__).resolve().parent.parent / "monai_bundle" / "configs"

    def make(**override) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(str(configs / "inference.json"))
        parser.read_meta(str(configs / "metadata.json"))
        parser.update(override)
        parser.parse()
        return parser

    return make


# Registers the CRM test double's backend ("test-brightest") for in-process CLI/bundle runs.
import doubles  # noqa: E402,F401

# Fixtures that build or load models (tiny CRMs, LiteMedSAM, sessions over them) make a test slow.
_HEAVY_FIXTURES = {"tiny_models", "litemedsam", "session", "sam2_session", "bundle_run", "umrg_parquet"}


def pytest_collection_modifyitems(config, items):
    """`make test-fast` deselects `slow`; mark what loads models here, once, instead of per test."""
    for item in items:
        if _HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
