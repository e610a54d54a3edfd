"""Oracle ladder: where a cached engine run loses its classification and its poses.

    python bench/engine_ladder.py --set adk3_snr005 --tag lead_s3 --every 5

For one cached run of ``bench/engine_sets.py`` (its preprocessed particles, its last
iteration's model and half-set references, its masks and settings), one pass of the
engine's own kernels (``hetrefine.steps.align.AlignJob`` for the search references,
``hetrefine.alignment`` for the search) over a subset of the particles, under four rungs:

    a  true maps + true poses      the Bayes limit of classification with these data
    b  true maps + searched poses  what the search loses with perfect references
    c  run's maps + true poses     what the run's references lose with perfect poses
    d  run's maps + searched poses about the run itself (one pass)

True maps: the truth maps with the data's envelope (B 50 A^2, which the STAR file does
not carry), scaled by one least-squares factor onto the run's maps (the preprocessed
images' units), the same map in both half-sets; the engine masks them as it masks its
own (``focus.search_references``) and the search reads them up to the run's final
alignment limit (no noise, no Wiener filter: an upper bound on a reconstruction).
The run's maps: its last ``references.npz`` half-maps, each half-set's classes matched to
the truth classes by correlation. Class labels: argmax of the engine's class evidence
(the coarse evidence, as ``steps.align`` uses it) plus the log of the run's class
fractions; with true poses the log-likelihood at the true pose, at the final limit and
at the coarse search's radius (``@coarse``). Pose error: median angle between the pose
found in the particle's true class and its true pose, per class (every good particle).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_sets import OUT, build, oracle  # noqa: E402


def _load_particles(run: Path, every: int):
    """Preprocessed images, CTF rows, half-sets and particle indices (every ``every``-th)."""
    from hetrefine.io import run_files

    keys = ("images", "ctf", "half", "index")
    parts = {k: [] for k in keys}
    for chunk in sorted((run / "preprocess").glob("chunk_*.npz")):
        sh = run_files.read_shard(chunk)
        sel = sh["index"] % every == 0
        for k in keys:
            parts[k].append(sh[k][sel])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _envelope(vol: np.ndarray, px: float, b: float) -> np.ndarray:
    d = vol.shape[0]
    f = np.fft.fftfreq(d, px)
    s2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2
    return np.fft.ifftn(np.fft.fftn(vol) * np.exp(-b * s2 / 4)).real.astype(np.float32)


def _lowres(vol: np.ndarray, px: float, res_a: float) -> np.ndarray:
    d = vol.shape[0]
    f = np.fft.fftfreq(d, px)
    s = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
    return np.fft.fftn(vol)[s <= 1 / res_a]


def _match(maps_h: np.ndarray, truth_lr: list, px: float) -> list[int]:
    """For one half-set's maps (K, D, D, D): the run class of each truth class (best
    total correlation at 15 A and below)."""
    lr = [_lowres(m, px, 15.0) for m in maps_h]
    cc = np.array(
        [
            [np.real(np.vdot(t, m)) / np.linalg.norm(t) / np.linalg.norm(m) for m in lr]
            for t in truth_lr
        ]
    )
    k = len(truth_lr)
    return list(max(itertools.permutations(range(k)), key=lambda p: cc[range(k), p].sum()))


def _references(run_refs: Path, data: Path, spec: dict, tmp: Path):
    """Paths of the run's references (truth-ordered) and of the true maps, and the order."""
    from hetrefine.io import run_files
    from hetrefine.io.mrc import read_volume

    maps = run_files.read_references(run_refs)["maps"]
    k, px = spec["n_classes"], spec["pixel_size"]
    truth = [
        _envelope(read_volume(data / f"truth_class_{i + 1:02d}.mrc")[0], px, spec["envelope_b"])
        for i in range(k)
    ]
    truth_lr = [_lowres(t, px, 15.0) for t in truth]
    order = [_match(maps[:, h], truth_lr, px) for h in (0, 1)]
    ordered = np.stack([maps[order[h], h] for h in (0, 1)], axis=1)  # (K, 2, D, D, D)
    # one scale of the truth maps onto the run's (least squares, 15 A and below)
    run_lr = [_lowres(ordered[i].mean(0), px, 15.0) for i in range(k)]
    scale = sum(np.real(np.vdot(t, m)) for t, m in zip(truth_lr, run_lr)) / sum(
        np.real(np.vdot(t, t)) for t in truth_lr
    )
    true_maps = np.stack([np.stack([scale * t, scale * t]) for t in truth]).astype(np.float32)
    paths = tmp / "run_refs.npz", tmp / "true_refs.npz"
    run_files.write_references(paths[0], ordered.astype(np.float32))
    run_files.write_references(paths[1], true_maps)
    return paths, order, float(scale)


