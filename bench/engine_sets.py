"""Engine benchmark sets from real atomic models: accuracy, FSC vs truth and the oracle's, calibration, time.

    python bench/engine_sets.py --set adk2_snr005                 # build (cached) and run ours
    python bench/engine_sets.py --set adk2_snr002 --tag levels3 --config local_refine_levels=3
    python bench/engine_sets.py --set adk3_snr005 --build-only    # only simulate (and the oracle)

Atomic models: adenylate kinase (AdK, 214 residues, 23.6 kDa) open (4AKE) and
closed (1AKE), and the HIV-1 protease dimer (4E43, 198 residues, 21.5 kDa) as the
"different protein of the same size" for junk, from the MDAnalysisTests PyPI
package (test data of MDAnalysis). The sdist is fetched once with
``pip download --no-deps mdanalysistests==2.11.0`` into ``bench/out/models/`` and
the three PDB files are taken out of it (``--models DIR`` uses a folder that
already holds adk_open.pdb, adk_closed.pdb and 4E43.pdb). A small PDB reader
here takes the ATOM records' x, y, z and element (from the element column, or
the first letter of the atom name: the AdK files are CHARMM files without
elements); atoms weigh their atomic number.

The closed state is superposed onto the open one on the CA atoms of the CORE
domain (residues 1-29, 60-121, 160-214; LID 122-159 and NMP 30-59 move), so the
states differ by the domain motions only, as two classes of one particle would.
Intermediates are linear interpolations of the superposed coordinates. Each
state's map (``hetrefine.simulate.atomic_volume``: a 1.2 A Gaussian per atom)
is centred on its own centre of mass, as picking and centring would leave it.

Particles: ``hetrefine.simulate.simulate_from_volumes`` (uniform views unless
said, shifts up to 2 px, defocus 0.8-2.5 um with 400 A astigmatism, 300 kV, Cs
2.7 mm, amplitude contrast 0.1, an envelope B-factor of 50 A^2 that the STAR file
does not carry, white noise at the whole-box SNR). Initial models: the truth
maps low-passed to 30 A. Sets are cached in ``bench/out/engine_sets/<set>/data``
(seeded).

Ours: ``hetrefine.pipeline.run_pipeline`` with ``hetrefine.config.defaults()``
(plus ``--config key=value`` overrides, values parsed as JSON) in a child process
with one BLAS/OpenMP thread; CPU (user + sys) and wall time from ``os.wait4``.

Printed per run: accuracy (best label permutation, good particles), class
sizes, per-class FSC 0.5 / 0.143 vs the truth map (soft sphere at 0.75 of the
box) next to the oracle's (the same Wiener reconstruction from the true classes,
poses and intensity scales, noise power from the residuals against the truth),
the posterior calibration (expected misclassified = sum over good particles of
1 - max posterior, against the observed count), the median angular error of
the poses of rightly classified particles per class, CPU and wall time.
Results go to ``bench/out/engine_sets/<set>/ours_<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "engine_sets"
MODELS = ROOT / "bench" / "out" / "models"
SDIST = "mdanalysistests==2.11.0"
PDB_FILES = ("adk_open.pdb", "adk_closed.pdb", "4E43.pdb")
ADK_CORE = np.r_[1:30, 60:122, 160:215]  # residue numbers of AdK's rigid CORE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_relion import evaluate, run_pipeline_child, thread_env  # noqa: E402

# name: (states as interpolation fractions open -> closed, particles, SNR, extra spec)
CFTR = dict(
    model="cftr",
    states=(0.0, 6.0, 15.0),  # NBD2 hinge angles, degrees
    box=128,
    pixel_size=1.7,
    snr=0.1,
    noise_colour=1.0,
    intensity_sd=0.15,
    preferred_view_fraction=0.3,
    junk_fraction=0.08,
    decoy=True,
)
COMMON = dict(box=64, pixel_size=1.8, envelope_b=50.0, initial_lowpass_A=30.0, shift_max_px=2.0)
SETS = {
    "adk2_snr005": dict(states=(0.0, 1.0), n_particles=2000, snr=0.05),
    "adk2_snr002": dict(states=(0.0, 1.0), n_particles=2000, snr=0.02),
    "adk3_snr005": dict(states=(0.0, 0.5, 1.0), n_particles=10000, snr=0.05),
    # junk alone (issue 18's junk target): 20% junk of which a third is the HIV protease
    # (the rest pure noise and fragments), white noise, uniform views, a decoy class
    "adk2_junk_snr005": dict(
        states=(0.0, 1.0), n_particles=2000, snr=0.05, junk_fraction=0.2, decoy=True
    ),
    # the same two states with the nuisances of issue 18: coloured noise, +-15% intensity,
    # a preferred view and 20% junk of which a third is the HIV protease
    "adk2_nuis_snr005": dict(
        states=(0.0, 1.0),
        n_particles=2000,
        snr=0.05,
        noise_colour=1.0,
        intensity_sd=0.15,
        preferred_view_fraction=0.3,
        junk_fraction=0.2,
        decoy=True,
    ),
    # one nuisance at a time (issue 18 item 6: which of them washes the domain out)
    "adk2_colour_snr005": dict(states=(0.0, 1.0), n_particles=2000, snr=0.05, noise_colour=1.0),
    "adk2_intensity_snr005": dict(states=(0.0, 1.0), n_particles=2000, snr=0.05, intensity_sd=0.15),
    "adk2_prefview_snr005": dict(
        states=(0.0, 1.0), n_particles=2000, snr=0.05, preferred_view_fraction=0.3
    ),
    # issue 18's membrane hinge set (bench/membrane_set.py): CFTR (6MSM, ~130 kDa) in a
    # micelle, NBD2 hinged by 0, 6, 15 deg, box 128 at 1.7 A/px (the particle's 132 A fill
    # 61% of the box), adk2_nuis_snr005's nuisances with 8% junk; run with refine_box=64
    "cftr3_nuis": dict(CFTR, n_particles=20000),
    "cftr3_nuis_2k": dict(CFTR, n_particles=2000),  # the pipeline and oracle check
}
Z = {"H": 1, "C": 6, "N": 7, "O": 8, "S": 16, "P": 15}


# ----------------------------------------------------------------------------- models


def models_dir(given: Path | None) -> Path:
    """A folder with the three PDB files: ``given``, or taken out of the sdist (fetched once)."""
    if given is not None:
        return given
    if all((MODELS / f).exists() for f in PDB_FILES):
        return MODELS
    MODELS.mkdir(parents=True, exist_ok=True)
    sdists = sorted(MODELS.glob("mdanalysistests-*.tar.gz"))
    if not sdists:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", SDIST, "-d", str(MODELS)],
            check=True,
        )
        sdists = sorted(MODELS.glob("mdanalysistests-*.tar.gz"))
    with tarfile.open(sdists[-1]) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name in PDB_FILES and "/data/" in member.name:
                (MODELS / name).write_bytes(tar.extractfile(member).read())
    return MODELS


def read_pdb(path: Path) -> dict:
    """ATOM records of the first model of a PDB file (:func:`pdb_atoms`)."""
    return pdb_atoms(path.read_text().splitlines())


def pdb_atoms(lines, chain: str | None = None) -> dict:
    """ATOM records of the first model (alternate location blank or A; of ``chain``
    only, if given): coordinates (n, 3) in Angstrom, atomic numbers (n,), atom names
    (n,) and residue numbers (n,)."""
    xyz, z, names, resid = [], [], [], []
    for line in lines:
        if line.startswith("ENDMDL"):
            break
        if not line.startswith("ATOM") or line[16] not in " A":
            continue
        if chain is not None and line[21] != chain:
            continue
        name = line[12:16].strip()
        elem = line[76:78].strip() if len(line) >= 78 else ""
        elem = (elem or name.lstrip("0123456789")[:1]).upper()
        xyz.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
        z.append(Z.get(elem[:1], 6) if elem not in Z else Z[elem])
        names.append(name)
        resid.append(int(line[22:26]))
    return {
        "xyz": np.array(xyz),
        "z": np.array(z, float),
        "name": np.array(names),
        "resid": np.array(resid),
    }


def superpose(mobile: np.ndarray, target: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """``mobile`` (n, 3) moved by the rigid motion that best fits its rows ``fit`` onto
    ``target``'s (least squares, Kabsch)."""
    a, b = mobile[fit], target[fit]
    ca, cb = a.mean(axis=0), b.mean(axis=0)
    u, _, vt = np.linalg.svd((a - ca).T @ (b - cb))
    d = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1.0, 1.0, d]) @ vt
    return (mobile - ca) @ rot + cb


