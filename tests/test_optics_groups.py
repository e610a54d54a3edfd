"""Optics groups as RELION has them: groups with different pixel sizes and boxes
resampled to one refinement grid, a noise spectrum per group, CTF-premultiplied images
refused, beam tilt and higher-order aberrations carried through to the outputs."""

from __future__ import annotations

import glob
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from hetrefine.config import defaults
from hetrefine.errors import InputError
from hetrefine.fourier import resample_volume
from hetrefine.io import run_files
from hetrefine.io.particles import read_particles
from hetrefine.io.star import write_particles_star
from hetrefine.optics import refinement_grid, resample_images, resampling_matrix
from hetrefine.pipeline import prepare_run, run_pipeline
from hetrefine.simulate import SimulationSpec, phantoms, simulate_from_volumes

INTEROP = Path(__file__).resolve().parents[2] / "shared" / "interop"
for _cand in (INTEROP, Path("/work/shared/interop")):
    if _cand.is_dir():
        INTEROP = _cand
        break

#: group 1 (the coarser: the refinement grid) and group 2 (finer pixel, smaller field)
GRID_A = (32, 6.0)
GRID_B = (40, 4.5)


def _simulate_two_grids(tmp: Path, spec: SimulationSpec, colour_b: float = 0.0) -> Path:
    """The same particles (poses, CTF, classes) simulated at GRID_A and at GRID_B, and
    a STAR file with two optics groups: even rows from A, odd rows from B."""
    spec_a = SimulationSpec(**{**spec.__dict__, "box": GRID_A[0], "pixel_size": GRID_A[1]})
    vols = phantoms(spec_a)
    simulate_from_volumes(spec_a, tmp / "a", vols)
    spec_b = SimulationSpec(
        **{**spec_a.__dict__, "box": GRID_B[0], "pixel_size": GRID_B[1], "noise_colour": colour_b}
    )
    vols_b = [resample_volume(v, GRID_A[1], GRID_B[0], GRID_B[1]) for v in vols]
    simulate_from_volumes(spec_b, tmp / "b", vols_b)
    a = starfile.read(tmp / "a" / "particles.star", always_dict=True)
    b = starfile.read(tmp / "b" / "particles.star", always_dict=True)
    optics = pd.concat([a["optics"], b["optics"]], ignore_index=True)
    optics["rlnOpticsGroup"] = [1, 2]
    optics["rlnOpticsGroupName"] = ["groupA", "groupB"]
    pa, pb = a["particles"].copy(), b["particles"].copy()
    pa["rlnImageName"] = [n.replace("@", "@a/") for n in pa["rlnImageName"]]
    pb["rlnImageName"] = [n.replace("@", "@b/") for n in pb["rlnImageName"]]
    pb["rlnOpticsGroup"] = 2
    odd = np.arange(len(pa)) % 2 == 1
    parts = pa.copy()
    parts.loc[odd] = pb.loc[odd].to_numpy()
    star = tmp / "two_groups.star"
    starfile.write({"optics": optics, "particles": parts}, star, overwrite=True)
    shutil.copy(tmp / "a" / "truth.csv", tmp / "truth.csv")
    return star


def _disc(box: int, radius: float) -> np.ndarray:
    y, x = np.mgrid[:box, :box] - box // 2
    return (x * x + y * y) <= radius * radius


def test_resampling_matrix_is_exact_for_band_limited_images():
    """A Gaussian blob sampled at 1 A resampled to 1.3 A equals the blob sampled there,
    and equal grids give the identity."""
    np.testing.assert_allclose(resampling_matrix(33, 2.0, 33, 2.0), np.eye(33), atol=1e-12)
    x = np.arange(64) - 32
    img = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / 50.0)[None].astype(np.float32)
    out = resample_images(img, resampling_matrix(64, 1.0, 48, 1.3))[0]
    y = (np.arange(48) - 24) * 1.3
    truth = np.exp(-(y[:, None] ** 2 + y[None, :] ** 2) / 50.0)
    assert np.abs(out - truth).max() < 1e-5
    with pytest.raises(ValueError, match="upsample"):
        resampling_matrix(64, 2.0, 64, 1.0)