def _angle_deg(r_est: np.ndarray, r_true: np.ndarray) -> np.ndarray:
    cos = (np.einsum("nij,nij->n", r_est, r_true) - 1) / 2
    return np.rad2deg(np.arccos(np.clip(cos, -1, 1)))


def ladder(
    name: str, tag: str, every: int, seed: int = 0, step: float | None = None,
    radius_px: float | None = None, evidence_path: Path | None = None,
) -> dict:  # fmt: skip
    """The rungs' accuracies and pose errors; ``step``, ``radius_px``: the coarse search's
    angular step and radius instead of the run's (the searched rungs only); the class
    evidences (n, K) of each rung, the true labels and the prior into ``evidence_path``."""
    import pandas as pd

    from hetrefine.alignment import search_around_given_poses, search_poses
    from hetrefine.classification import class_posteriors
    from hetrefine.fourier import rfft2_centered
    from hetrefine.io import run_files
    from hetrefine.noise import particle_sigma2
    from hetrefine.rotations import euler_to_matrix
    from hetrefine.sampling import rotation_grid
    from hetrefine.steps import settings_for
    from hetrefine.steps.align import MIN_BACKPROJECTED_POSTERIOR, AlignJob

    data = build(name, seed, None)
    spec = json.loads((data / "spec.json").read_text())
    base = OUT / f"{name}_seed{seed}"
    run = base / f"ours_{tag}"
    cfg = json.loads((base / f"ours_{tag}_config.json").read_text())
    settings = settings_for("align", cfg)
    last = sorted(run.glob("iter_*"))[-1]
    model = last / "model.json"
    mdl = run_files.read_model(model)
    k, px = spec["n_classes"], spec["pixel_size"]
    truth = pd.read_csv(data / "truth.csv").set_index("index")
    p = _load_particles(run, every)
    t = truth.loc[p["index"]]
    label = t["class"].to_numpy() - 1  # -1: junk
    r_true = euler_to_matrix(t[["rot", "tilt", "psi"]].to_numpy())
    sh_true = (t[["shift_x_A", "shift_y_A"]].to_numpy() / px).astype(np.float32)
    sigma2 = particle_sigma2(mdl, None)
    t0 = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        (run_refs, true_refs), order, scale = _references(
            last / "references.npz", data, spec, Path(tmp)
        )
        jobs = {
            src: AlignJob(
                str(path),
                str(model),
                str(run / "mask.mrc"),
                str(run / "mask_focus.mrc"),
                settings,
                "cpu",
            )  # fmt: skip
            for src, path in (("true", true_refs), ("run", run_refs))
        }
        # the run's class fractions, in truth order (half A's matching)
        prior = np.asarray(mdl["class_fractions"], float)[order[0]]
        n = len(label)
        keys = ("a", "a@coarse", "b", "b/fine", "c", "c@coarse", "d", "d/fine")
        ev = {key: np.zeros((n, k)) for key in keys}
        err = {key: np.full(n, np.nan) for key in ("b", "d")}
        extra = {f"{r}_{q}": np.zeros((n, k)) for r in ("b", "d") for q in ("peak", "considered")}
        search, rots = jobs["run"].search, jobs["run"].rots
        if step is not None:
            search = dataclasses.replace(search, coarse_step_deg=step)
            rots = rotation_grid(step, str(settings["symmetry"]))
        if radius_px is not None:
            search = dataclasses.replace(search, radius_factor=radius_px * np.deg2rad(step or 15))
        coarse = dataclasses.replace(
            search, res_limit_px=search.radius_for_step(search.coarse_step_deg)
        )
        if step is not None or radius_px is not None:
            keys = ("b", "b/fine", "d", "d/fine")
            ev = {key: ev[key] for key in keys}
        for h in (0, 1):
            rows = np.flatnonzero(p["half"] == h)
            spectra = rfft2_centered(np.asarray(p["images"][rows], np.float32))
            ctf = np.asarray(p["ctf"][rows])
            for src, given, found in (("true", "a", "b"), ("run", "c", "d")):
                job = jobs[src]
                grids = job.grids(h)
                for key, s in ((given, search), (given + "@coarse", coarse)) * (len(ev) > 4):
                    res = search_around_given_poses(
                        spectra, ctf, sigma2, grids, r_true[rows], sh_true[rows], s, False
                    )
                    ev[key][rows] = res.coarse_evidence

                def worth(evidence):
                    return class_posteriors(evidence, prior, 1.0) > MIN_BACKPROJECTED_POSTERIOR

                res = search_poses(spectra, ctf, sigma2, grids, rots, search, worth)
                ev[found][rows] = res.coarse_evidence
                ev[found + "/fine"][rows] = res.fine_evidence
                # what classification.gated_class_evidence weighs them by
                extra[found + "_peak"][rows] = res.coarse_peak
                extra[found + "_considered"][rows] = worth(res.coarse_evidence)
                good = label[rows] >= 0
                r_found = res.rots[np.arange(len(rows)), np.maximum(label[rows], 0)]
                err[found][rows[good]] = _angle_deg(r_found[good], r_true[rows][good])
    good = label >= 0
    if evidence_path is not None:
        np.savez(
            evidence_path,
            label=label,
            prior=prior,
            **{key.replace("/", "_"): e for key, e in ev.items()},
            **extra,
        )
    out = {
        "set": name,
        "run": tag,
        "every": every,
        "n_particles": int(n),
        "res_limit_A": float(spec["box"] * px / search.res_limit_px),
        "coarse_radius_A": float(spec["box"] * px / coarse.res_limit_px),
        "coarse_radius_px": float(coarse.res_limit_px),
        "truth_scale": scale,
        "class_order": order,
        "cpu_s": time.process_time() - t0,
        "rungs": {},
    }
    for key, e in ev.items():
        pred = (e + np.log(np.maximum(prior, 1e-12))).argmax(1)
        row = {
            "accuracy": float(np.mean(pred[good] == label[good])),
            "per_class_recall": [float(np.mean(pred[label == c] == c)) for c in range(k)],
            "confusion": [np.bincount(pred[label == c], minlength=k).tolist() for c in range(k)],
        }
        if key in err:
            row["pose_err_median_deg"] = [
                float(np.nanmedian(err[key][label == c])) for c in range(k)
            ]
            row["within_10deg"] = [float(np.nanmean(err[key][label == c] < 10)) for c in range(k)]
        out["rungs"][key] = row
    return out


