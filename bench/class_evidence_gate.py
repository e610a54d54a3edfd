"""Offline: class accuracy of the gated class evidence at several full shares, from the
evidences ``engine_ladder.py`` saved for a cached run (rung d: the run's last maps,
searched poses; rung b: the true maps).

    python bench/engine_ladder.py --set adk3_snr005 --tag TAG --every 2
    python bench/class_evidence_gate.py --set adk3_snr005 --tag TAG --every 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hetrefine.classification import gated_class_evidence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_sets import OUT  # noqa: E402

SHARES = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)


def accuracies(z, rung: str, resolved=None) -> dict:
    label, prior = z["label"], z["prior"]
    good = label >= 0
    lp = np.log(np.maximum(prior, 1e-12))

    def acc(ev):
        return float(np.mean((ev + lp).argmax(1)[good] == label[good]))

    coarse, fine = z[rung], z[rung + "_fine"]
    out = {"coarse": acc(coarse), "fine": acc(fine)}
    peak, cons = z[rung + "_peak"], z[rung + "_considered"].astype(bool)
    for s in SHARES:
        ev, w = gated_class_evidence(coarse, fine, peak, cons, s)
        out[f"gated {s:g}"] = acc(ev)
        out[f"gated {s:g} mean weight"] = float(w.mean())
    # variants (not in the package): posterior-weighted weight, hard threshold, fixed blend
    p = np.exp(coarse + lp - (coarse + lp).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for s in SHARES:
        w = (p * np.clip(peak / s, 0, 1)).sum(1)
        out[f"postweighted {s:g}"] = acc(coarse + w[:, None] * (fine - coarse))
        w = np.where(cons, peak >= s, True).all(1).astype(float)
        out[f"hard {s:g}"] = acc(coarse + w[:, None] * (fine - coarse))
        out[f"hard {s:g} share fine"] = float(w.mean())
    if resolved is not None:
        for s in SHARES:
            ev, w = gated_class_evidence(coarse, fine, peak, cons, s, resolved)
            out[f"gated+resolved {s:g}"] = acc(ev)
            out[f"gated+resolved {s:g} mean weight"] = float(w.mean())
    for b in (0.25, 0.5, 0.75):
        out[f"blend {b:g}"] = acc(coarse + b * (fine - coarse))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    base = OUT / f"{a.set}_seed{a.seed}"
    z = np.load(base / f"ladder_{a.tag}_every{a.every}_evidence.npz")
    # the run's last model, in truth order as the ladder saved the evidences
    ladder = json.loads((base / f"ladder_{a.tag}_every{a.every}.json").read_text())
    mdl = json.loads(
        (sorted((base / f"ours_{a.tag}").glob("iter_*"))[-1] / "model.json").read_text()
    )
    res_a = np.asarray(mdl["resolution_A"])[np.asarray(ladder["class_order"][0])]
    box_a = (
        ladder["coarse_radius_A"] * ladder["coarse_radius_px"]
        if "coarse_radius_px" in ladder
        else None
    )
    resolved = (
        box_a / res_a >= ladder["coarse_radius_px"] + 1
        if box_a
        else res_a < ladder["coarse_radius_A"]
    )
    print(
        f"{a.set}: class resolution {np.round(res_a, 1).tolist()} A, coarse radius "
        f"{ladder['coarse_radius_A']:.1f} A -> resolved {resolved.tolist()}"
    )
    for rung in ("b", "d"):
        for key, v in accuracies(z, rung, resolved).items():
            print(f"{a.set} {rung} {key}: {v:.4f}")


if __name__ == "__main__":
    main()