def test_two_groups_preprocess_to_one_grid_matching_the_one_group_images(tmp_path):
    """Noise-free particles at two pixel sizes and boxes (6 A x 32 and 4.5 A x 40, a
    smaller field) preprocess to the 6 A x 32 grid; the resampled group-2 images match
    the same particles simulated on that grid (correlation > 0.99 within the particle),
    group 1's are unchanged."""
    spec = SimulationSpec(n_particles=24, snr=1e6, seed=5, shift_max_px=0.0)
    star = _simulate_two_grids(tmp_path, spec)
    cfg = defaults()
    cfg.update(shard_size=100, particle_diameter_A=150.0)
    models = sorted(glob.glob(str(tmp_path / "a" / "initial_model_*.mrc")))
    two = prepare_run(str(star), models, str(tmp_path / "two"), cfg)
    one = prepare_run(str(tmp_path / "a" / "particles.star"), models, str(tmp_path / "one"), cfg)
    info = run_files.read_info(two.info)
    assert (info["box"], info["pixel_size"]) == GRID_A
    assert [g["box"] for g in info["optics_groups"]] == [GRID_A[0], GRID_B[0]]
    s2, s1 = run_files.read_shard(two.chunk(0)), run_files.read_shard(one.chunk(0))
    assert s2["images"].shape == s1["images"].shape == (24, 32, 32)
    assert s2["group"].tolist() == [0, 1] * 12
    np.testing.assert_array_equal(s2["images"][::2], s1["images"][::2])
    disc = _disc(32, 12)
    for i in range(1, 24, 2):
        r = np.corrcoef(s2["images"][i][disc], s1["images"][i][disc])[0, 1]
        assert r > 0.99, (i, r)
    # both groups' noise spectra start from their own images
    mdl = run_files.read_model(two.model(0))
    assert np.asarray(mdl["sigma2_groups"]).shape == (2, 17)


@pytest.mark.slow
def test_two_groups_classify_like_one_group(tmp_path):
    """300 particles in two classes, half of them recorded at another pixel size and box:
    classified as accurately as the same particles on one grid (within 5 points)."""
    spec = SimulationSpec(n_particles=300, snr=0.12, seed=2, domain_fraction=0.2)
    star = _simulate_two_grids(tmp_path, spec)
    cfg = defaults()
    cfg.update(iterations=3, shard_size=300, particle_diameter_A=150.0)
    truth = pd.read_csv(tmp_path / "truth.csv")["class"].to_numpy() - 1
    models = sorted(glob.glob(str(tmp_path / "a" / "initial_model_*.mrc")))
    accuracy = {}
    for name, particles in (("one", tmp_path / "a" / "particles.star"), ("two", star)):
        run = run_pipeline(str(particles), models, str(tmp_path / name), cfg, final_outputs=False)
        d = np.load(run.assignments(3, 0))
        cls = d["posterior"].argmax(1)
        lab = truth[d["index"]]
        accuracy[name] = max((cls == lab).mean(), (cls != lab).mean())
    assert accuracy["one"] > 0.75, accuracy
    assert accuracy["two"] >= accuracy["one"] - 0.05, accuracy


def test_noise_spectrum_per_optics_group(tmp_path):
    """Group 2's noise is coloured (its power falls with frequency), group 1's white:
    the per-group spectra say so at init and after an iteration of residuals, and the
    pooled spectrum lies between them."""
    spec = SimulationSpec(n_particles=200, snr=0.1, seed=3)
    star = _simulate_two_grids(tmp_path, spec, colour_b=2.0)
    cfg = defaults()
    cfg.update(iterations=1, shard_size=200, particle_diameter_A=150.0)
    models = sorted(glob.glob(str(tmp_path / "a" / "initial_model_*.mrc")))
    run = run_pipeline(str(star), models, str(tmp_path / "run"), cfg, final_outputs=False)
    for it in (0, 1):
        mdl = run_files.read_model(run.model(it))
        s2 = np.asarray(mdl["sigma2_groups"])
        ratio = s2[:, 10:15].mean(axis=1) / s2[:, 2:5].mean(axis=1)  # high / low shells
        assert ratio[1] < 0.3 * ratio[0], (it, ratio)
        pooled = np.asarray(mdl["sigma2"])[10:15].mean()
        assert s2[1, 10:15].mean() < pooled < s2[0, 10:15].mean(), it


# ------------------------------------------------------------------ metadata