RUNG_NAMES = {
    "a": "true maps + true poses",
    "a@coarse": "true maps + true poses, coarse radius",
    "b": "true maps + searched poses",
    "c": "run maps + true poses",
    "c@coarse": "run maps + true poses, coarse radius",
    "d": "run maps + searched poses",
}
for _r, _maps in (("b", "true"), ("d", "run")):
    RUNG_NAMES[_r + "/fine"] = f"{_maps} maps, searched, class by fine-level evidence"


def report(res: dict, orc: list[dict]) -> str:
    lines = [
        f"{res['set']} [run {res['run']}], {res['n_particles']} particles (every "
        f"{res['every']}), limit {res['res_limit_A']:.1f} A, coarse radius "
        f"{res['coarse_radius_A']:.1f} A, CPU {res['cpu_s']:.0f} s; oracle FSC0.5 "
        + " / ".join(f"{c['fsc05_A']:.1f}" for c in orc)
        + " A",
        "| rung | accuracy | recall per class | pose err median deg | within 10 deg |",
        "|---|---|---|---|---|",
    ]
    for key, r in res["rungs"].items():
        rec = " / ".join(f"{100 * x:.1f}" for x in r["per_class_recall"])
        pe = " / ".join(f"{x:.1f}" for x in r.get("pose_err_median_deg", [])) or "(true)"
        w10 = " / ".join(f"{100 * x:.0f}%" for x in r.get("within_10deg", [])) or ""
        lines.append(
            f"| {key} {RUNG_NAMES[key]} | {100 * r['accuracy']:.2f}% | {rec} | {pe} | {w10} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", required=True)
    ap.add_argument("--tag", required=True, help="the cached run of engine_sets.py")
    ap.add_argument("--every", type=int, default=1, help="every n-th particle (by index)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--coarse-step", type=float, default=None, help="coarse step (deg)")
    ap.add_argument("--coarse-radius-px", type=float, default=None, help="coarse radius (px)")
    a = ap.parse_args()
    base = OUT / f"{a.set}_seed{a.seed}"
    extra = "".join(
        f"_{k}{v:g}" for k, v in (("step", a.coarse_step), ("r", a.coarse_radius_px)) if v
    )
    ev_path = base / f"ladder_{a.tag}_every{a.every}{extra}_evidence.npz"
    res = ladder(a.set, a.tag, a.every, a.seed, a.coarse_step, a.coarse_radius_px, ev_path)
    (base / f"ladder_{a.tag}_every{a.every}{extra}.json").write_text(json.dumps(res, indent=1))
    print(report(res, oracle(base / "data")), flush=True)


if __name__ == "__main__":
    main()
