"""Array backend: numpy on the CPU, CuPy on a GPU, one code path for both.

Math functions start with ``xp = get_xp(x)`` so the device follows the data.
This is the only module that imports CuPy.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import scipy.fft

log = logging.getLogger(__name__)

try:  # CuPy is optional: the `gpu` extra
    import cupy as _cupy  # type: ignore[import-not-found]
    import cupyx.scipy.fft as _cupy_fft  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None
    _cupy_fft = None


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU (honours CUDA_VISIBLE_DEVICES)."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # pragma: no cover
        return False


def get_xp(*arrays: Any):
    """The array module (numpy or cupy) of the given arrays; numpy when CuPy is absent."""
    if _cupy is None:
        return np
    return _cupy.get_array_module(*arrays)


def get_fft(xp):
    """``scipy.fft`` for numpy, ``cupyx.scipy.fft`` for cupy."""
    return scipy.fft if xp is np else _cupy_fft


def to_host(x):
    """A numpy array (copies from the GPU when needed)."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return x.get()
    return np.asarray(x)


def to_device(x, xp):
    """``x`` as an array of module ``xp`` (numpy or cupy)."""
    if xp is np:
        return to_host(x)
    return xp.asarray(x)


def select_device(choice: str = "auto"):
    """The array module for a config choice ``auto``, ``cpu`` or ``gpu``, logged.

    ``auto`` picks the GPU when CuPy sees one (after ``CUDA_VISIBLE_DEVICES``),
    else the CPU. ``gpu`` without a usable GPU is an error.
    """
    choice = (choice or "auto").lower()
    if choice not in {"auto", "cpu", "gpu"}:
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {choice!r}")
    if choice == "cpu":
        log.info("device: cpu (numpy), as configured")
        return np
    if cupy_available():
        dev = _cupy.cuda.Device()
        log.info(
            "device: gpu %d (CuPy %s, CUDA_VISIBLE_DEVICES=%s)",
            dev.id,
            _cupy.__version__,
            os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
        )
        return _cupy
    if choice == "gpu":
        raise RuntimeError(
            "device: gpu was asked for but CuPy is not installed or sees no GPU; "
            "install the `gpu` extra (pip install 'hetrefine[gpu]') or set device: cpu"
        )
    log.info("device: cpu (numpy); no GPU found")
    return np
