"""The focused (user) mask, ``mask.file``: checked, resampled to the refinement box,
softened when binary, applied to the references as ``mask.apply_to`` says, and
sorting two states that differ in one small domain on a large rest (issue 15, item 3)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from hetrefine.config import defaults
from hetrefine.errors import InputError
from hetrefine.focus import noise_reference, reference_masks, search_references
from hetrefine.fourier import centered_grid_radius
from hetrefine.io.mrc import read_volume, write_mrc
from hetrefine.pipeline import run_pipeline
from hetrefine.simulate import SimulationSpec, lowpass, phantoms, simulate_from_volumes
from hetrefine.steps import settings_for
from hetrefine.steps.mask import make_mask
from hetrefine.validation import read_focus_mask

BOX, PX = 32, 3.0  # the refinement box of the step tests


def _info(path, box=BOX, px=PX):
    path.write_text(
        json.dumps(
            {"box": box, "pixel_size": px, "input_box": box, "input_pixel_size": px,
             "n_particles": 10, "n_chunks": 1}
        )
    )  # fmt: skip
    return str(path)


def _settings(**mask):
    cfg = defaults()
    cfg["mask"] = {**cfg["mask"], **mask}
    return settings_for("mask", cfg)


def _ball(box, px, radius_A, soft_A=0.0):
    """A ball of ``radius_A`` (hard, or with a linear ramp ``soft_A`` wide) at box/px."""
    r = centered_grid_radius((box,) * 3) * px
    if soft_A == 0:
        return (r <= radius_A).astype(np.float32)
    return np.clip((radius_A + soft_A / 2 - r) / soft_A, 0, 1).astype(np.float32)


@pytest.mark.parametrize(
    "values, expected",
    [
        (lambda v: v * 2.5, "values run from 0 to 2.5, but a mask holds values in [0, 1]"),
        (lambda v: v - 0.5, "values run from -0.5 to 0.5"),
        (lambda v: v * 0, "every voxel is 0: the mask keeps nothing"),
        (lambda v: np.where(v > 0, np.nan, 0), "NaN"),
    ],
)
def test_a_bad_mask_is_refused_in_one_line_naming_the_file(tmp_path, values, expected):
    path = tmp_path / "my_mask.mrc"
    write_mrc(path, values(_ball(24, 4.0, 30.0)), 4.0)
    with pytest.raises(InputError) as err:
        read_focus_mask(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and expected in msg, msg
    # the mask step refuses it with the same message (the workflow's start and the
    # pre-flight call read_focus_mask too)
    with pytest.raises(InputError, match=expected.split(":")[0].replace("[", r"\[")):
        make_mask(
            _info(tmp_path / "info.json"), str(tmp_path / "m.mrc"), str(tmp_path / "f.mrc"),
            [], _settings(file=str(path)),
        )  # fmt: skip


def test_values_within_rounding_of_0_and_1_are_accepted(tmp_path):
    path = tmp_path / "mask.mrc"
    write_mrc(path, _ball(24, 4.0, 30.0, 8.0) * 1.0004 - 0.0002, 4.0)
    vol, px = read_focus_mask(path)
    assert px == pytest.approx(4.0) and vol.max() > 1.0


def test_a_mask_on_another_box_and_pixel_size_is_resampled(tmp_path, caplog):
    """A soft ball of radius 24 A on box 50 at 2 A/px becomes a mask at the refinement box
    (32 at 3 A/px) with the same radius in Angstrom, values in [0, 1]; the log says from
    which box and pixel size."""
    src = tmp_path / "domain_mask.mrc"
    write_mrc(src, _ball(50, 2.0, 24.0, 8.0), 2.0)
    out, focus = tmp_path / "mask.mrc", tmp_path / "mask_focus.mrc"
    with caplog.at_level(logging.INFO, logger="hetrefine"):
        make_mask(_info(tmp_path / "info.json"), str(out), str(focus), [], _settings(file=str(src)))
    vol, px = read_volume(focus)
    assert vol.shape == (BOX,) * 3 and px == pytest.approx(PX)
    assert vol.min() >= 0 and vol.max() <= 1
    r = centered_grid_radius((BOX,) * 3) * PX
    assert vol[r <= 18].min() > 0.97 and vol[r >= 30].max() < 0.03
    # the half-height radius along an axis: 24 A
    c = BOX // 2
    profile = vol[c, c, c:]
    half = np.interp(0.5, profile[::-1], np.arange(len(profile))[::-1] * PX)
    assert half == pytest.approx(24.0, abs=1.0)
    text = caplog.text
    assert f"mask.file {src}: resampled from box 50 at 2.000 A/px to box 32 at 3.000 A/px" in text
    assert "soft values: used as it is" in text
    sphere, _ = read_volume(out)  # the spherical mask is unchanged
    assert sphere.max() == 1 and not np.array_equal(sphere, vol)


def test_a_binary_mask_gets_a_raised_cosine_edge_and_the_log_says_so(tmp_path, caplog):
    """A hard ball (only 0 and 1) at the refinement box: 1 inside, a raised-cosine edge
    ``soft_edge_A`` wide outside it, 0 beyond; with soft_edge_A 0 it stays hard, with a
    warning."""
    src = tmp_path / "binary.mrc"
    ball = _ball(BOX, PX, 21.0)
    write_mrc(src, ball, PX)
    focus = tmp_path / "f.mrc"
    with caplog.at_level(logging.INFO, logger="hetrefine"):
        make_mask(
            _info(tmp_path / "info.json"), str(tmp_path / "m.mrc"), str(focus),
            [], _settings(file=str(src), soft_edge_A=9.0),
        )  # fmt: skip
    vol, _ = read_volume(focus)
    assert "binary (only 0 and 1): softened with a raised-cosine edge of 9.0 A (3.0 px)" in (
        caplog.text
    )
    np.testing.assert_array_equal(vol[ball == 1], 1.0)
    c = BOX // 2
    edge = vol[c, c, c + 8 : c + 11]  # 1, 2 and 3 px outside the last voxel inside (7 px)
    np.testing.assert_allclose(edge, 0.5 + 0.5 * np.cos(np.pi * np.array([1, 2, 3]) / 3), atol=1e-6)
    r = centered_grid_radius((BOX,) * 3) * PX
    assert vol[r > 21.0 + 9.0 + PX].max() == 0.0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hetrefine"):
        make_mask(
            _info(tmp_path / "info.json"), str(tmp_path / "m.mrc"), str(focus),
            [], _settings(file=str(src), soft_edge_A=0.0),
        )  # fmt: skip
    np.testing.assert_array_equal(read_volume(focus)[0], ball)
    assert "used with its hard edge" in caplog.text


def test_a_small_or_off_centre_mask_is_warned_about(tmp_path, caplog):
    """A mask on a small domain with apply_to both (alignment on the domain alone), and a
    mask mostly outside the spherical mask, get a warning in the mask log."""
    small, off = tmp_path / "small.mrc", tmp_path / "off.mrc"
    write_mrc(small, _ball(BOX, PX, 12.0, 6.0), PX)
    off_centre = np.zeros((BOX,) * 3, np.float32)
    off_centre[:4, :4, :4] = 1.0  # a corner, outside the default sphere (0.75 of the box)
    write_mrc(off, off_centre, PX)
    info = _info(tmp_path / "info.json")
    for file, apply_to, warned in (
        (small, "both", "use mask.apply_to: classification"),
        (small, "classification", None),
        (off, "classification", "lies outside the spherical mask"),
    ):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hetrefine"):
            make_mask(
                info, str(tmp_path / "m.mrc"), str(tmp_path / "f.mrc"),
                [], _settings(file=str(file), apply_to=apply_to),
            )  # fmt: skip
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        if warned is None:
            assert not warnings, warnings
        else:
            assert len(warnings) == 1 and warned in warnings[0], warnings


def test_without_a_mask_file_the_focused_mask_is_the_sphere(tmp_path):
    out, focus = tmp_path / "m.mrc", tmp_path / "f.mrc"
    make_mask(_info(tmp_path / "info.json"), str(out), str(focus), [], _settings())
    np.testing.assert_array_equal(read_volume(out)[0], read_volume(focus)[0])


def test_search_references_follow_apply_to():
    """both: every reference times the focused mask; classification: each class's own
    reference inside the mask, the class-weighted mean outside it, so the classes differ
    only inside; the noise is always measured against the spherically masked maps."""
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 8, 8, 8)).astype(np.float32)
    sphere = np.ones((8,) * 3, np.float32)
    sphere[0] = 0.0
    focus = np.zeros((8,) * 3, np.float32)
    focus[2:5, 2:5, 2:5] = 1.0
    focus[5, 2:5, 2:5] = 0.5
    fractions = [0.25, 0.75]

    def refs(file, apply_to):
        masks = reference_masks(sphere, focus, {"file": file, "apply_to": apply_to})
        noise = [noise_reference(v, masks) for v in maps]
        return np.stack(list(search_references(maps, masks, fractions))), noise

    plain, noise = refs(None, "both")
    np.testing.assert_array_equal(plain, maps * sphere)
    assert noise == [None, None]
    both, noise = refs("m.mrc", "both")
    np.testing.assert_allclose(both, maps * focus)
    np.testing.assert_allclose(np.stack(noise), maps * sphere)
    cls, noise = refs("m.mrc", "classification")
    mean = (0.25 * maps[0] + 0.75 * maps[1]) * sphere
    out, inside, edge = (focus == 0), (focus == 1), (focus == 0.5)
    np.testing.assert_allclose(cls[:, out], np.broadcast_to(mean[out], (2, out.sum())), atol=1e-6)
    np.testing.assert_allclose(cls[:, inside], maps[:, inside], atol=1e-6)
    np.testing.assert_allclose(cls[:, edge], 0.5 * maps[:, edge] + 0.5 * mean[edge], atol=1e-6)
    np.testing.assert_allclose(np.stack(noise), maps * sphere)
    assert np.abs(cls[:, 0]).max() == 0  # zero where the sphere is zero


def _two_variabilities(tmp_path):
    """Four states: a small domain A (15% of the mass) present or not, independently of
    a large domain B (30% of the mass) in one of two places; 500 particles at SNR 0.3.
    Initial models: (A, B1) and (no A, B2), low-passed. Returns the data folder, the
    models, a soft mask on A, and per particle 0 = A present, 1 = absent."""
    box, px = 32, 4.0
    b1, b2 = phantoms(SimulationSpec(box=box, pixel_size=px, domain_fraction=0.3, seed=1))
    c = box // 2
    zz, yy, xx = np.indices((box,) * 3)
    r = np.sqrt((zz - (c - 6)) ** 2 + (yy - c) ** 2 + (xx - c) ** 2)  # A at z = -6 px
    blob = np.exp(-(r**2) / (2 * 1.5**2)).astype(np.float32)
    blob *= 0.15 * b1.sum() / blob.sum()
    vols = [b1 + blob, b2 + blob, b1, b2]
    spec = SimulationSpec(n_particles=500, n_classes=4, box=box, pixel_size=px, snr=0.3, seed=2)
    simulate_from_volumes(spec, tmp_path / "data", vols)
    models = []
    for i, v in ((1, vols[0]), (2, vols[3])):
        models.append(str(tmp_path / f"model_{i}.mrc"))
        write_mrc(models[-1], lowpass(v, 20.0, px), px)
    t = np.clip((r - 3.0) / 3.0, 0, 1)  # 1 within 3 px of A, raised cosine to 0 at 6 px
    write_mrc(tmp_path / "domain_mask.mrc", (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32), px)
    truth = pd.read_csv(tmp_path / "data" / "truth.csv")["class"].to_numpy()
    return tmp_path / "data" / "particles.star", models, tmp_path / "domain_mask.mrc", truth >= 3


def _accuracy(run, n_iter, labels):
    with np.load(run.assignments(n_iter, 0)) as d:
        cls, idx = d["posterior"].argmax(1), d["index"]
    acc = float((cls == labels[idx]).mean())
    return max(acc, 1.0 - acc)


def test_a_mask_on_the_domain_sorts_the_domain(tmp_path):
    """Two states of a small domain on a large rest that has its own, larger
    variability: without a mask the classes follow the larger variability and sort the
    domain little better than chance; with a mask on the domain (apply_to:
    classification) they sort the domain (measured: 0.72 against 0.58)."""
    particles, models, domain_mask, absent = _two_variabilities(tmp_path)
    acc = {}
    for name, file in (("without", None), ("with", str(domain_mask))):
        cfg = defaults()
        cfg.update(
            iterations=3, shard_size=500, online_em_iterations=0, class_similarity=0.0,
            initial_lowpass_A=20, coarse_angle_step_deg=30, local_refine_levels=1,
        )  # fmt: skip
        cfg["mask"] = {**cfg["mask"], "file": file, "apply_to": "classification"}
        run = run_pipeline(str(particles), models, str(tmp_path / name), cfg, final_outputs=False)
        acc[name] = _accuracy(run, 3, absent)
    assert acc["with"] >= 0.68 and acc["with"] >= acc["without"] + 0.10, acc


def test_the_preflight_reports_the_mask_and_refuses_a_bad_one(tmp_path):
    """The pre-flight reads mask.file as the mask step does: its box and pixel size and
    what happens to it, or the step's error."""
    from hetrefine.preflight import run_preflight
    from hetrefine.simulate import simulate_dataset

    simulate_dataset(SimulationSpec(n_particles=40, box=24, pixel_size=4.0, seed=0), tmp_path / "d")
    conf = {
        "particles": str(tmp_path / "d" / "particles.star"),
        "initial_models": [str(tmp_path / "d" / f"initial_model_0{k}.mrc") for k in (1, 2)],
        "device": "cpu",
    }
    good, bad = tmp_path / "good.mrc", tmp_path / "bad.mrc"
    write_mrc(good, _ball(40, 2.0, 20.0), 2.0)
    write_mrc(bad, _ball(24, 4.0, 20.0) * 0, 4.0)
    rep = run_preflight(
        {**conf, "mask": {"file": str(good), "apply_to": "classification"}}, measure=False
    )
    assert rep.ok, rep.errors
    assert (
        f"mask.file {good}: box 40 px at 2 A/px, resampled to box 24 at 4 A/px; binary, softened "
        "with a 8 A raised-cosine edge; applied for classification"
    ) in str(rep)
    rep = run_preflight({**conf, "mask": {"file": str(bad)}}, measure=False)
    assert not rep.ok and any(str(bad) in e and "every voxel is 0" in e for e in rep.errors), (
        rep.errors
    )