def state_volumes(models: Path, states, box: int, px: float):
    """Maps of AdK at the given interpolation fractions (0 open, 1 closed) and of the
    HIV protease dimer, (D, D, D) float32 each."""
    from hetrefine.simulate import atomic_volume

    op, cl = read_pdb(models / "adk_open.pdb"), read_pdb(models / "adk_closed.pdb")
    if len(op["xyz"]) != len(cl["xyz"]) or np.any(op["name"] != cl["name"]):
        raise SystemExit("adk_open.pdb and adk_closed.pdb do not list the same atoms")
    fit = (op["name"] == "CA") & np.isin(op["resid"], ADK_CORE)
    cl_xyz = superpose(cl["xyz"], op["xyz"], fit)
    vols = [atomic_volume((1 - t) * op["xyz"] + t * cl_xyz, op["z"], box, px) for t in states]
    other = read_pdb(models / "4E43.pdb")
    return vols, atomic_volume(other["xyz"], other["z"], box, px)


def build(name: str, seed: int, models: Path | None) -> Path:
    from hetrefine.simulate import SimulationSpec, simulate_from_volumes

    data = OUT / f"{name}_seed{seed}" / "data"
    if (data / "spec.json").exists():
        return data
    if name == "demo":  # the embedded demo (config.yaml's demo: phantoms, not atoms)
        from hetrefine.config import defaults
        from hetrefine.simulate import simulate_dataset

        simulate_dataset(SimulationSpec(**{**defaults()["demo"], "seed": seed}), data)
        return data
    s = dict(COMMON, **SETS[name])
    states = s.pop("states")
    if s.pop("model", "adk") == "cftr":  # the membrane hinge set; the junk's protein 4E43
        from membrane_set import state_volumes as cftr_volumes

        from hetrefine.simulate import atomic_volume

        vols = cftr_volumes(states, s["box"], s["pixel_size"])
        prot = read_pdb(models_dir(models) / "4E43.pdb")
        other = atomic_volume(prot["xyz"], prot["z"], s["box"], s["pixel_size"])
    else:
        vols, other = state_volumes(models_dir(models), states, s["box"], s["pixel_size"])
    spec = SimulationSpec(n_classes=len(states), seed=seed, **s)
    t0 = time.perf_counter()
    simulate_from_volumes(spec, data, vols, other)
    print(f"built {name} (seed {seed}) in {time.perf_counter() - t0:.0f} s -> {data}", flush=True)
    return data


