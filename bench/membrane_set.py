"""The membrane hinge set of issue 18: CFTR (6MSM) whose NBD2 hinges by 0, 6 and 15 degrees,
in a detergent micelle (the maps and the true-pose classification check; engine_sets.py
builds and runs the set as ``cftr3_nuis``).

    python bench/membrane_set.py --set cftr3_nuis_2k     # true-pose classification of a built set

Model: 6MSM (phosphorylated, ATP-bound human CFTR, 3.2 A cryo-EM), chain A's ATOM records
from MDAnalysisTests/data/6msm.pdb.bz2 in the sdist engine_sets.py already fetched (no
ligands, lipids or the 17-residue UNK chain B): 1181 residues, ~130 kDa with hydrogens, one
particle (TMD1, NBD1, TMD2, NBD2; the R domain is not resolved). Atoms weigh their atomic
number as in engine_sets. Frame: the weighted centre at the origin, the long axis (first
principal axis, along the membrane normal) on z with the NBDs at +z.

Hinge: NBD2 (residues 1202-1451, 21% of the mass) turned rigidly about an axis through the
centroid of its contact with the transmembrane domains (its atoms within 4.5 A of the
coupling helices' atoms: the socket NBDs tilt in), perpendicular to z and to the line
NBD1 -> NBD2, so that the NBD dimer opens: 0, 6 and 15 degrees for states 1-3 (NBD2's
atoms move by 1.9 and 4.7 A on average, at most 4.5 and 11.3 A). (A pivot at the centroid
of all its contacts, NBD1's included, lies near NBD2's centre: 1.6 A on average at 6
degrees, and 89% of the good particles of a 2,000-particle set at SNR 0.05 classify
right with the true poses and maps.) All states are drawn in state 1's frame (a consensus refinement
aligns every particle to one body), so only NBD2 moves.

Micelle (hetrefine.simulate.micelle_volume): an oblate ellipsoid of semi-axes 42, 42, 22 A
centred on the transmembrane region (z = the mean z of the lipid and cholesterol atoms the
entry carries, the in-plane centre of the atoms within 15 A of that plane), density 0.3 of
the protein's interior level (detergent tails are below, head groups above, the protein's
contrast; micelles show at about a third of the protein's level in low-pass maps), a 3 A
Gaussian edge, left out where the protein is; the same in all states.
"""

from __future__ import annotations

import argparse
import bz2
import json
import sys
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "bench" / "out" / "models"
OUT = ROOT / "bench" / "out" / "engine_sets"
NBD1, NBD2 = (389, 678), (1202, 1451)
MICELLE_RADII_A, MICELLE_DENSITY = (42.0, 42.0, 22.0), 0.3


