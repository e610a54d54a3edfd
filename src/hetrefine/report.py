"""The run's summary page: what the HTML report opens on (a table per class, the
central slices, the convergence plots, the command and the config used)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hetrefine.convergence import stop_summary
from hetrefine.io.atomic import atomic_path

#: The figures the summary page shows, in order, with their captions.
SUMMARY_FIGURES = (
    ("slices", "Central slices (xy, xz, yz) of every class map, one row per iteration."),
    ("class_sizes", "Share of the particles in each class, per iteration."),
    ("resolution", "Resolution (FSC 0.143 between half-maps) of each class, per iteration."),
    ("changed_fraction", "Fraction of particles that changed class since the iteration before."),
)

#: The report's landing view puts the workflow description in a narrow column
#: beside the rule graph; when that description is this summary, widen it and
#: put the graph below, so the first screen is the answer.
_SUMMARY_CSS = """
div.overflow-auto.h-screen:has(.hetrefine-summary) { align-items: flex-start; justify-content: flex-start; }
div.gap-3:has(.hetrefine-summary) { flex-direction: column; }
div.max-w-lg:has(.hetrefine-summary) { max-width: none; }
.hetrefine-summary table.classes { border-collapse: collapse; margin: 0.5em 0 1em 0; }
.hetrefine-summary table.classes th { background: #1f4e79; color: #ffffff; }
.hetrefine-summary table.classes th, .hetrefine-summary table.classes td {
  padding: 0.25em 0.8em; border: 1px solid #c8d3de; text-align: right; }
.hetrefine-summary table.classes td.path { text-align: left; font-family: monospace; }
.hetrefine-summary figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
.hetrefine-summary figure img { max-height: 320px; width: auto; }
.hetrefine-summary figcaption { font-size: 0.85em; max-width: 28em; }
.hetrefine-summary pre { font-size: 0.8em; background: #f4f4f4; padding: 0.5em; }
"""


def class_table(model: dict, run_dir: str) -> list[dict]:
    """One row per class from the last iteration's ``model.json`` dict.

    Keys: ``class`` (1-based), ``particles`` (hard-assigned count), ``share``
    (soft class fraction, 0..1), ``resolution_A`` (FSC 0.143; None where not
    measured), ``map`` and ``particles_file`` (paths under ``run_dir``, the
    layout the workflow writes).
    """
    sizes = list(model.get("class_sizes_hard") or [])
    shares = list(model.get("class_fractions") or [])
    res = list(model.get("resolution_A") or [])
    n = int(model.get("n_classes") or len(sizes))
    rows = []
    for k in range(n):
        folder = f"{run_dir}/class_{k + 1:03d}"
        r = res[k] if k < len(res) else None
        rows.append(
            {
                "class": k + 1,
                "particles": int(sizes[k]) if k < len(sizes) else None,
                "share": float(shares[k]) if k < len(shares) else None,
                "resolution_A": float(r) if r is not None and np.isfinite(r) else None,
                "map": f"{folder}/map.mrc",
                "particles_file": f"{folder}/particles.star",
            }
        )
    return rows


def summary_html(
    model: dict,
    run_dir: str,
    figures: Sequence[tuple[str, str, bytes]],
    command: str,
    config_text: str,
) -> str:
    """The report's first page as an HTML fragment: the answer first.

    A table per class (particles, share, resolution, map and particle file),
    then ``figures`` (title, caption, PNG bytes; embedded, so the page stands
    alone), then the command and the config (YAML text) the run used. The
    fragment is what ``workflow/report/workflow.rst`` shows on the landing page
    of ``snakemake --report``; its CSS only applies where it is shown.
    """
    import base64
    from html import escape

    rows = class_table(model, run_dir)
    n = sum(r["particles"] or 0 for r in rows)
    out = [f"<style>{_SUMMARY_CSS}</style>", '<div class="hetrefine-summary">']
    out.append(
        f"<h2>{len(rows)} classes from {n} particles"
        f" ({escape(run_dir)}, iteration {model.get('iteration', '?')})</h2>"
    )
    out.append(f'<p class="stop">{escape(stop_summary(model))}.</p>')
    out.append('<table class="classes"><thead><tr>')
    for head in ("Class", "Particles", "Share", "Resolution (&#8491;)", "Map", "Particles file"):
        out.append(f"<th>{head}</th>")
    out.append("</tr></thead><tbody>")
    for r in rows:
        share = f"{100 * r['share']:.1f}%" if r["share"] is not None else "-"
        res = f"{r['resolution_A']:.1f}" if r["resolution_A"] is not None else "-"
        parts = "-" if r["particles"] is None else f"{r['particles']:,}"
        out.append(
            f"<tr><td>{r['class']:03d}</td><td>{parts}</td><td>{share}</td><td>{res}</td>"
            f'<td class="path">{escape(r["map"])}</td>'
            f'<td class="path">{escape(r["particles_file"])}</td></tr>'
        )
    out.append("</tbody></table>")
    for title, caption, png in figures:
        data = base64.b64encode(png).decode("ascii")
        out.append(
            f'<figure><img alt="{escape(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{escape(title)}.</b> {escape(caption)}</figcaption></figure>"
        )
    out.append(f"<h3>Command</h3><pre>{escape(command)}</pre>")
    out.append(f"<h3>Config</h3><pre>{escape(config_text)}</pre>")
    out.append("</div>")
    return "\n".join(out) + "\n"


def write_summary(
    path: str | os.PathLike,
    model: dict,
    run_dir: str,
    plot_dir: str | os.PathLike,
    config: dict | None = None,
    command: str | None = None,
) -> None:
    """Write :func:`summary_html` for a run to ``path`` (atomic, byte-stable).

    ``model``: the last iteration's model.json dict; ``plot_dir``: where
    :func:`make_all_plots` wrote the PNGs (the ``SUMMARY_FIGURES`` are
    embedded); ``config``: the run's config dict (written as YAML, keys
    sorted; None: not known); ``command``: how the run is reproduced
    (default: Snakemake with that config saved to a file).
    """
    import yaml

    figures = []
    for stem, caption in SUMMARY_FIGURES:
        png = Path(plot_dir) / f"{stem}.png"
        figures.append((stem.replace("_", " ").capitalize(), caption, png.read_bytes()))
    if command is None:
        command = "snakemake --cores all --configfile config_used.yaml  # the config below, saved"
    config_text = yaml.safe_dump(config, sort_keys=True) if config is not None else "(not recorded)"
    text = summary_html(model, run_dir, figures, command, config_text)
    with atomic_path(Path(path), suffix=".html") as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