def _star31(path: Path, optics_extra: dict, n: int = 2, parts_extra: dict | None = None) -> Path:
    from hetrefine.io.mrc import write_mrc

    write_mrc(path.parent / "s.mrcs", np.random.default_rng(0).normal(size=(n, 16, 16)), 2.0)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1, 2],
            "rlnOpticsGroupName": ["g1", "g2"],
            "rlnVoltage": [300.0, 300.0],
            "rlnSphericalAberration": [2.7, 2.7],
            "rlnAmplitudeContrast": [0.1, 0.1],
            "rlnImagePixelSize": [2.0, 2.0],
            "rlnImageSize": [16, 16],
            "rlnImageDimensionality": [2, 2],
            **optics_extra,
        }
    )
    parts = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1}@s.mrcs" for i in range(n)],
            "rlnDefocusU": 10000.0,
            "rlnDefocusV": 9000.0,
            "rlnDefocusAngle": 10.0,
            "rlnOpticsGroup": [1 + i % 2 for i in range(n)],
            **(parts_extra or {}),
        }
    )
    starfile.write({"optics": optics, "particles": parts}, path, overwrite=True)
    return path


def test_ctf_premultiplied_images_refused_in_one_line(tmp_path):
    """One check (validation.check_particles_for_run, called by preprocess and the
    pre-flight) names the file, the row, the field and the optics group."""
    from hetrefine.validation import check_particles_for_run

    star = _star31(tmp_path / "p.star", {"rlnCtfDataAreCtfPremultiplied": [0, 1]})
    with pytest.raises(InputError) as exc:
        check_particles_for_run(star, read_particles(star), None)
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(star) in msg and "optics group 2" in msg
    assert "_rlnCtfDataAreCtfPremultiplied is 1" in msg and "applied twice" in msg
    q = _star31(tmp_path / "q.star", {"rlnCtfDataAreCtfPremultiplied": [0, 0]})
    check_particles_for_run(q, read_particles(q), None)


def test_one_pixel_size_per_optics_group(tmp_path):
    px = {"rlnImagePixelSize": [2.0, 2.0, 2.5, 2.0]}  # per particle: rows 1 and 3 in group 1
    star = _star31(tmp_path / "p.star", {}, n=4, parts_extra=px)
    with pytest.raises(InputError, match=r"optics group 1 have different pixel sizes \(2, 2.5 A\)"):
        read_particles(star)


ABERRATIONS = {
    "rlnBeamTiltX": [0.4, 0.0],
    "rlnBeamTiltY": [-0.2, 0.0],
    "rlnOddZernike": ["[0.1,0.2,0,0,0,0.3]", "[0,0,0,0,0,0]"],
    "rlnEvenZernike": ["[0,0,0,0,0,0,0,0,0]", "[0,0,0,0,0,0,0,0,0]"],
    "rlnMagMat00": [1.01, 1.0],
    "rlnMagMat01": [0.002, 0.0],
    "rlnMagMat10": [0.001, 0.0],
    "rlnMagMat11": [0.99, 1.0],
}


def test_aberrations_carried_to_the_output_star_and_logged(tmp_path, caplog):
    """Beam tilt, Zernike and MagMat columns come back unchanged, per optics group, in
    the output STAR; the log says once per kind (only non-zero kinds) that they are
    not used."""
    star = _star31(tmp_path / "p.star", ABERRATIONS, n=40)
    cfg = defaults()
    cfg.update(shard_size=100, particle_diameter_A=24.0)
    from hetrefine.steps import settings_for
    from hetrefine.steps.preprocess import preprocess

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="hetrefine"):
        preprocess(
            str(star), str(out / "info.json"), str(out / "metadata.npz"), str(out / "sample.npz"),
            [str(out / "shard_0000.npz")], settings_for("preprocess", cfg),
        )  # fmt: skip
    notes = [r.getMessage() for r in caplog.records if "not used in the refinement" in r.message]
    assert len(notes) == 3, notes  # even Zernike all zero: no line
    assert any("beam tilt" in n and "optics group 1" in n for n in notes)
    assert any("odd Zernike" in n for n in notes) and any("magnification" in n for n in notes)
    table = run_files.read_metadata(out / "metadata.npz")
    write_particles_star(tmp_path / "out.star", table)
    back = starfile.read(tmp_path / "out.star", always_dict=True)
    optics = back["optics"]
    for col, values in ABERRATIONS.items():
        assert col in optics.columns, col
        got = optics[col].tolist()
        if isinstance(values[0], str):
            assert [str(v) for v in got] == values, col
        else:
            np.testing.assert_allclose(got, values, err_msg=col)