def read_6msm(models: Path = MODELS) -> dict:
    """Chain A's ATOM records (xyz, atomic number, residue number) and the lipid and
    cholesterol HETATM coordinates of 6MSM, read out of the MDAnalysisTests sdist."""
    sdist = sorted(models.glob("mdanalysistests-*.tar.gz"))
    if not sdist:
        raise SystemExit(f"no mdanalysistests sdist in {models}: run engine_sets.py once")
    with tarfile.open(sdist[-1]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/data/6msm.pdb.bz2"))
        text = bz2.decompress(tar.extractfile(member).read()).decode()
    from engine_sets import pdb_atoms  # the same ATOM parser as the AdK models

    lines = text.splitlines()
    atoms = pdb_atoms(lines, chain="A")
    lipid = [
        [float(line[30:38]), float(line[38:46]), float(line[46:54])]
        for line in lines
        if line.startswith("HETATM") and line[17:20] in ("POV", "CLR")
    ]
    return {"xyz": atoms["xyz"], "z": atoms["z"], "resid": atoms["resid"], "lipid": np.array(lipid)}


def in_frame(m: dict) -> dict:
    """The model with its weighted centre at the origin and its long axis on z (NBDs at +z)."""
    c = (m["xyz"] * m["z"][:, None]).sum(0) / m["z"].sum()
    _, _, vt = np.linalg.svd(m["xyz"] - c, full_matrices=False)
    rot = vt.copy()
    nbd = (m["resid"] >= NBD1[0]) & (m["resid"] <= NBD1[1])
    if ((m["xyz"][nbd] - c) @ rot[0]).mean() < 0:
        rot[0] *= -1
    rot[2] = np.cross(rot[0], rot[1])  # a proper rotation
    rot = rot[[1, 2, 0]]  # long axis -> z
    return {**m, "xyz": (m["xyz"] - c) @ rot.T, "lipid": (m["lipid"] - c) @ rot.T}


def hinge(m: dict, angle_deg: float) -> np.ndarray:
    """Coordinates (n, 3) with NBD2 turned by ``angle_deg`` about its contact axis."""
    from scipy.spatial import cKDTree
    from scipy.spatial.transform import Rotation

    xyz, res = m["xyz"], m["resid"]
    dom = (res >= NBD2[0]) & (res <= NBD2[1])
    nbd1 = (res >= NBD1[0]) & (res <= NBD1[1])
    dist, _ = cKDTree(xyz[~dom & ~nbd1]).query(xyz[dom])  # the TMDs' coupling helices
    pivot = xyz[dom][dist < 4.5].mean(0)
    axis = np.cross([0.0, 0.0, 1.0], xyz[dom].mean(0) - xyz[nbd1].mean(0))
    rot = Rotation.from_rotvec(np.deg2rad(angle_deg) * axis / np.linalg.norm(axis))
    out = xyz.copy()
    out[dom] = rot.apply(xyz[dom] - pivot) + pivot
    return out


def state_volumes(states, box: int, px: float) -> list[np.ndarray]:
    """Maps (D, D, D) of CFTR in its micelle with NBD2 at the hinge angles ``states``
    (degrees)."""
    from hetrefine.simulate import atomic_volume, micelle_volume

    m = in_frame(read_6msm())
    prot = [atomic_volume(hinge(m, a), m["z"], box, px, centre_A=np.zeros(3)) for a in states]
    zc = m["lipid"][:, 2].mean()
    slab = np.abs(m["xyz"][:, 2] - zc) < 15
    centre = (*m["xyz"][slab, :2].mean(0), zc)
    mic = micelle_volume(prot[0], px, MICELLE_RADII_A, centre, MICELLE_DENSITY)
    return [p + mic for p in prot]


def true_pose_classification(data: Path, box_crop: int | None = None) -> dict:
    """Fraction of good particles whose best class, given the true pose, shift, CTF and
    intensity scale and the truth maps, is their own: the likelihood under each class
    with the noise spectrum estimated from the residuals to the true class (per shell),
    over the frequencies up to ``box_crop`` / 2 - 1 (the refine box's Nyquist) or all."""
    import mrcfile
    import pandas as pd

    from hetrefine.ctf import compute_ctf
    from hetrefine.fourier import half_plane_indices, rfft2_centered
    from hetrefine.io.mrc import read_volume
    from hetrefine.io.star import read_star_blocks
    from hetrefine.projection import phase_shifts, prepare_reference, project
    from hetrefine.rotations import euler_to_matrix

    spec = json.loads((data / "spec.json").read_text())
    box, px, k = spec["box"], spec["pixel_size"], spec["n_classes"]
    truth = pd.read_csv(data / "truth.csv")
    parts = read_star_blocks(data / "particles.star").get("particles")
    rows = np.flatnonzero(truth["class"].to_numpy() > 0)
    r_max = (box_crop or box) / 2 - 1
    flat, kx, ky = half_plane_indices(box, r_max, np, include_dc=False)
    shells = np.rint(np.hypot(kx, ky)).astype(int)
    ctf = np.zeros((len(rows), 8), np.float32)
    for j, col in enumerate(("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")):
        ctf[:, j] = parts[col].to_numpy()[rows]
    ctf[:, 3], ctf[:, 4], ctf[:, 5] = spec["voltage_kv"], spec["cs_mm"], spec["amplitude_contrast"]
    scale = truth["scale"].to_numpy()[rows] if "scale" in truth else np.ones(len(rows))
    c = compute_ctf(ctf, kx / (box * px), ky / (box * px)) * scale[:, None]
    if spec.get("envelope_b"):
        c = c * np.exp(-spec["envelope_b"] / 4 * (kx * kx + ky * ky) / (box * px) ** 2)
    rots = euler_to_matrix(truth.loc[rows, ["rot", "tilt", "psi"]].to_numpy()).astype(np.float32)
    sh = (truth.loc[rows, ["shift_x_A", "shift_y_A"]].to_numpy() / px).astype(np.float32)
    images = mrcfile.mmap(data / "particles.mrcs", permissive=True).data
    label = truth["class"].to_numpy()[rows]
    onehot = np.zeros((len(kx), shells.max() + 1))
    onehot[np.arange(len(kx)), shells] = 1.0
    per_shell = np.zeros((len(rows), k, shells.max() + 1))  # residual power per shell
    for i in range(k):
        grid = prepare_reference(read_volume(data / f"truth_class_{i + 1:02d}.mrc")[0], 2)
        for ch in np.array_split(np.arange(len(rows)), max(1, len(rows) // 500)):
            y = rfft2_centered(np.asarray(images[rows[ch]], np.float32)).reshape(len(ch), -1)
            y = y[:, flat] * phase_shifts(kx, ky, sh[ch], box).conj()
            d = np.abs(y - c[ch] * project(grid, rots[ch], kx, ky, 2)) ** 2
            per_shell[ch, i] = d @ onehot
    own = per_shell[np.arange(len(rows)), label - 1]
    s2 = own.sum(0) / np.maximum(onehot.sum(0) * len(rows), 1)  # noise power per shell
    score = (per_shell / np.where(s2 > 0, s2, np.inf)).sum(-1)
    pred = score.argmin(1) + 1
    logp = -(score - score.min(1, keepdims=True))  # log posteriors (complex Gaussian noise)
    post = np.exp(logp) / np.exp(logp).sum(1, keepdims=True)
    entropy = -(post * np.log(np.clip(post, 1e-300, 1))).sum(1).mean()
    per_class = {int(i + 1): float((pred[label == i + 1] == i + 1).mean()) for i in range(k)}
    return {
        "n_good": int(len(rows)),
        "right": float((pred == label).mean()),
        "per_class": per_class,
        "r_max": r_max,
        "entropy": float(entropy),  # the posterior entropy's mean: ln K = chance
        "expected_wrong": float((1 - post.max(1)).sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="cftr3_nuis")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    data = OUT / f"{a.set}_seed{a.seed}" / "data"
    box = json.loads((data / "spec.json").read_text())["box"]
    ap_px = json.loads((data / "spec.json").read_text())["pixel_size"]
    # all shells, the refine box's, and the engine's 29 A start limit (shells to D px / 29 A)
    crops = (None, 64, 2 * int(box * ap_px / 29.0) + 2) if box > 64 else (None,)
    for crop in crops:
        r = true_pose_classification(data, crop)
        print(
            f"{a.set}: true poses and maps, shells to {r['r_max']:.0f}: "
            f"{100 * r['right']:.2f}% of {r['n_good']} good particles right "
            f"(per class {r['per_class']}); posterior entropy {r['entropy']:.3f}, "
            f"expected wrong {r['expected_wrong']:.0f}, observed {(1 - r['right']) * r['n_good']:.0f}",
            flush=True,
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
