"""Compiled CPU kernels (Numba) for the trilinear gathers and scatters of
``hetrefine.projection`` and the local search's inner products.

numpy cannot fuse a gather with the arithmetic around it: the reference path
(``projection.project`` with ``kernel="numpy"``) makes eight passes of fancy
indexing over blocks of points and a dozen elementwise passes, and the scatter
(``backproject_packed``) one ``bincount`` per component over the whole packed
grid. The kernels (``hetrefine.kernels.numba_cpu``) do each point once, in the
same float32 operations in the same order as the numpy path (slice coordinate =
pad (kx A[0] + ky A[1]), floor, fractions, x-, y- then z-lerps
``lo + t (hi - lo)``), so projections equal the numpy path's; sums are
accumulated in float64 as ``bincount`` does, and the local search's dot products
in float32 as a BLAS kernel does (in another order). The gathers read a compact
copy of the grid's centre (``projection._compact_grid``) with the whole grid's
coordinates, so the values are the same. The coarse search's passes after its GEMMs
(``likelihood.reduce_coarse``: norm subtraction, maximum over shifts, candidates,
evidence) are one compiled pass per particle: the same float32 values, the evidence
sum to float32 rounding (a vectorised polynomial exp, float64 sum).

Which path runs: the numpy path on CuPy arrays always (the GPU keeps its CuPy
array code); on the CPU the compiled one when Numba is installed, unless the
environment variable ``HETREFINE_KERNELS=numpy`` asks for the reference path or a
function is given ``kernel="numpy"``. Kernels are compiled on first use and
cached on disk (``cache=True``: Numba's cache beside the module, or under
``NUMBA_CACHE_DIR``); :func:`warm_up` fills the cache ahead of the jobs.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import numpy as np

ENV_VAR = "HETREFINE_KERNELS"
CHOICES = ("auto", "numba", "numpy")


@functools.lru_cache(maxsize=1)
def numba_available() -> bool:
    """Whether Numba is installed (found without importing it)."""
    return importlib.util.find_spec("numba") is not None


def use_numba(xp, kernel: str | None = None) -> bool:
    """Whether the compiled kernel runs for arrays of module ``xp``.

    ``kernel``: "auto" (Numba when available), "numba" (an error without it) or
    "numpy" (the reference path); None reads ``HETREFINE_KERNELS`` (default auto).
    CuPy arrays always take the array-code path.
    """
    choice = (kernel or os.environ.get(ENV_VAR) or "auto").lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR} / kernel must be one of {', '.join(CHOICES)}, got {choice!r}")
    if xp is not np or choice == "numpy":
        return False
    if choice == "numba" and not numba_available():
        raise RuntimeError(f"{ENV_VAR}=numba but Numba is not installed (pip install numba)")
    return numba_available()


def compiled():
    """The compiled kernels' module (imports Numba on first call)."""
    return importlib.import_module("hetrefine.kernels.numba_cpu")


def warm_up() -> None:
    """Compile (or load from Numba's cache) every kernel for the argument types the
    align and hard_sums steps use, on tiny inputs: a fresh environment then pays the
    compile time once (the kernel envs' post-deploy scripts run this), not in its
    first jobs. Nothing without Numba."""
    if numba_available():
        compiled().warm_up()
