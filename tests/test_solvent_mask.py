"""The solvent mask (``mask.solvent``): built once from the initial models by the mask
step (any box, pixel size and grey scale), written as the references' mask, used by align
in the spherical mask's place, overridden by a user's ``mask.file``, and a whole run with
it recovers known classes."""

from __future__ import annotations

import glob
import json
import logging

import numpy as np
import pandas as pd

from hetrefine.config import defaults
from hetrefine.focus import noise_reference, reference_masks, search_references
from hetrefine.fourier import centered_grid_radius, resample_volume
from hetrefine.io.mrc import read_volume, write_mrc
from hetrefine.io.star import read_star_blocks
from hetrefine.mask import solvent_mask
from hetrefine.pipeline import run_pipeline
from hetrefine.simulate import SimulationSpec, lowpass, phantoms, simulate_dataset
from hetrefine.steps import settings_for
from hetrefine.steps.mask import make_mask

BOX, PX = 32, 3.0  # the refinement box


def _info(path):
    path.write_text(json.dumps({"box": BOX, "pixel_size": PX, "input_box": 48,
                                "input_pixel_size": 2.0, "n_particles": 10, "n_chunks": 1}))  # fmt: skip
    return str(path)


def _settings(**mask):
    cfg = defaults()
    cfg["mask"] = {**cfg["mask"], **mask}
    return settings_for("mask", cfg)


def _models(tmp_path):
    """Two initial models on the input grid (box 48 at 2 A/px), on arbitrary grey scales
    (one inverted, one offset), and the same at the refinement box (scale 1)."""
    vols = [lowpass(v, 30.0, 2.0) for v in phantoms(SimulationSpec(box=48, pixel_size=2.0, seed=3))]
    paths = []
    for k, (v, grey) in enumerate(zip(vols, (lambda v: -0.01 * v, lambda v: 300 * v + 5))):
        paths.append(str(tmp_path / f"model_{k}.mrc"))
        write_mrc(paths[-1], grey(v), 2.0)
    return paths, [resample_volume(v, 2.0, BOX, PX) for v in vols]


def test_the_mask_step_writes_the_solvent_mask_and_logs_its_threshold(tmp_path, caplog):
    models, at_box = _models(tmp_path)
    out, focus = tmp_path / "mask.mrc", tmp_path / "mask_focus.mrc"
    with caplog.at_level(logging.INFO, logger="hetrefine"):
        make_mask(_info(tmp_path / "info.json"), str(out), str(focus), models,
                  _settings(solvent=True))  # fmt: skip
    sphere, solvent = read_volume(out)[0], read_volume(focus)[0]
    expected = solvent_mask(at_box, PX, sphere, 0.1, 4.0, 8.0)
    np.testing.assert_allclose(solvent, expected, atol=1e-5)
    assert 0.1 * sphere.sum() < solvent.sum() < 0.7 * sphere.sum()
    text = caplog.text
    assert text.count("thresholded at") == 2 and "0.10 of its maximum" in text
    assert "of the spherical mask's volume" in text


def test_off_by_setting_or_overridden_by_a_mask_file(tmp_path, caplog):
    """mask.solvent false: the references' mask is the sphere; a mask.file is used as it
    is, with the solvent mask on or off."""
    models, _ = _models(tmp_path)
    info = _info(tmp_path / "info.json")
    out, focus = tmp_path / "mask.mrc", tmp_path / "mask_focus.mrc"
    make_mask(info, str(out), str(focus), models, _settings(solvent=False))
    np.testing.assert_array_equal(read_volume(out)[0], read_volume(focus)[0])
    r = centered_grid_radius((BOX,) * 3) * PX
    domain = np.clip((20.0 - r) / 6.0, 0, 1).astype(np.float32)  # a soft ball
    write_mrc(tmp_path / "domain.mrc", domain, PX)
    got = {}
    for solvent in (False, True):
        f = tmp_path / f"focus_{solvent}.mrc"
        with caplog.at_level(logging.INFO, logger="hetrefine"):
            make_mask(info, str(out), str(f), models,
                      _settings(solvent=solvent, file=str(tmp_path / "domain.mrc")))  # fmt: skip
        got[solvent] = read_volume(f)[0]
    np.testing.assert_array_equal(got[True], got[False])
    assert "used instead of the solvent mask" in caplog.text


def test_align_uses_the_solvent_mask_in_the_spheres_place():
    """Search references and the noise reference: the maps times the solvent mask (no
    separate noise reference); with a mask.file, the file's rules as before."""
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 8, 8, 8)).astype(np.float32)
    sphere = np.ones((8,) * 3, np.float32)
    solvent = np.zeros((8,) * 3, np.float32)
    solvent[2:6, 2:6, 2:6] = 1.0
    masks = reference_masks(sphere, solvent, {"file": None, "solvent": True, "apply_to": "both"})
    refs = np.stack(list(search_references(maps, masks, [0.5, 0.5])))
    np.testing.assert_allclose(refs, maps * solvent)
    assert noise_reference(maps[0], masks) is None  # measured against the search's
    masks = reference_masks(sphere, solvent, {"file": None, "solvent": False, "apply_to": "both"})
    np.testing.assert_allclose(np.stack(list(search_references(maps, masks, [0.5, 0.5]))), maps)


def test_a_run_with_the_solvent_mask_recovers_the_classes(tmp_path):
    """End to end (final outputs included), 600 particles at SNR 0.2, two classes a
    domain apart: the known labels are recovered and the run's references' mask is the
    solvent mask (well inside the sphere)."""
    spec = SimulationSpec(n_particles=600, box=32, pixel_size=3.0, snr=0.2,
                          domain_fraction=0.2, seed=5)  # fmt: skip
    simulate_dataset(spec, tmp_path / "data")
    cfg = defaults()
    cfg.update(iterations=4, shard_size=300)
    cfg["mask"] = {**cfg["mask"], "solvent": True}
    models = sorted(glob.glob(str(tmp_path / "data" / "initial_model_*.mrc")))
    run = run_pipeline(
        str(tmp_path / "data" / "particles.star"), models, str(tmp_path / "run"), cfg
    )
    sphere, solvent = read_volume(run.mask)[0], read_volume(run.focus_mask)[0]
    assert solvent.sum() < 0.8 * sphere.sum() and np.all(solvent <= sphere + 1e-6)
    star = read_star_blocks(tmp_path / "run" / "particles_all.star")["particles"]
    cls = star["rlnClassNumber"].to_numpy(int)
    lab = pd.read_csv(tmp_path / "data" / "truth.csv")["class"].to_numpy()
    acc = max((cls == lab).mean(), (cls == 3 - lab).mean())
    assert acc >= 0.9, acc
    assert (tmp_path / "run" / "class_001" / "map.mrc").is_file()
