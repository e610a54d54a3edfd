"""All figures of a run, as pure functions: arrays and dicts in, image files out.

Every function writes a PNG (and, for line plots, an SVG beside it with the
same stem) and returns nothing. Files are byte-stable: the same input gives the
same bytes on a rerun (Agg backend; PNG ``Software`` metadata removed; SVG
``svg.hashsalt`` fixed and ``Date`` removed).

Conventions: classes are 1-based in labels; Euler angles are RELION ZYZ
(rot, tilt, psi) in degrees; maps are (z, y, x) arrays; resolutions in Angstrom.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hetrefine.classification import hard_classes
from hetrefine.fsc import fsc_crossing
from hetrefine.orientations import orientation_histogram
from hetrefine.plot_style import figure as _figure
from hetrefine.plot_style import plt  # pyplot on the Agg backend
from hetrefine.plot_style import save as _save
from hetrefine.plot_style import styled as _styled
from hetrefine.report import write_summary

# --------------------------------------------------------------------------- orientations


def _subdivide(edges: np.ndarray, sub: int) -> np.ndarray:
    """Bin edges (m+1,) -> (m*sub+1,) edges splitting every bin into ``sub`` equal parts."""
    t = np.linspace(0.0, 1.0, sub + 1)[:-1]
    inner = edges[:-1, None] + (edges[1:] - edges[:-1])[:, None] * t[None, :]
    return np.concatenate([inner.ravel(), edges[-1:]])


@_styled
def plot_orientation_distribution(
    euler_deg: np.ndarray, path: str | os.PathLike, title: str | None = None, svg: bool = True
) -> None:
    """Mollweide map of the viewing-direction counts of one class (PNG + SVG, map rasterised).

    ``euler_deg`` (n, 3) RELION rot/tilt/psi in degrees of the particles
    hard-assigned to the class. Colour: particles per equal-area bin.
    """
    n = int(np.asarray(euler_deg).reshape(-1, 3).shape[0])
    # Bins sized from the count (about 8 particles per bin, 8 to 96 across) so the map
    # shows a density, not isolated dots, at a few hundred particles too.
    n_lon = int(np.clip(2 * round(np.sqrt(n / 4.0) / 2), 8, 96))
    counts, lon_e, lat_e = orientation_histogram(euler_deg, n_lon=n_lon, n_lat=n_lon // 2)
    fig = plt.figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot(111, projection="mollweide")
    # Draw each bin as a sub-grid so the straight quad edges follow the curved map
    # boundary (one quad per bin leaves white chords at the rim); values unchanged.
    sub = 6
    lon_draw = _subdivide(lon_e, sub)
    lat_draw = _subdivide(lat_e, sub)
    masked = np.ma.masked_equal(np.repeat(np.repeat(counts, sub, axis=0), sub, axis=1), 0)
    vmax = max(1, int(counts.max()))
    mesh = ax.pcolormesh(
        lon_draw,
        lat_draw,
        masked,
        cmap="viridis",
        shading="flat",
        vmin=0,
        vmax=vmax,
        rasterized=True,  # an image inside the SVG, not thousands of quads
    )
    ax.grid(True, alpha=0.3, color="0.4")
    ax.set_xticklabels([])
    ax.set_facecolor("0.95")
    ax.set_xlabel("rot (longitude)")
    ax.set_ylabel("90° - tilt (latitude)")
    ax.set_yticks(np.deg2rad([-60, -30, 0, 30, 60]))
    cb = fig.colorbar(mesh, ax=ax, orientation="horizontal", shrink=0.6, pad=0.08)
    cb.set_label("particles per bin (equal area)")
    ax.set_title(title if title is not None else f"viewing directions ({n} particles)", pad=12)
    _save(fig, path, svg=svg)


# --------------------------------------------------------------------------- FSC


@_styled
def plot_fsc(
    fsc: Sequence[np.ndarray],
    box: int,
    pixel_size: float | None,
    path: str | os.PathLike,
    title: str = "Gold-standard FSC per class",
    classes: Sequence[int] | None = None,
) -> None:
    """FSC of each class against spatial frequency, with the 0.143 and 0.5 thresholds.

    ``fsc``: K arrays over Fourier shells 0..D/2; ``box`` D in pixels;
    ``pixel_size`` in Angstrom (None: the x axis is the shell index and no
    resolution is given). ``classes``: 1-based class numbers for the legend
    (default 1..K). The legend gives each class's resolution at 0.143. With no
    FSC at all (before the first reconstruction) the figure says so.
    Writes PNG and SVG.
    """
    classes = list(classes) if classes is not None else list(range(1, len(fsc) + 1))
    fig, ax = _figure(figsize=(6.0, 4.0))
    for c, f in zip(classes, fsc, strict=True):
        f = np.asarray(f, dtype=np.float64)
        if pixel_size:
            x = np.arange(f.size) / (box * pixel_size)
            label = f"class {c:03d}: {fsc_crossing(f, box, pixel_size, 0.143):.1f} Å"
        else:
            x = np.arange(f.size, dtype=np.float64)
            label = f"class {c:03d}"
        ax.plot(x, f, lw=1.5, label=label, color=f"C{(c - 1) % 10}")
    ax.axhline(0.143, color="0.3", ls="--", lw=0.8)
    ax.axhline(0.5, color="0.3", ls=":", lw=0.8)
    ax.text(0.0, 0.143, " 0.143", va="bottom", ha="left", fontsize=7, color="0.3")
    ax.text(0.0, 0.5, " 0.5", va="bottom", ha="left", fontsize=7, color="0.3")
    ax.set_ylim(-0.1, 1.05)
    ax.set_ylabel("FSC")
    ax.set_title(title)
    if pixel_size:
        nyq = 1.0 / (2 * pixel_size)
        ax.set_xlim(0, nyq)
        ax.set_xlabel("spatial frequency (1/Å)")
        sec = ax.secondary_xaxis(
            "top", functions=(lambda x: 1 / np.maximum(x, 1e-9), lambda r: 1 / np.maximum(r, 1e-9))
        )
        ticks: list[float] = []
        for r in (200, 100, 50, 30, 20, 15, 10, 8, 6, 5, 4, 3, 2.5, 2, 1.5, 1):
            f = 1.0 / r
            if nyq / 12 <= f <= nyq * 1.001 and (not ticks or f - 1.0 / ticks[-1] >= nyq / 10):
                ticks.append(r)
        sec.set_xticks(ticks)
        sec.set_xticklabels([f"{r:g}" for r in ticks])
        sec.set_xlabel("resolution (Å)")
    else:
        ax.set_xlim(0, max(box // 2, 1))
        ax.set_xlabel("Fourier shell")
    if len(fsc):
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.6, "no FSC yet (no reconstruction)", transform=ax.transAxes, ha="center")
    ax.grid(True, alpha=0.3)
    _save(fig, path, svg=True)


# --------------------------------------------------------------------------- per iteration


def _iterations(models: Sequence[dict]) -> np.ndarray:
    return np.array([int(m.get("iteration", i)) for i, m in enumerate(models)])


def _per_class(models: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, values (n_iter, K)) for a per-class list key; NaN where missing."""
    its = _iterations(models)
    k = max((len(m.get(key) or []) for m in models), default=0)
    vals = np.full((len(models), k), np.nan)
    for i, m in enumerate(models):
        v = m.get(key)
        if v:
            vals[i, : len(v)] = [np.nan if x is None else float(x) for x in v]
    return its, vals


