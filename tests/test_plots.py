"""Figures: every file written, byte-stable, and the orientation binning counts right."""

from __future__ import annotations

import numpy as np
import pytest

from hetrefine import orientations, plots
from hetrefine.rotations import euler_to_matrix, matrix_to_euler, random_rotations

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
K, D = 3, 16


def _models(n_it: int = 5) -> list[dict]:
    s = np.arange(D // 2 + 1)
    out = []
    for i in range(n_it):
        m = {
            "iteration": i,
            "class_fractions": list(np.array([1.0 + i, 2.0, 3.0]) / (6.0 + i)),
            "resolution_A": [30.0 - 2 * i - k for k in range(K)],
            "res_limit_A": 25.0 - 2 * i,
            "posterior_entropy": 1.0 / (i + 1),
        }
        if i > 0:  # iteration 0 (init) has no FSC and no changed fraction
            m["fsc"] = [list(np.clip(1 - s / (2.0 + i + k), -0.1, 1)) for k in range(K)]
            m["changed_fraction"] = 0.4 / i
        out.append(m)
    return out


def _assign(n: int, rng: np.random.Generator) -> dict:
    post = rng.dirichlet(np.ones(K) * 0.3, size=n).astype(np.float32)
    eul = matrix_to_euler(random_rotations(n * K, rng)).reshape(n, K, 3).astype(np.float32)
    score = rng.normal(size=n).astype(np.float32)
    score[: n // 10] -= 6.0  # some junk
    return {"posterior": post, "euler": eul, "fit_score": score}


def _maps(n_it: int, rng) -> list[np.ndarray]:
    z, y, x = np.mgrid[:D, :D, :D] - D // 2
    base = np.stack([np.exp(-((z - k) ** 2 + y**2 + (x + k) ** 2) / 8.0) for k in range(K)])
    return [
        (base + rng.normal(scale=0.3 / (i + 1), size=base.shape)).astype(np.float32)
        for i in range(n_it)
    ]


# --------------------------------------------------------------------------- binning


def test_viewing_direction_is_third_matrix_row():
    rng = np.random.default_rng(0)
    eul = matrix_to_euler(random_rotations(50, rng))
    lon, lat = orientations.viewing_directions(eul)
    d = euler_to_matrix(eul)[:, 2, :]
    np.testing.assert_allclose(np.cos(lat) * np.cos(lon), d[:, 0], atol=1e-12)
    np.testing.assert_allclose(np.cos(lat) * np.sin(lon), d[:, 1], atol=1e-12)
    np.testing.assert_allclose(np.sin(lat), d[:, 2], atol=1e-12)
    # longitude = rot and latitude = 90 - tilt (away from the poles)
    lon, lat = orientations.viewing_directions(np.array([[40.0, 30.0, 77.0], [-120.0, 150.0, 5.0]]))
    np.testing.assert_allclose(np.rad2deg(lon), [40.0, -120.0], atol=1e-9)
    np.testing.assert_allclose(np.rad2deg(lat), [60.0, -60.0], atol=1e-9)


def test_orientation_histogram_counts_and_bins():
    rng = np.random.default_rng(1)
    eul = matrix_to_euler(random_rotations(1234, rng))
    counts, lon_e, lat_e = orientations.orientation_histogram(eul, n_lon=24, n_lat=12)
    assert counts.shape == (12, 24) and lon_e.shape == (25,) and lat_e.shape == (13,)
    assert counts.sum() == 1234
    # known directions land in the expected bins: north pole (tilt 0) top row,
    # south pole (tilt 180) bottom row, (rot 90, tilt 90) on the equator at lon 90
    c, _, _ = orientations.orientation_histogram(
        np.array([[0.0, 0.0, 0.0], [10.0, 180.0, 0.0], [90.0, 90.0, 33.0], [90.0, 90.0, -50.0]]),
        n_lon=24,
        n_lat=12,
    )
    assert c[-1].sum() == 1 and c[0].sum() == 1
    assert c[6, 18] == 2  # lat bin [0, asin(1/6)), lon bin [90, 105) deg
    # equal-area bins: uniform rotations fill every bin about equally
    eul = matrix_to_euler(random_rotations(200_000, np.random.default_rng(2)))
    counts, _, _ = orientations.orientation_histogram(eul, n_lon=12, n_lat=6)
    expected = 200_000 / counts.size
    assert np.abs(counts - expected).max() < 6 * np.sqrt(expected)


def test_orientation_histogram_empty():
    counts, _, _ = orientations.orientation_histogram(np.zeros((0, 3)))
    assert counts.sum() == 0


# --------------------------------------------------------------------------- files


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, path
    return data


def _calls(rng):
    """kind -> a function drawing that plot into a given path."""
    models = _models()
    assign = _assign(300, rng)
    maps = _maps(5, rng)
    return {
        "orientations": lambda p: plots.plot_orientation_distribution(
            assign["euler"][:, 0], p, title="class 001"
        ),
        "fsc": lambda p: plots.plot_fsc([np.asarray(f) for f in models[-1]["fsc"]], D, 2.0, p),
        "class_sizes": lambda p: plots.plot_class_sizes(models, p),
        "changed": lambda p: plots.plot_changed_fraction(models, p),
        "resolution": lambda p: plots.plot_resolution(models, p),
        "posterior": lambda p: plots.plot_posterior_histogram(
            assign["posterior"].max(1), p, n_classes=K
        ),
        "slices": lambda p: plots.plot_central_slices(maps, p, iterations=range(5), max_rows=3),
        "fit_score": lambda p: plots.plot_fit_score_histogram(
            assign["fit_score"], assign["posterior"].argmax(1), p, K, threshold=-3.0
        ),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "orientations",
        "fsc",
        "class_sizes",
        "changed",
        "resolution",
        "posterior",
        "slices",
        "fit_score",
    ],
)
def test_plot_written_and_byte_stable(tmp_path, kind):
    fn = _calls(np.random.default_rng(3))[kind]
    a, b = tmp_path / "a" / f"{kind}.png", tmp_path / "b" / f"{kind}.png"
    fn(a)
    fn(b)
    assert _check_png(a) == _check_png(b)
    sa, sb = a.with_suffix(".svg").read_bytes(), b.with_suffix(".svg").read_bytes()
    assert sa.startswith(b"<?xml") and b"<svg" in sa
    assert b"<dc:date>" not in sa
    assert sa == sb
    assert len(sa) < 2_000_000  # image-like plots are rasterised inside the SVG


def test_make_all_plots(tmp_path):
    rng = np.random.default_rng(4)
    models = _models(12)
    assign = _assign(200, rng)
    maps = _maps(12, rng)
    paths = plots.make_all_plots(models, maps, assign, tmp_path, pixel_size=2.0)
    stems = ["class_sizes", "changed_fraction", "resolution", "posterior_hist", "slices", "fsc_all"]
    stems += ["fit_score_hist"]
    stems += [f"{n}_class_{k + 1:03d}" for n in ("fsc", "orientations") for k in range(K)]
    expected = {f"{s}.{e}" for s in stems for e in ("png", "svg")} | {"summary.html"}
    assert {p.name for p in paths} == expected
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0, p
    # only iteration 0 (no FSC, no changed fraction) and no pixel size: the same files come out
    paths = plots.make_all_plots(models[:1], maps[:1], assign, tmp_path / "first")
    assert {p.name for p in paths} == expected
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0, p


def test_plots_leave_no_open_figures(tmp_path):
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    plots.plot_class_sizes(_models(), tmp_path / "x.png")
    plots.plot_orientation_distribution(np.zeros((5, 3)), tmp_path / "o.png")
    assert len(plt.get_fignums()) == before
