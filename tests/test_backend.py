"""Backend: array-module lookup, host/device transfers, device selection and its log line."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import hetrefine.backend as backend
from hetrefine.backend import (
    cupy_available,
    get_fft,
    get_xp,
    select_device,
    to_device,
    to_host,
)


def test_get_xp_numpy_arrays():
    a = np.zeros(3)
    assert get_xp(a) is np
    assert get_xp(a, np.ones((2, 2))) is np


def test_get_xp_follows_data(xp):
    a = xp.asarray(np.arange(4.0))
    assert get_xp(a) is xp
    assert get_fft(xp) is not None
    # the FFT module of the backend transforms the backend's arrays
    f = get_fft(xp).fft(a)
    assert get_xp(f) is xp
    np.testing.assert_allclose(to_host(f), np.fft.fft(np.arange(4.0)))


def test_host_device_round_trip(xp):
    rng = np.random.default_rng(0)
    host = rng.standard_normal((3, 4, 5)).astype(np.float32)
    dev = to_device(host, xp)
    assert get_xp(dev) is xp
    back = to_host(dev)
    assert isinstance(back, np.ndarray)
    assert back.dtype == host.dtype and back.shape == host.shape
    np.testing.assert_array_equal(back, host)
    # to_host of a host array and of a list are plain numpy arrays
    assert isinstance(to_host(host), np.ndarray)
    np.testing.assert_array_equal(to_host([1, 2, 3]), np.array([1, 2, 3]))


def test_select_cpu_is_numpy_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="hetrefine.backend"):
        assert select_device("cpu") is np
        assert select_device("CPU") is np
    msgs = [r.getMessage() for r in caplog.records if r.name == "hetrefine.backend"]
    assert msgs and all("cpu" in m for m in msgs)


def test_select_bogus_raises():
    with pytest.raises(ValueError, match="auto"):
        select_device("bogus")
    with pytest.raises(ValueError):
        select_device("cuda")


@pytest.mark.skipif(cupy_available(), reason="a GPU is present: 'gpu' is valid here")
def test_select_gpu_without_gpu_raises():
    with pytest.raises(RuntimeError, match="gpu"):
        select_device("gpu")


def test_select_gpu_without_cupy_raises_clearly(monkeypatch, caplog):
    """Simulate a machine without CuPy (works whether or not this one has a GPU)."""
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_cupy_fft", None)
    assert not backend.cupy_available()
    assert get_xp(np.zeros(2)) is np
    with pytest.raises(RuntimeError) as err:
        select_device("gpu")
    msg = str(err.value)
    assert "CuPy" in msg and "device: cpu" in msg  # says what is missing and what to do
    with caplog.at_level(logging.INFO, logger="hetrefine.backend"):
        assert select_device("auto") is np
        assert select_device(None) is np
    msgs = [r.getMessage() for r in caplog.records if r.name == "hetrefine.backend"]
    assert len(msgs) == 2 and all("cpu" in m and "no GPU" in m for m in msgs)


@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a GPU")
def test_select_gpu_with_gpu_is_cupy_and_logged(caplog):
    import cupy

    with caplog.at_level(logging.INFO, logger="hetrefine.backend"):
        assert select_device("gpu") is cupy
        assert select_device("auto") is cupy
    msgs = [r.getMessage() for r in caplog.records if r.name == "hetrefine.backend"]
    assert len(msgs) == 2 and all(m.startswith("device: gpu") for m in msgs)