# ----------------------------------------------------------------------------- oracle


def oracle(data: Path) -> list[dict]:
    """FSC vs truth of the reconstructions from the true classes, poses and scales
    (cached in oracle.json): the best any classification of this set can do."""
    cache = data / "oracle.json"
    if cache.exists():
        return json.loads(cache.read_text())
    import mrcfile
    import pandas as pd

    from hetrefine.ctf import compute_ctf
    from hetrefine.fourier import half_plane_indices, rfft2_centered
    from hetrefine.fsc import fsc, masked_fsc_corrected, resolution_angstrom
    from hetrefine.io.mrc import read_volume
    from hetrefine.io.star import read_star_blocks
    from hetrefine.mask import soft_sphere
    from hetrefine.projection import (
        backproject,
        grid_half_size,
        hermitian_complete,
        phase_shifts,
        prepare_reference,
        project,
    )
    from hetrefine.reconstruction import snr_from_fsc, wiener_volume
    from hetrefine.rotations import euler_to_matrix

    spec = json.loads((data / "spec.json").read_text())
    box, px = spec["box"], spec["pixel_size"]
    truth = pd.read_csv(data / "truth.csv")
    blocks = read_star_blocks(data / "particles.star")
    parts = blocks.get("particles")
    ctf = np.zeros((len(parts), 8), np.float32)
    ctf[:, 0], ctf[:, 1], ctf[:, 2] = (
        parts["rlnDefocusU"],
        parts["rlnDefocusV"],
        parts["rlnDefocusAngle"],
    )
    ctf[:, 3], ctf[:, 4], ctf[:, 5] = spec["voltage_kv"], spec["cs_mm"], spec["amplitude_contrast"]
    images = mrcfile.mmap(data / "particles.mrcs", permissive=True).data
    diam = 0.75 * box * px
    mask = soft_sphere(box, px, diam, min(1.2 * diam, box * px))
    r = box / 2 - 1
    flat, kx, ky = half_plane_indices(box, r, np, include_dc=True)
    dc_w = np.where((kx == 0) & (ky == 0), 0.5, 1.0)
    freq = 1.0 / (box * px)
    shells = np.rint(np.hypot(kx, ky)).astype(int)
    half = grid_half_size(box, 2, r)
    out = []
    for k in range(spec["n_classes"]):
        tmap, _ = read_volume(data / f"truth_class_{k + 1:02d}.mrc")
        grid = prepare_reference(tmap.astype(np.float32), 2)
        rows = np.flatnonzero(truth["class"].to_numpy() == k + 1)
        rots = euler_to_matrix(truth.loc[rows, ["rot", "tilt", "psi"]].to_numpy())
        sh = truth.loc[rows, ["shift_x_A", "shift_y_A"]].to_numpy() / px
        scale = truth.loc[rows, "scale"].to_numpy() if "scale" in truth else np.ones(len(rows))
        y = rfft2_centered(np.asarray(images[rows], np.float32)).reshape(len(rows), -1)[:, flat]
        y = y * phase_shifts(kx, ky, sh.astype(np.float32), box).conj()
        c = compute_ctf(ctf[rows], kx * freq, ky * freq) * scale[:, None]
        resid = np.abs(y - c * project(grid, rots.astype(np.float32), kx, ky, 2)) ** 2
        s2 = np.bincount(shells, resid.sum(0), box // 2 + 1) / np.maximum(
            np.bincount(shells, None, box // 2 + 1) * len(rows), 1
        )
        w_s = dc_w / s2[shells]
        sums = []
        for h in (0, 1):
            sel = np.arange(len(rows)) % 2 == h
            num = np.zeros((2 * half + 1,) * 3, np.complex128)
            wgt = np.zeros((2 * half + 1,) * 3, np.float64)
            backproject(num, wgt, rots[sel], kx, ky, c[sel] * y[sel] * w_s, c[sel] ** 2 * w_s, 2)
            sums.append(hermitian_complete(num, wgt))
        raw = [wiener_volume(n_, w_, box, 2, None) for n_, w_ in sums]
        half_fsc = masked_fsc_corrected(raw[0], raw[1], mask)
        full_fsc = 2 * np.clip(half_fsc, 0, 1) / (1 + np.clip(half_fsc, 0, 1))
        vol = wiener_volume(
            sums[0][0] + sums[1][0], sums[0][1] + sums[1][1], box, 2, snr_from_fsc(full_fsc)
        )
        curve = fsc(vol, tmap.astype(np.float32), mask)
        out.append(
            {
                "truth_class": k + 1,
                "n": int(len(rows)),
                "fsc05_A": resolution_angstrom(curve, box, px, 0.5),
                "fsc0143_A": resolution_angstrom(curve, box, px, 0.143),
            }
        )
    cache.write_text(json.dumps(out, indent=1))
    return out


# ----------------------------------------------------------------------------- ours


def extra_metrics(data: Path, star: Path, per_class: list[dict]) -> dict:
    """Calibration and pose errors from our particles_all.star against truth.csv."""
    import pandas as pd

    from hetrefine.io.star import read_star_blocks
    from hetrefine.rotations import euler_to_matrix

    truth = pd.read_csv(data / "truth.csv")
    blocks = read_star_blocks(star)
    parts = blocks.get("particles")
    if parts is None:
        parts = next(b for b in blocks.values() if "rlnImageName" in b.columns)
    idx = np.array([int(str(n).split("@")[0]) - 1 for n in parts["rlnImageName"]])
    t = truth.set_index("index").loc[idx]
    good = t["class"].to_numpy() > 0
    pred = parts["rlnClassNumber"].to_numpy().astype(int)
    to_pred = {c["truth_class"]: c["predicted_class"] for c in per_class}
    right = np.array([to_pred.get(tc, -1) == p for tc, p in zip(t["class"], pred)])
    pmax = parts["rlnMaxValueProbDistribution"].to_numpy().astype(float)
    r_est = euler_to_matrix(
        parts[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy().astype(float)
    )
    r_true = euler_to_matrix(t[["rot", "tilt", "psi"]].to_numpy())
    cos = (np.einsum("nij,nij->n", r_est, r_true) - 1) / 2
    err = np.rad2deg(np.arccos(np.clip(cos, -1, 1)))
    pose = {}
    for tc in sorted(to_pred):
        sel = good & right & (t["class"].to_numpy() == tc)
        pose[str(tc)] = {
            "median_deg": float(np.median(err[sel])) if sel.any() else None,
            "within_10deg": float(np.mean(err[sel] < 10)) if sel.any() else None,
            **(frame_check(r_est[sel], r_true[sel]) if sel.sum() > 2 else {}),
        }
    out = {
        "expected_wrong": float((1 - pmax[good]).sum()),
        "observed_wrong": int((~right[good]).sum()),
        "pose_error": pose,
    }
    if "hrFitScore" in parts.columns:
        out["junk"] = junk_metrics(t, pred, set(to_pred.values()), parts["hrFitScore"].to_numpy())
    return out


def frame_check(r_est: np.ndarray, r_true: np.ndarray) -> dict:
    """Are a class's poses right up to one rotation of its map (a map may settle in
    another frame than its truth)? The relative rotations Q_i = R_est_i^T R_true_i of
    its particles: their coherence (the mean's singular values / 3: 1 when every
    particle has the same offset, ~0 for random poses), the common offset (the
    rotation nearest their mean) and the median error after taking it out."""
    q = np.einsum("nji,njk->nik", r_est, r_true)
    u, s, vt = np.linalg.svd(q.mean(axis=0))
    r0 = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
    err = np.rad2deg(np.arccos(np.clip((np.einsum("nij,ij->n", q, r0) - 1) / 2, -1, 1)))
    return {
        "coherence": float(s.sum() / 3),
        "frame_offset_deg": float(np.rad2deg(np.arccos(np.clip((np.trace(r0) - 1) / 2, -1, 1)))),
        "median_deg_in_frame": float(np.median(err)),
    }


#: fit-score thresholds at which the junk caught and the good particles lost are reported
JUNK_THRESHOLDS = (-1.5, -2.0, -2.5, -3.0, -3.5)


def junk_metrics(t, pred: np.ndarray, good_classes: set, score: np.ndarray) -> dict:
    """Junk caught and good particles lost, by a decoy class (a predicted class that
    stands for no true state) and by the fit-score flag at each of JUNK_THRESHOLDS:
    per junk kind (noise, fragment, other protein) and in all."""
    score = np.asarray(score, float)
    label = t["class"].to_numpy()
    kind = (
        np.where(t["junk_kind"].isna(), "", t["junk_kind"].astype(str))
        if "junk_kind" in t
        else np.full(len(t), "")
    )
    junk = label == 0
    decoy = ~np.isin(pred, list(good_classes))
    res = {"n_junk": int(junk.sum()), "n_good": int((~junk).sum()), "by_threshold": {}}
    for thr in (None, *JUNK_THRESHOLDS):  # without junk: the good particles lost
        caught = decoy | (score < thr) if thr is not None else decoy
        row = {
            "junk_caught": float(caught[junk].mean()) if junk.any() else None,
            "good_lost": float(caught[~junk].mean()),
            "flag_only_good_lost": float((score[~junk] < thr).mean()) if thr is not None else 0.0,
        }
        for k in ("noise", "fragment", "other"):
            sel = junk & (kind == k)
            row[f"caught_{k}"] = float(caught[sel].mean()) if sel.any() else None
        res["by_threshold"]["decoy" if thr is None else f"{thr:g}"] = row
    g = score[~junk & np.isfinite(score)]
    res["good_score_median"], res["good_score_sd"] = float(np.median(g)), float(np.std(g))
    return res


def one_map_start(data: Path, k: int) -> list[str]:
    """K copies of one consensus map (the mean of the K low-passed truth maps), as a
    user starts from one refinement or from the one good ab-initio class."""
    from hetrefine.io.mrc import read_volume, write_mrc

    path = data / "initial_consensus.mrc"
    if not path.exists():
        vols = [read_volume(data / f"initial_model_{i + 1:02d}.mrc") for i in range(k)]
        write_mrc(path, np.mean([v for v, _ in vols], axis=0), vols[0][1])
    return [str(path)] * k


def random_subset_start(data: Path, k: int) -> list[str]:
    """K maps that carry almost no class information, as ab-initio gives when it does
    not separate the states: each reconstructed (true poses and CTFs) from a random
    1/K of the particles whatever their class, low-passed to 30 A, written at box
    72 (1.6 A/px for the 1.8 A/px sets: the same extent) on grey scales 0.2, 30, ..."""
    import mrcfile
    import pandas as pd

    from hetrefine.ctf import compute_ctf
    from hetrefine.fourier import (
        half_plane_indices,
        lowpass_volume,
        resample_volume,
        rfft2_centered,
    )
    from hetrefine.io.mrc import write_mrc
    from hetrefine.io.star import read_star_blocks
    from hetrefine.projection import backproject, grid_half_size, hermitian_complete, phase_shifts
    from hetrefine.reconstruction import wiener_volume
    from hetrefine.rotations import euler_to_matrix

    paths = [data / f"initial_random_subset_{i + 1:02d}.mrc" for i in range(k)]
    if all(p.exists() for p in paths):
        return [str(p) for p in paths]
    spec = json.loads((data / "spec.json").read_text())
    box, px = spec["box"], spec["pixel_size"]
    truth = pd.read_csv(data / "truth.csv")
    parts = read_star_blocks(data / "particles.star").get("particles")
    ctf = np.zeros((len(parts), 8), np.float32)
    ctf[:, 0], ctf[:, 1], ctf[:, 2] = (
        parts["rlnDefocusU"],
        parts["rlnDefocusV"],
        parts["rlnDefocusAngle"],
    )
    ctf[:, 3], ctf[:, 4], ctf[:, 5] = spec["voltage_kv"], spec["cs_mm"], spec["amplitude_contrast"]
    images = mrcfile.mmap(data / "particles.mrcs", permissive=True).data
    flat, kx, ky = half_plane_indices(box, box / 2 - 1, np, include_dc=True)
    dc_w = np.where((kx == 0) & (ky == 0), 0.5, 1.0)
    half = grid_half_size(box, 2, box / 2 - 1)
    subset = np.random.default_rng([spec["seed"], 77]).integers(0, k, len(truth))
    out_box = int(round(box * 1.125 / 2)) * 2
    for i, path in enumerate(paths):
        rows = np.flatnonzero(subset == i)
        rots = euler_to_matrix(truth.loc[rows, ["rot", "tilt", "psi"]].to_numpy())
        sh = truth.loc[rows, ["shift_x_A", "shift_y_A"]].to_numpy() / px
        y = rfft2_centered(np.asarray(images[rows], np.float32)).reshape(len(rows), -1)[:, flat]
        y = y * phase_shifts(kx, ky, sh.astype(np.float32), box).conj()
        c = compute_ctf(ctf[rows], kx / (box * px), ky / (box * px))
        num = np.zeros((2 * half + 1,) * 3, np.complex128)
        wgt = np.zeros((2 * half + 1,) * 3, np.float64)
        backproject(num, wgt, rots.astype(np.float32), kx, ky, c * y * dc_w, c**2 * dc_w, 2)
        vol = wiener_volume(*hermitian_complete(num, wgt), box, 2, None)
        vol = lowpass_volume(vol, 30.0, px)
        vol = resample_volume(vol, px, out_box, px * box / out_box)
        write_mrc(path, (0.2 * 150.0**i) * vol, px * box / out_box)
    return [str(p) for p in paths]


def on_set_grid(data: Path, maps: list[Path]) -> list[Path]:
    """The run's class maps on the set's box and pixel size (a run with a smaller
    ``refine_box`` writes its maps on that grid): Fourier-padded copies next to them."""
    from hetrefine.fourier import resample_volume
    from hetrefine.io.mrc import read_volume, write_mrc

    spec = json.loads((data / "spec.json").read_text())
    out = []
    for path in maps:
        vol, px = read_volume(path)
        if vol.shape[0] != spec["box"]:
            path = path.with_name("map_on_set_grid.mrc")
            vol = resample_volume(vol, px, spec["box"], spec["pixel_size"])
            write_mrc(path, vol, spec["pixel_size"])
        out.append(path)
    return out


def evaluate_run(data: Path, out: Path, k: int) -> dict:
    """Accuracy, FSC vs truth, calibration, pose errors of the run in ``out`` (K classes)."""
    maps = on_set_grid(data, [out / f"class_{i + 1:03d}" / "map.mrc" for i in range(k)])
    res = evaluate(data, out / "particles_all.star", maps)
    res.update(extra_metrics(data, out / "particles_all.star", res["per_class"]))
    return res


def run_ours(
    name: str, seed: int, data: Path, tag: str, overrides: dict, start: str = "truth"
) -> dict:
    from hetrefine.config import defaults, validate_config

    base = OUT / f"{name}_seed{seed}"
    spec = json.loads((data / "spec.json").read_text())
    cfg = defaults()
    cfg["particles"] = str(data / "particles.star")
    k_true = spec["n_classes"]
    cfg["initial_models"] = (
        one_map_start(data, k_true)
        if start == "one_map"
        else random_subset_start(data, k_true)
        if start == "random_subsets"
        else [str(data / f"initial_model_{k + 1:02d}.mrc") for k in range(k_true)]
    )
    if spec.get("decoy"):  # the decoy blob as class K + 1
        cfg["initial_models"].append(str(data / f"initial_model_{k_true + 1:02d}.mrc"))
    cfg["run"] = tag
    cfg.update(overrides)
    cfg = validate_config(cfg)
    out = base / f"ours_{tag}"
    cfg_path = base / f"ours_{tag}_config.json"
    cfg_path.write_text(json.dumps(cfg))
    env = thread_env(1)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    m = run_pipeline_child(cfg_path, out, env, base / f"ours_{tag}.log")
    if m["returncode"] != 0:
        sys.exit(f"our pipeline failed; see {base / f'ours_{tag}.log'}")
    ev = evaluate_run(data, out, len(cfg["initial_models"]))
    res = {"set": name, "seed": seed, "tag": tag, "start": start, "overrides": overrides, **m, **ev}
    (base / f"ours_{tag}.json").write_text(json.dumps(res, indent=1))
    return res


def report(res: dict, orc: list[dict]) -> None:
    ours = " / ".join(f"{c['fsc05_A']:.1f}" for c in res["per_class"])
    orac = " / ".join(f"{c['fsc05_A']:.1f}" for c in orc)
    pose = " / ".join(
        f"{v['median_deg']:.1f}" if v["median_deg"] is not None else "-"
        for v in res["pose_error"].values()
    )
    print(
        f"{res['set']} seed {res['seed']} [{res['tag']}]: accuracy {100 * res['accuracy']:.2f}% "
        f"(sizes {res['class_sizes']}); FSC0.5 vs truth {ours} A (oracle {orac} A); "
        f"calibration: expected wrong {res['expected_wrong']:.1f}, observed {res['observed_wrong']}; "
        f"median pose error {pose} deg; CPU {res['cpu_s']:.0f} s, wall {res['wall_s']:.0f} s, "
        f"RSS {res['max_rss_mib']:.0f} MiB",
        flush=True,
    )
    junk = res.get("junk", {})
    if junk and not junk.get("n_junk"):  # no junk in the set: the good particles flagged
        lost = ", ".join(
            f"< {thr}: {100 * row['good_lost']:.2f}%"
            for thr, row in junk["by_threshold"].items()
            if thr != "decoy"
        )
        print(f"  good particles flagged by the fit score (no junk in the set): {lost}", flush=True)
        return
    for thr, row in junk.get("by_threshold", {}).items():
        kinds = " / ".join(
            "-" if row[f"caught_{k}"] is None else f"{100 * row[f'caught_{k}']:.0f}%"
            for k in ("noise", "fragment", "other")
        )
        caught = "-" if row["junk_caught"] is None else f"{100 * row['junk_caught']:.1f}%"
        print(
            f"  junk caught ({'decoy class' if thr == 'decoy' else 'decoy or fit score < ' + thr}): "
            f"{caught} (noise / fragment / other protein {kinds}); good lost "
            f"{100 * row['good_lost']:.2f}%",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=sorted(SETS) + ["demo"], default="adk2_snr005")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="defaults", help="name of this run of ours (cached under it)")
    ap.add_argument(
        "--config", nargs="*", default=[], help="key=value config overrides (JSON values)"
    )
    ap.add_argument(
        "--models",
        type=Path,
        default=None,
        help="folder with adk_open.pdb, adk_closed.pdb, 4E43.pdb",
    )
    ap.add_argument(
        "--start",
        choices=["truth", "one_map", "random_subsets"],
        default="truth",
        help="initial models: the truth maps low-passed to 30 A, K copies of their mean, "
        "or K reconstructions of random particle subsets (other box, pixel and grey scales)",
    )
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument(
        "--reevaluate", action="store_true", help="recompute the metrics of a cached run"
    )
    ap.add_argument(
        "--rerun", action="store_true", help="run ours even when a cached result exists"
    )
    a = ap.parse_args()
    data = build(a.set, a.seed, a.models)
    orc = oracle(data)
    print(
        "oracle FSC0.5 vs truth: " + " / ".join(f"{c['fsc05_A']:.1f}" for c in orc) + " A",
        flush=True,
    )
    if a.build_only:
        return
    overrides = {k: json.loads(v) for k, v in (c.split("=", 1) for c in a.config)}
    if a.start != "truth":  # its own cache: a run from other initial models is another run
        a.tag = f"{a.tag}_{a.start}"
    cache = OUT / f"{a.set}_seed{a.seed}" / f"ours_{a.tag}.json"
    run_dir = OUT / f"{a.set}_seed{a.seed}" / f"ours_{a.tag}"
    if a.reevaluate and not cache.exists() and (run_dir / "particles_all.star").exists():
        # a finished run whose evaluation failed: its metrics, without its CPU time
        cfg = json.loads((run_dir.parent / f"ours_{a.tag}_config.json").read_text())
        res = {"set": a.set, "seed": a.seed, "tag": a.tag, "overrides": overrides}
        res.update(cpu_s=float("nan"), wall_s=float("nan"), max_rss_mib=float("nan"))
        res.update(evaluate_run(data, run_dir, len(cfg["initial_models"])))
        cache.write_text(json.dumps(res, indent=1))
    elif cache.exists() and not a.rerun:
        res = json.loads(cache.read_text())
        if a.reevaluate:  # the metrics again from the cached run's files
            res.update(evaluate_run(data, run_dir, len(res["class_sizes"])))
            cache.write_text(json.dumps(res, indent=1))
    else:
        res = run_ours(a.set, a.seed, data, a.tag, overrides, a.start)
    report(res, orc)


if __name__ == "__main__":
    main()
