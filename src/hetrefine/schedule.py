"""The resolution schedule: how far out in Fourier space each iteration aligns.

Iteration 0 starts at the initial low-pass; each iteration's limit is a few
shells beyond the best class's FSC 0.143 resolution (never lower than the
previous limit), clamped to [4 px, Nyquist - 1] and to ``max_resolution_A``.
"""

from __future__ import annotations

MARGIN_SHELLS = 3.0
"""The next limit is this many shells beyond the best class's resolution shell."""


def resolution_limit_px(r: float, box: int, px: float, max_resolution_A: float | None) -> float:
    """Clamp a resolution radius (box pixels) to [4, Nyquist - 1] and to ``max_resolution_A``."""
    r_max = box / 2 - 1
    if max_resolution_A:
        r_max = min(r_max, box * px / float(max_resolution_A))
    return float(min(max(r, 4.0), r_max))


def next_resolution_limit(
    previous_px: float, best_shell: float, box: int, px: float, max_resolution_A: float | None
) -> float:
    """The next iteration's limit (box pixels) from the previous one and the best
    class's FSC 0.143 shell."""
    return resolution_limit_px(
        max(previous_px, best_shell + MARGIN_SHELLS), box, px, max_resolution_A
    )
