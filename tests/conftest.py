"""Shared fixtures: the available array backends and the interop corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from hetrefine.backend import cupy_available

ROOT = Path(__file__).resolve().parents[1]
INTEROP = ROOT.parent / "shared" / "interop"

BACKENDS = ["numpy"] + (["cupy"] if cupy_available() else [])


@pytest.fixture(params=BACKENDS)
def xp(request):
    """Each available array module: numpy always, cupy when a GPU is present."""
    if request.param == "numpy":
        return np
    import cupy

    return cupy


@pytest.fixture
def interop() -> Path:
    """The shared interop corpus (../shared/interop); skips when absent."""
    if not INTEROP.is_dir():
        pytest.skip("../shared/interop is not present")
    return INTEROP


def relion_available() -> bool:
    return shutil.which("relion_project") is not None


requires_relion = pytest.mark.skipif(
    not relion_available(), reason="RELION 3.1 programs not on PATH (apt-get install relion)"
)
