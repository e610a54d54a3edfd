"""The HTML report opens on the answer: the summary page, checked in headless Chromium.

Snakemake 9's report shows, on its landing view, the workflow description (the
global ``report:`` file, here workflow/report/workflow.rst) beside the rule
graph. The description embeds the run's summary.html (written by
``plots.make_all_plots``); its CSS widens that column and moves the graph below,
so the first screen holds the class table.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hetrefine import plots, report

ROOT = Path(__file__).resolve().parents[1]
K = 3
HEADER_RGB = np.array([0x1F, 0x4E, 0x79]) / 255  # the class table's header colour


def last_model(n_it: int = 9) -> dict:
    return {
        "iteration": n_it - 1,
        "n_classes": K,
        "class_sizes_hard": [512, 300, 188],
        "class_fractions": [0.51, 0.30, 0.19],
        "resolution_A": [7.25, 9.5, float("inf")],
        "pixel_size": 2.0,
    }


def models(n_it: int = 9) -> list[dict]:
    out = []
    for i in range(n_it):
        m = {
            "iteration": i,
            "class_fractions": [0.5, 0.3, 0.2],
            "resolution_A": [30.0 - i, 31.0 - i, 32.0 - i],
        }
        if i:
            m["changed_fraction"] = 0.3 / i
            m["fsc"] = [list(np.linspace(1, 0, 9)) for _ in range(K)]
        out.append(m)
    out[-1].update(last_model(n_it))
    return out


def maps(n_it: int = 9) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(K, 16, 16, 16)).astype(np.float32) for _ in range(n_it)]


def assign(n: int = 1000) -> dict:
    rng = np.random.default_rng(1)
    return {
        "posterior": rng.dirichlet(np.ones(K), size=n).astype(np.float32),
        "euler": rng.uniform(0, 180, size=(n, K, 3)).astype(np.float32),
    }


# --------------------------------------------------------------- the summary


def test_class_table_from_the_last_model():
    rows = report.class_table(last_model(), "results/demo")
    assert [r["particles"] for r in rows] == [512, 300, 188]
    assert [r["share"] for r in rows] == [0.51, 0.30, 0.19]
    assert rows[0]["resolution_A"] == 7.25 and rows[2]["resolution_A"] is None  # inf: not measured
    assert rows[1]["map"] == "results/demo/class_002/map.mrc"
    assert rows[1]["particles_file"] == "results/demo/class_002/particles.star"


def test_summary_page_has_table_figures_command_and_config(tmp_path):
    out = tmp_path / "results" / "demo" / "plots"
    config = {"run": "demo", "iterations": 8, "symmetry": "C1"}
    plots.make_all_plots(models(), maps(), assign(), out, pixel_size=2.0, config=config)
    html = (out / "summary.html").read_text()
    cells = re.findall(r"<td[^>]*>(.*?)</td>", html)
    assert cells[:6] == [
        "001",
        "512",
        "51.0%",
        "7.2",
        f"{out.parent.as_posix()}/class_001/map.mrc",
        f"{out.parent.as_posix()}/class_001/particles.star",
    ]
    assert cells[12:16] == ["003", "188", "19.0%", "-"]
    for stem, _ in report.SUMMARY_FIGURES:  # embedded, so the page stands alone
        png = (out / f"{stem}.png").read_bytes()
        assert base64.b64encode(png).decode() in html, stem
    assert "snakemake --cores all" in html
    assert "symmetry: C1" in html and "iterations: 8" in html
    again = tmp_path / "again"
    plots.make_all_plots(models(), maps(), assign(), again, pixel_size=2.0, config=config)
    assert (again / "summary.html").read_bytes().replace(
        again.parent.as_posix().encode(), b""
    ) == html.encode().replace(out.parent.as_posix().encode(), b"")


def test_slices_grid_keeps_every_iteration(monkeypatch, tmp_path):
    """Twelve iterations give twelve rows (the grid used to drop all but eight)."""
    seen = {}

    def keep(fig, path, svg=False):
        seen["labels"] = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_central_slices(maps(12), tmp_path / "s.png", iterations=range(12))
    assert seen["labels"] == [f"iter {i}" for i in range(12)]


# ------------------------------------------------------- the report, in Chromium

SNAKEFILE = """
report: {rst!r}


rule summary:
    output:
        report("results/demo/plots/summary.html", category="Summary"),
    shell:
        "cp {summary} {{output}}"
"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def browse(html: Path, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``html`` (runs as root in CI: no sandbox, a fresh profile)."""
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1280,900",
            "--virtual-time-budget=5000",
            *mode,
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def report_of(tmp_path: Path, summary: Path | None) -> Path:
    """A report of a one-rule workflow with this project's landing page (workflow.rst)."""
    wd = tmp_path / ("with" if summary else "without")
    wd.mkdir()
    rst = str(ROOT / "workflow" / "report" / "workflow.rst")
    if summary is None:  # a report without the summary item
        text = f"report: {rst!r}\n\nrule other:\n    output:\n        report('x.txt')\n"
        text += "    shell:\n        'echo x > {output}'\n"
    else:
        text = SNAKEFILE.format(rst=rst, summary=summary)
    (wd / "Snakefile").write_text(text)
    for args in (["--cores", "1"], ["--report", "report.html"]):
        run = subprocess.run(
            [sys.executable, "-m", "snakemake", *args],
            cwd=wd,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return wd / "report.html"


def header_rows(png: Path) -> np.ndarray:
    """Rows of the screenshot where the class table's header colour fills a stretch."""
    import matplotlib.image

    img = matplotlib.image.imread(png)[..., :3]
    match = np.all(np.abs(img - HEADER_RGB) < 0.02, axis=-1)
    return np.flatnonzero(match.sum(axis=1) > 200)


@pytest.mark.slow
def test_report_first_screen_is_the_class_table(tmp_path):
    if chromium() is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium; .ci/run installs it)")
    out = tmp_path / "run" / "plots"
    config = {"run": "demo", "iterations": 8}
    plots.make_all_plots(models(), maps(), assign(), out, pixel_size=2.0, config=config)

    report = report_of(tmp_path, out / "summary.html")
    dom = browse(report, tmp_path / "profile1", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # What the page shows first (React's landing view), not only what the file holds.
    assert 'class="hetrefine-summary"' in dom.stdout
    table = re.search(r'<table class="classes">.*?</table>', dom.stdout, re.S).group(0)
    assert len(re.findall(r"<tr>", table)) == K + 1
    assert "<td>512</td>" in table and "<td>51.0%</td>" in table
    assert dom.stdout.index("hetrefine-summary") < dom.stdout.index('id="rulegraph"')

    shot = tmp_path / "first.png"
    done = browse(report, tmp_path / "profile2", f"--screenshot={shot}")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    rows = header_rows(shot)
    assert rows.size and rows.min() < 300, "the class table is not on the first screen"

    # Without the summary, the same landing page shows no class table (the check can fail).
    plain = report_of(tmp_path, None)
    shot2 = tmp_path / "plain.png"
    browse(plain, tmp_path / "profile3", f"--screenshot={shot2}")
    assert header_rows(shot2).size == 0
