"""The fixed style every figure of ``hetrefine.plots`` is drawn in, and the byte-stable
save: Agg backend; PNG ``Software`` metadata removed; SVG ``svg.hashsalt`` fixed and
``Date`` removed, so the same input gives the same bytes on a rerun."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import matplotlib

matplotlib.use("Agg")  # noqa: E402  (before pyplot; no display in workflow jobs)

import matplotlib.pyplot as plt  # noqa: E402

from hetrefine.io.atomic import atomic_path  # noqa: E402

#: rc settings applied to every figure: fixed SVG ids, text as paths, no extra whitespace.
RC = {
    "svg.hashsalt": "hetrefine",
    "svg.fonttype": "path",
    "font.size": 9,
    "axes.titlesize": 10,
    "figure.dpi": 100,
    "savefig.dpi": 120,
}
F = TypeVar("F", bound=Callable)
_PNG_META = {"Software": None}
_SVG_META = {"Date": None, "Creator": None}


def save(fig: plt.Figure, path: str | os.PathLike, svg: bool = False) -> None:
    """Save ``fig`` to ``path`` (PNG) and, if ``svg``, to ``path`` with suffix .svg; atomic."""
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", metadata=_PNG_META, bbox_inches="tight")
        if svg:
            with atomic_path(path.with_suffix(".svg"), suffix=".svg") as tmp:
                fig.savefig(tmp, format="svg", metadata=_SVG_META, bbox_inches="tight")
    finally:
        plt.close(fig)


def styled(fn: F) -> F:
    """Run a plotting function under the fixed rc settings (and close its figures on error)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(RC):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def figure(*args, **kwargs) -> tuple[plt.Figure, object]:
    return plt.subplots(*args, **kwargs)