def test_output_star_keeps_each_groups_pixel_and_box_for_relion(tmp_path):
    """The particles of a two-group run written back keep each group's own pixel size
    and box in data_optics; RELION 3.1's reader agrees (when it is installed)."""
    spec = SimulationSpec(n_particles=8, snr=1.0, seed=1)
    star = _simulate_two_grids(tmp_path, spec)
    table = read_particles(star)
    grid = refinement_grid(table, None)
    assert (grid.box, grid.pixel_size) == GRID_A
    out = tmp_path / "out.star"
    write_particles_star(out, table)
    optics = starfile.read(out, always_dict=True)["optics"]
    assert optics["rlnImageSize"].tolist() == [GRID_A[0], GRID_B[0]]
    assert optics["rlnImagePixelSize"].tolist() == [GRID_A[1], GRID_B[1]]
    exe = shutil.which("relion_star_printtable")
    if exe is None:
        pytest.skip("RELION not installed")
    res = subprocess.run(
        [exe, str(out), "data_optics", "rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = [ln.split() for ln in res.stdout.splitlines() if ln.strip()]
    assert [(int(g), float(p), int(b)) for g, p, b in rows] == [
        (1, GRID_A[1], GRID_A[0]),
        (2, GRID_B[1], GRID_B[0]),
    ]
    # RELION's particle reader (with its optics model) selects group 2's particles
    sel = tmp_path / "group2.star"
    subprocess.run(
        [Path(exe).with_name("relion_star_handler"), "--i", str(out), "--o", str(sel),
         "--select", "rlnOpticsGroup", "--minval", "2", "--maxval", "2"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    back = starfile.read(sel, always_dict=True)
    assert len(back["particles"]) == 4
    assert all("@" in n and "/b/" in n for n in back["particles"]["rlnImageName"])


def test_images_of_two_boxes_read_in_pieces_of_one_size(tmp_path):
    """The image check of the start-up and the pre-flight reads a two-box table
    (chunks split where the box changes)."""
    from hetrefine.io.stacks import iter_image_chunks
    from hetrefine.validation import check_images

    star = _simulate_two_grids(tmp_path, SimulationSpec(n_particles=6, snr=1.0, seed=1))
    table = read_particles(star)
    pieces = list(iter_image_chunks(table, 4))
    assert [p.tolist() for p, _ in pieces] == [[0], [1], [2], [3], [4], [5]]
    assert [im.shape[1] for _, im in pieces] == [32, 40, 32, 40, 32, 40]
    check_images(star, table)
    sorted_rows = table.sort_values("rlnOpticsGroup", kind="stable")
    sizes = [(p.tolist(), im.shape[1]) for p, im in iter_image_chunks(sorted_rows, 4)]
    assert sizes == [([0, 1, 2], 32), ([3], 40), ([4, 5], 40)]  # chunks of 4 rows, split


def test_workflow_plans_the_coarsest_groups_box(tmp_path):
    """The workflow's particle box (full-box maps, memory) is the refinement grid's: the
    coarsest group's box, not the largest box (here the finer group's)."""
    from hetrefine.config import dataset_size, largest_image_box

    spec = SimulationSpec(n_particles=6, snr=1.0, seed=1)
    star = _simulate_two_grids(tmp_path, spec)
    text = star.read_text()
    assert refinement_grid(read_particles(star), None).input_box == GRID_A[0]
    cfg = defaults()
    cfg.update(particles=str(star), initial_models=["a.mrc", "b.mrc"])
    assert dataset_size(cfg, tmp_path).box == GRID_A[0] < GRID_B[0]
    assert largest_image_box(cfg, tmp_path) == GRID_B[0]  # preprocess memory: the largest
    assert text == star.read_text()


def test_six_group_relion_file_keeps_its_optics_table(tmp_path):
    """A RELION 3.1 polished set (six optics groups, two pixel sizes, beam tilt, Zernike,
    MagMat) written back: every optics column of every group as it was."""
    path = INTEROP / "cryodrgn" / "relion31.6opticsgroups.star"
    if not path.is_file():
        pytest.skip("interop files absent")
    table = read_particles(path, check_images=False)
    out = tmp_path / "out.star"
    write_particles_star(out, table, image_names="keep")
    src = starfile.read(path, always_dict=True)["optics"].sort_values("rlnOpticsGroup")
    back = starfile.read(out, always_dict=True)["optics"]
    for col in src.columns:
        assert col in back.columns, col
        a, b = src[col].tolist(), back[col].tolist()
        if isinstance(a[0], str):
            assert a == b, col
        else:
            np.testing.assert_allclose(b, a, rtol=1e-6, err_msg=col)
