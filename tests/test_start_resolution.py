"""The start resolution follows the particle's size (issue 18 item 2): the diameter
measured on a map, the start resolution derived from it with its bounds, and
init_references using it when ``initial_lowpass_A`` is null."""

from __future__ import annotations

import numpy as np
import pytest

from hetrefine.config import defaults, validate_config
from hetrefine.fourier import centered_grid_radius, lowpass_volume
from hetrefine.io.mrc import write_mrc
from hetrefine.io.run_files import RunLayout, read_model
from hetrefine.schedule import (
    START_BOUNDS_A,
    map_diameter_A,
    start_resolution_A,
    start_resolution_for_maps,
)
from hetrefine.simulate import SimulationSpec, simulate_dataset
from hetrefine.steps import settings_for
from hetrefine.steps.init_references import init_references
from hetrefine.steps.mask import make_mask
from hetrefine.steps.preprocess import preprocess


def _ball(diameter_A: float, box: int, px: float) -> np.ndarray:
    r = centered_grid_radius((box,) * 3) * px
    return (r <= diameter_A / 2).astype(np.float32)


@pytest.mark.parametrize("diameter", [40.0, 60.0, 90.0])
def test_map_diameter_of_a_ball_sharp_blurred_inverted_and_offset(diameter):
    """A uniform ball is measured at its diameter (within 6%), also low-passed to 30 A
    (within 15%: the blur widens it), with inverted contrast and on a solvent offset."""
    box, px = 64, 1.8
    ball = _ball(diameter, box, px)
    assert map_diameter_A(ball, px) == pytest.approx(diameter, rel=0.06)
    blurred = lowpass_volume(ball, 30.0, px)
    assert map_diameter_A(blurred, px) == pytest.approx(diameter, rel=0.15)
    assert map_diameter_A(5.0 - 2.0 * blurred, px) == pytest.approx(
        map_diameter_A(blurred, px), rel=1e-3
    )


def test_start_resolution_follows_the_diameter_within_bounds():
    lo, hi = START_BOUNDS_A
    # a 50 A particle (a ~25 kDa protein) starts near 14 A, a 100 A one at 29 A
    assert start_resolution_A(50.0, 64, 1.8) == pytest.approx(50.0 / 3.5)
    assert start_resolution_A(100.0, 64, 1.8) == pytest.approx(100.0 / 3.5)
    assert start_resolution_A(20.0, 64, 1.8) == lo  # never finer than the lower bound
    assert start_resolution_A(400.0, 64, 1.8) == hi  # nor coarser than the upper one
    assert start_resolution_A(50.0, 32, 5.0) == pytest.approx(15.0)  # at most 2/3 Nyquist
    # a decoy blob among the models does not set it (median of the diameters)
    box, px = 64, 1.8
    maps = [(_ball(d, box, px), px) for d in (48.0, 50.0, 110.0)]
    assert start_resolution_for_maps(maps, box, px, px) == pytest.approx(50.0 / 3.5, rel=0.06)
    # a voxel size of 0 in a header reads as the particles' pixel size
    assert start_resolution_for_maps([(_ball(50.0, box, px), 0.0)], box, px, px) == (
        pytest.approx(50.0 / 3.5, rel=0.06)
    )


def test_init_references_starts_at_the_particle_size_resolution(tmp_path):
    """With ``initial_lowpass_A`` null, iteration 0 aligns at the resolution derived from
    the models' size (a small particle starts finer than the old fixed 30 A); a given
    value is kept."""
    box, px = 32, 3.0
    simulate_dataset(SimulationSpec(n_particles=40, box=box, pixel_size=px, seed=0), tmp_path / "d")
    small = [tmp_path / f"small_{k}.mrc" for k in range(2)]
    for k, path in enumerate(small):
        write_mrc(path, lowpass_volume(_ball(42.0 + 4 * k, box, px), 30.0, px), px)
    cfg = defaults()
    cfg.update(particles=str(tmp_path / "d" / "particles.star"), initial_models=[], seed=0)
    L = RunLayout(str(tmp_path / "run"))
    preprocess(
        cfg["particles"], L.info, L.metadata, L.sample, [L.chunk(0)],
        settings_for("preprocess", validate_config({**cfg, "initial_models": [str(p) for p in small]})),
    )  # fmt: skip
    make_mask(L.info, L.mask, L.focus_mask, [], settings_for("mask", cfg))

    def start_A(lowpass):
        c = validate_config(
            {**cfg, "initial_lowpass_A": lowpass, "initial_models": [str(p) for p in small]}
        )
        init_references(
            [str(p) for p in small], L.info, L.sample, L.mask, L.references(0), L.model(0),
            settings_for("init_references", c),
        )  # fmt: skip
        return read_model(L.model(0))["res_limit_A"]

    auto = start_A(None)
    assert auto == pytest.approx(44.0 / 3.5, rel=0.15)
    assert auto < 20.0
    assert start_A(20.0) == pytest.approx(20.0)