@_styled
def plot_class_sizes(models: Sequence[dict], path: str | os.PathLike) -> None:
    """Class fractions per iteration (stacked areas; a stacked bar for a single
    iteration), from each model's ``class_fractions``. PNG + SVG."""
    its, vals = _per_class(models, "class_fractions")
    fig, ax = _figure(figsize=(6.0, 3.6))
    labels = [f"class {k + 1:03d}" for k in range(vals.shape[1])]
    v = np.nan_to_num(vals)
    if vals.shape[1] and its.size > 1:
        ax.stackplot(its, v.T, labels=labels, alpha=0.85)
        ax.set_xlim(float(its.min()), float(its.max()))
    elif vals.shape[1]:  # one iteration: a stacked bar (an area needs two points)
        bottom = np.cumsum(np.r_[0.0, v[0, :-1]])
        for k in range(v.shape[1]):
            ax.bar(its, v[:, k], bottom=bottom[k], width=0.6, label=labels[k], alpha=0.85)
    if vals.shape[1]:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_ylim(0, 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("class fraction")
    ax.set_title("Class sizes per iteration")
    _integer_xaxis(ax, its)
    _save(fig, path, svg=True)


@_styled
def plot_changed_fraction(models: Sequence[dict], path: str | os.PathLike) -> None:
    """Fraction of particles that changed class at each iteration (``changed_fraction``). PNG + SVG."""
    its = _iterations(models)
    vals = np.array(
        [
            np.nan if m.get("changed_fraction") is None else float(m["changed_fraction"])
            for m in models
        ]
    )
    fig, ax = _figure(figsize=(6.0, 3.2))
    ok = np.isfinite(vals)
    ax.plot(its[ok], vals[ok], "o-", lw=1.5, ms=4)
    ax.set_xlabel("iteration")
    ax.set_ylabel("fraction changing class")
    ax.set_ylim(0, max(0.05, float(np.nanmax(vals)) * 1.1) if ok.any() else 1)
    ax.set_title("Particles changing class")
    ax.grid(True, alpha=0.3)
    _integer_xaxis(ax, its)
    _save(fig, path, svg=True)


@_styled
def plot_resolution(models: Sequence[dict], path: str | os.PathLike) -> None:
    """Resolution (0.143) per class per iteration, and the resolution limit used. PNG + SVG."""
    its, vals = _per_class(models, "resolution_A")
    lim = np.array(
        [np.nan if m.get("res_limit_A") is None else float(m["res_limit_A"]) for m in models]
    )
    fig, ax = _figure(figsize=(6.0, 3.6))
    for k in range(vals.shape[1]):
        ok = np.isfinite(vals[:, k])
        if not ok.any():
            continue
        ax.plot(its[ok], vals[ok, k], "o-", lw=1.5, ms=4, label=f"class {k + 1:03d}")
    if np.isfinite(lim).any():
        ok = np.isfinite(lim)
        ax.plot(its[ok], lim[ok], "k--", marker="_", ms=10, lw=1, label="resolution limit")
    ax.set_xlabel("iteration")
    ax.set_ylabel("resolution (Å)")
    ax.invert_yaxis()  # better resolution (smaller number) upwards
    ax.set_title("Resolution per iteration (FSC 0.143)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    _integer_xaxis(ax, its)
    _save(fig, path, svg=True)


def _integer_xaxis(ax, its: np.ndarray) -> None:
    """Integer iteration ticks; a lone iteration gets one tick in the middle of the axis."""
    from matplotlib.ticker import MaxNLocator

    if np.unique(its).size == 1:
        ax.set_xlim(its[0] - 1, its[0] + 1)
        ax.set_xticks([int(its[0])])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# --------------------------------------------------------------------------- posteriors


@_styled
def plot_posterior_histogram(
    max_posterior: np.ndarray, path: str | os.PathLike, n_classes: int | None = None
) -> None:
    """Histogram of each particle's largest class posterior (PNG + SVG).

    ``max_posterior`` (n,) in [1/K, 1]; ``n_classes`` K marks the uniform value 1/K.
    """
    p = np.asarray(max_posterior, dtype=np.float64)
    fig, ax = _figure(figsize=(6.0, 3.6))
    lo = 1.0 / n_classes if n_classes else 0.0
    ax.hist(p, bins=np.linspace(lo, 1.0, 41), color="C0", edgecolor="white", lw=0.4)
    if n_classes:
        ax.axvline(lo, color="0.3", ls="--", lw=0.8)
    ax.set_xlim(lo - 0.01, 1.01)
    ax.set_xlabel("max class posterior")
    ax.set_ylabel("particles")
    frac = float(np.mean(p > 0.9)) if p.size else 0.0
    ax.set_title(f"Max class posterior ({p.size} particles; {100 * frac:.0f}% above 0.9)")
    ax.grid(True, alpha=0.3, axis="y")
    _save(fig, path, svg=True)


@_styled
def plot_fit_score_histogram(
    score: np.ndarray | None,
    classes: np.ndarray,
    path: str | os.PathLike,
    n_classes: int,
    threshold: float | None = None,
) -> None:
    """Histogram of the per-particle fit score (``classification.fit_score``), one step
    curve per class, with the ``junk_fit_score`` threshold when set (PNG + SVG).

    ``score`` (n,) (None or all NaN: an empty figure that says so); ``classes`` (n,)
    0-based hard class. A particle its class explains scores ~N(0, 1); junk scores
    negative."""
    fig, ax = _figure(figsize=(6.0, 3.6))
    z = np.asarray(score, dtype=np.float64) if score is not None else np.zeros(0)
    ok = np.isfinite(z)
    if ok.any():
        lo = min(float(np.percentile(z[ok], 0.5)), -5.0, threshold if threshold is not None else 0)
        hi = max(float(np.percentile(z[ok], 99.5)), 4.0)
        bins = np.linspace(lo, hi, 61)
        for k in range(n_classes):
            sel = ok & (np.asarray(classes) == k)
            if sel.any():
                ax.hist(np.clip(z[sel], lo, hi), bins=bins, histtype="step", lw=1.2,
                        color=f"C{k % 10}", label=f"class {k + 1:03d} ({int(sel.sum())})")  # fmt: skip
        if threshold is not None:
            n_flag = int((z[ok] < threshold).sum())
            ax.axvline(threshold, color="0.2", ls="--", lw=0.9,
                       label=f"junk_fit_score {threshold:g} ({n_flag} flagged)")  # fmt: skip
        ax.legend(fontsize=7, frameon=False)
        title = f"Fit score ({int(ok.sum())} particles; a good particle ~N(0, 1))"
    else:
        title = "Fit score (not in these assignments)"
    ax.set_xlabel("fit score (standardised log-likelihood gain, centred per class)")
    ax.set_ylabel("particles")
    ax.set_title(title)
    ax.grid(True, alpha=0.3, axis="y")
    _save(fig, path, svg=True)


# --------------------------------------------------------------------------- maps


def _central_slices(vol: np.ndarray, gap: int) -> np.ndarray:
    """xy | xz | yz central slices of a (z, y, x) cube side by side, scaled to [0, 1]; gaps NaN."""
    d = vol.shape[0]
    c = d // 2
    sl = [vol[c, :, :], vol[:, c, :], vol[:, :, c]]
    lo, hi = np.percentile(np.concatenate([s.ravel() for s in sl]), [0.5, 99.5])
    scale = hi - lo if hi > lo else 1.0
    pad = np.full((d, gap), np.nan)
    parts: list[np.ndarray] = []
    for i, s in enumerate(sl):
        if i:
            parts.append(pad)
        parts.append(np.clip((s - lo) / scale, 0, 1))
    return np.concatenate(parts, axis=1)


@_styled
def plot_central_slices(
    maps_per_iter: Sequence[np.ndarray],
    path: str | os.PathLike,
    iterations: Sequence[int] | None = None,
    max_rows: int | None = None,
) -> None:
    """Grid of central slices: rows = iterations, columns = classes (PNG + SVG).

    ``maps_per_iter``: one (K, D, D, D) array of (z, y, x) maps per iteration.
    Each cell shows the xy, xz and yz central slices of one map, scaled by
    that map's 0.5-99.5 percentiles. Every iteration gets a row; with
    ``max_rows`` set and more iterations than that, ``max_rows`` evenly spaced
    ones are shown (first and last always).
    """
    n_it = len(maps_per_iter)
    if iterations is None:
        iterations = list(range(n_it))
    rows = (
        np.unique(np.round(np.linspace(0, n_it - 1, min(n_it, max_rows or n_it))).astype(int))
        if n_it
        else []
    )
    k = max((np.shape(m)[0] for m in maps_per_iter), default=1)
    d = max((np.shape(m)[-1] for m in maps_per_iter), default=1)
    gap = max(1, d // 16)
    cell_w = 3 * d + 2 * gap
    fig, axes = _figure(
        len(rows) or 1,
        k,
        figsize=(1.9 * k + 0.6, 0.8 * len(rows) + 0.6 if len(rows) else 1.5),
        squeeze=False,
    )
    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    for r, it_i in enumerate(rows):
        maps = np.asarray(maps_per_iter[it_i])
        for c in range(k):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < maps.shape[0]:
                ax.imshow(
                    _central_slices(maps[c], gap),
                    cmap=cmap,
                    vmin=0,
                    vmax=1,
                    interpolation="nearest",
                    origin="lower",
                    extent=(0, cell_w, 0, d),
                )
            if r == 0:
                ax.set_title(f"class {c + 1:03d}\nxy  xz  yz", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"iter {int(iterations[it_i])}", fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.08)
    _save(fig, path, svg=True)


# --------------------------------------------------------------------------- all


def make_all_plots(
    models: Sequence[dict],
    maps_per_iter: Sequence[np.ndarray],
    assign: dict,
    out_dir: str | os.PathLike,
    pixel_size: float | None = None,
    config: dict | None = None,
) -> list[Path]:
    """Every run-level figure into ``out_dir`` (PNG + SVG each); returns the paths written.

    ``models``: model.json dicts in iteration order; ``maps_per_iter``: (K, D,
    D, D) maps per iteration (same order); ``assign``: arrays from
    :func:`hetrefine.io.run_files.assemble_assignments` of the last iteration.
    ``pixel_size`` (Angstrom) for the FSC axes (else the last model's
    ``pixel_size`` key; else FSC is drawn against the shell index).

    Files (the names the workflow's ``plots`` rule expects): ``class_sizes``,
    ``changed_fraction``, ``resolution``, ``posterior_hist``, ``fit_score_hist``, ``slices``,
    ``fsc_class_XXX`` and ``orientations_class_XXX`` per class, plus
    ``fsc_all`` (every class in one plot); each as ``.png`` and ``.svg``; and
    ``summary.html``, the report's first page (:func:`write_summary`; with the
    run's ``config`` when given). Every file is written even when its data is missing (e.g. only iteration
    0, which has no FSC), so the set of outputs does not depend on the run.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def both(stem: str) -> None:
        paths.extend([out / f"{stem}.png", out / f"{stem}.svg"])

    post = np.asarray(assign["posterior"])
    n_classes = post.shape[1]
    last = models[-1] if models else {}
    px = pixel_size if pixel_size is not None else last.get("pixel_size")
    box = (
        int(np.shape(maps_per_iter[-1])[-1])
        if maps_per_iter
        else 2 * (len((last.get("fsc") or [[0]])[0]) - 1)
    )
    fsc = [np.asarray(f, dtype=np.float64) for f in (last.get("fsc") or [])]
    if fsc and len(fsc) != n_classes:
        raise ValueError(
            f"last model has {len(fsc)} FSC curves, assignments have {n_classes} classes"
        )
    plot_fsc(fsc, box, px, out / "fsc_all.png")
    both("fsc_all")
    for k in range(n_classes):
        stem = f"fsc_class_{k + 1:03d}"
        plot_fsc(
            fsc[k : k + 1],
            box,
            px,
            out / f"{stem}.png",
            title=f"FSC class {k + 1:03d}",
            classes=[k + 1] if fsc else [],
        )
        both(stem)
    for name, fn in (
        ("class_sizes", plot_class_sizes),
        ("changed_fraction", plot_changed_fraction),
        ("resolution", plot_resolution),
    ):
        fn(models, out / f"{name}.png")
        both(name)
    plot_posterior_histogram(post.max(axis=1), out / "posterior_hist.png", n_classes=n_classes)
    both("posterior_hist")
    junk = (config or {}).get("junk_fit_score")
    plot_fit_score_histogram(
        assign.get("fit_score"), hard_classes(post), out / "fit_score_hist.png", n_classes,
        None if junk is None else float(junk),
    )  # fmt: skip
    both("fit_score_hist")
    its = [int(m.get("iteration", i)) for i, m in enumerate(models)]
    if len(its) != len(maps_per_iter):
        its = list(range(len(maps_per_iter)))
    plot_central_slices(maps_per_iter, out / "slices.png", iterations=its)
    both("slices")
    cls = hard_classes(assign["posterior"])
    euler = np.asarray(assign["euler"])[np.arange(cls.size), cls]
    for k in range(n_classes):
        stem = f"orientations_class_{k + 1:03d}"
        sel = cls == k
        plot_orientation_distribution(
            euler[sel], out / f"{stem}.png", title=f"class {k + 1:03d}: {int(sel.sum())} particles"
        )
        both(stem)
    if models:
        summary = out / "summary.html"
        write_summary(summary, last, out.parent.as_posix(), out, config)
        paths.append(summary)
    return paths
