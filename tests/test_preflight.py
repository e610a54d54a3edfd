"""The pre-flight check: input validation, job counts, memory and time estimates.

The accuracy test runs a real align job (scripts/align.py in a subprocess) on a
small simulated set and compares its peak RSS and wall time with the estimates;
bench/preflight_accuracy.py does the same at 10,000 particles.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import yaml

from hetrefine import plan, preflight
from hetrefine.config import validate_config
from hetrefine.io.mrc import read_volume
from hetrefine.plan import align_memory_bytes, fitting_shard_size
from hetrefine.preflight import main, run_preflight
from hetrefine.schedule import resolution_limit_px
from hetrefine.steps import settings_for
from hetrefine.steps.init_references import init_references
from hetrefine.steps.mask import make_mask
from hetrefine.steps.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """400 simulated particles, box 48, 4 A/px, two classes with their initial models."""
    from hetrefine.simulate import SimulationSpec, simulate_dataset

    out = tmp_path_factory.mktemp("pf") / "data"
    simulate_dataset(SimulationSpec(n_particles=400, n_classes=2, box=48, seed=3), out)
    return out


def conf(data: Path, **over) -> dict:
    c = {
        "run": "pf",
        "particles": str(data / "particles.star"),
        "initial_models": [str(data / "initial_model_01.mrc"), str(data / "initial_model_02.mrc")],
        "shard_size": 150,
        "device": "cpu",
    }
    c.update(over)
    return c


def test_counts_and_estimates_without_measuring(data):
    rep = run_preflight(conf(data), measure=False)
    assert rep.ok, rep.errors
    f = rep.facts
    assert (f["n_particles"], f["n_shards"], f["shard_size"], f["k"]) == (400, 3, 150, 2)
    assert f["jobs_per_iteration"] == 4
    assert f["align_mem_bytes"] > plan.BASELINE_BYTES
    text = str(rep)
    assert "400 in" in text and "3 shard(s)" in text and "pre-flight: OK" in text
    # a bigger shard or box or more classes never needs less memory
    base = align_memory_bytes(150, 48, 2, 29, 4392)
    assert align_memory_bytes(300, 48, 2, 29, 4392) > base
    assert align_memory_bytes(150, 96, 2, 29, 4392) > base
    assert align_memory_bytes(150, 48, 4, 29, 4392) > base


def test_bad_config_is_an_error_not_an_exception(data):
    rep = run_preflight(conf(data, iteratons=3), measure=False)
    assert not rep.ok and "unknown key 'iteratons'" in rep.errors[0]
    assert "did you mean 'iterations'" in rep.errors[0]
    assert "FAILED" in str(rep)


def test_missing_particles_and_model_named(data, tmp_path):
    rep = run_preflight(conf(data, particles=str(tmp_path / "nope.star")), measure=False)
    assert not rep.ok and "nope.star" in rep.errors[0]
    models = [str(data / "initial_model_01.mrc"), str(tmp_path / "gone.mrc")]
    rep = run_preflight(conf(data, initial_models=models), measure=False)
    assert not rep.ok and any("gone.mrc" in e for e in rep.errors)


def test_wrong_header_pixel_size_and_identical_models_warned(data, tmp_path):
    vol, _ = read_volume(data / "initial_model_01.mrc")
    wrong = tmp_path / "wrong_px.mrc"
    with mrcfile.new(wrong) as m:
        m.set_data(vol)
        m.voxel_size = 1.0  # the map's real pixel is 4 A (like tomodrgn's 10076_classD_32.mrc)
    rep = run_preflight(
        conf(data, initial_models=[str(wrong), str(data / "initial_model_02.mrc")]), measure=False
    )
    assert rep.ok
    assert any("is the header pixel size right" in w and "wrong_px.mrc" in w for w in rep.warnings)
    same = [str(data / "initial_model_01.mrc")] * 2
    rep = run_preflight(conf(data, initial_models=same), measure=False)
    assert any("nearly identical" in w for w in rep.warnings)
    rep = run_preflight(conf(data), measure=False)
    assert not rep.warnings, rep.warnings


def test_mixed_pixel_sizes_refine_on_the_coarsest_groups_grid(data, tmp_path):
    import starfile

    blocks = starfile.read(data / "particles.star", always_dict=True)
    optics, parts = blocks["optics"], blocks["particles"]
    two = optics.copy()
    two.loc[1] = two.loc[0]
    two.loc[1, "rlnOpticsGroup"] = 2
    two.loc[1, "rlnImagePixelSize"] = 5.0
    parts = parts.copy()
    parts.loc[parts.index[200:], "rlnOpticsGroup"] = 2
    parts["rlnImageName"] = [
        f"{n.split('@')[0]}@{data / 'particles.mrcs'}" for n in parts["rlnImageName"]
    ]
    star = tmp_path / "mixed.star"
    starfile.write({"optics": two, "particles": parts}, star)
    rep = run_preflight(conf(data, particles=str(star)), measure=False)
    assert rep.ok, rep.errors
    assert any("refinement box" in i and "at 5 A/px" in i for i in rep.lines), rep.lines


def test_memory_warning_when_a_job_does_not_fit(data, monkeypatch):
    """At box 48 the grids dominate: no shard size helps, so the warning says refine_box."""
    need = align_memory_bytes(150, 48, 2, 29, 4392)
    monkeypatch.setattr(preflight, "available_memory_bytes", lambda: need - 10 * 2**20)
    rep = run_preflight(conf(data), measure=False)
    (warning,) = [w for w in rep.warnings if "align job needs" in w]
    assert "refine_box" in warning
    monkeypatch.setattr(preflight, "available_memory_bytes", lambda: 2 * need)
    assert not run_preflight(conf(data), measure=False).warnings


def test_fitting_shard_size_is_the_largest_that_fits():
    """At box 256 the images matter: the suggested shard size is the largest under the limit."""
    fixed = align_memory_bytes(0, 256, 4, 29, 4392)
    for extra_mb in (2, 300, 5000):
        limit = fixed + extra_mb * 2**20
        fit = fitting_shard_size(limit, 256, 4, 29, 4392)
        assert fit >= 1
        assert align_memory_bytes(fit, 256, 4, 29, 4392) <= limit
        assert align_memory_bytes(fit + 1, 256, 4, 29, 4392) > limit
    assert fitting_shard_size(fixed - 1, 256, 4, 29, 4392) == 0


def test_total_jobs_match_snakemake_dry_run(tmp_path):
    """The job count the check prints is the one Snakemake plans (demo, not yet simulated)."""
    for name in ("Snakefile", "config.yaml", "workflow", "envs", "scripts"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / name)
    p = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--config", "shard_size=300", "iterations=3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    total = int(re.search(r"^total\s+(\d+)", p.stdout, re.M).group(1))
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config.update(shard_size=300, iterations=3)
    rep = run_preflight(config, tmp_path, measure=False)
    assert rep.ok, rep.errors
    assert rep.facts["total_jobs"] == total
    assert rep.facts["n_shards"] == 4  # 1000 demo particles / 300


def test_command_line(data, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(conf(data)))
    out = tmp_path / "report.txt"
    assert main(["--config", str(cfg), "--no-measure", "--out", str(out)]) == 0
    assert "pre-flight: OK" in capsys.readouterr().out and "pre-flight: OK" in out.read_text()
    assert main(["--config", str(cfg), "--no-measure", "--set", "shard_size=0"]) == 1
    assert "shard_size" in capsys.readouterr().out


def _real_align(data: Path, tmp: Path, config: dict, threads: int) -> tuple[float, int]:
    """Preprocess, mask and init with the workflow's steps, then time scripts/align.py on
    shard 0 at the highest resolution (a late iteration); (wall s, peak RSS bytes)."""
    config = validate_config(config)
    pre = tmp / "preprocess"
    pre.mkdir(parents=True)
    preprocess(
        config["particles"], str(pre / "info.json"), str(pre / "metadata.npz"), str(pre / "sample.npz"),
        [str(pre / f"shard_{s:04d}.npz") for s in range(3)], settings_for("preprocess", config),
    )  # fmt: skip
    make_mask(
        str(pre / "info.json"), str(tmp / "mask.mrc"), str(tmp / "mask_focus.mrc"),
        [], settings_for("mask", config),
    )  # fmt: skip
    init_references(
        config["initial_models"],
        str(pre / "info.json"),
        str(pre / "shard_0000.npz"),
        str(tmp / "mask.mrc"),
        str(tmp / "refs.npz"),
        str(tmp / "model.json"),
        settings_for("init_references", config),
    )
    model = json.loads((tmp / "model.json").read_text())
    model["res_limit_px"] = resolution_limit_px(24, 48, 4.0, config["max_resolution_A"])
    (tmp / "model.json").write_text(json.dumps(model))
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(dict(config, online_em_iterations=0)))
    args = [
        str(ROOT / "scripts" / "align.py"),
        "--chunks",
        str(pre / "shard_0000.npz"),
        "--refs",
        str(tmp / "refs.npz"),
        "--model",
        str(tmp / "model.json"),
        "--mask",
        str(tmp / "mask.mrc"),
        "--focus-mask",
        str(tmp / "mask_focus.mrc"),
        "--iteration",
        str(config["iterations"]),
        "--out-assign",
        str(tmp / "a.npz"),
        "--out-sums",
        str(tmp / "s.npz"),
        "--config",
        str(cfg),
        "--threads",
        str(threads),
        "--log",
        str(tmp / "align.log"),
    ]
    walls = []
    for _ in range(2):  # the faster of two, as the pre-flight sample does
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True)
        walls.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return min(walls), rss


@pytest.mark.slow
def test_estimates_within_factor_2_of_a_real_align_job(data, tmp_path):
    import os

    cores = os.cpu_count() or 1
    c = conf(data)
    rep = run_preflight(c, cores=cores, sample=32)
    assert rep.ok, rep.errors
    # measured in a fresh process so RUSAGE_CHILDREN sees only the align jobs
    here, cfg_json, threads = str(Path(__file__).parent), json.dumps(c), min(4, cores)
    code = (
        f"import json, sys; from pathlib import Path; sys.path.insert(0, {here!r}); "
        "import test_preflight as t; "
        f"w, r = t._real_align(Path({str(data)!r}), Path({str(tmp_path)!r}), "
        f"json.loads({cfg_json!r}), {threads}); print(json.dumps([w, r]))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    wall, rss = json.loads(p.stdout.strip().splitlines()[-1])
    est_mem, est_time = rep.facts["align_mem_bytes"], rep.facts["align_job_s"]
    msg = f"estimate {est_mem / 2**20:.0f} MB / {est_time:.1f} s, measured {rss / 2**20:.0f} MB / {wall:.1f} s"
    assert 0.5 < est_mem / rss < 2.0, msg
    assert 0.5 < est_time / wall < 2.0, msg
    assert np.isfinite(rep.facts["iteration_s"]) and rep.facts["iteration_s"] >= est_time


def test_every_image_is_read_and_blank_ones_counted_as_preprocess_does(data, tmp_path):
    """The pre-flight reads all 400 images (not a sample): two all-zero images in the middle
    of the stack are refused with preprocess's own message (issue 13, item 10)."""
    from hetrefine.errors import InputError

    rep = run_preflight(conf(data), measure=False)
    assert rep.ok and "particle images: all 400 read in" in str(rep), str(rep)
    shutil.copy(data / "particles.star", tmp_path / "particles.star")
    with mrcfile.open(data / "particles.mrcs", permissive=True) as src:
        stack = np.array(src.data)
    stack[[150, 220]] = 0.0
    with mrcfile.new(tmp_path / "particles.mrcs") as out:
        out.set_data(stack)
        out.set_image_stack()
        out.voxel_size = 4.0
    pre = tmp_path / "pre"
    with pytest.raises(InputError) as exc:
        preprocess(
            str(tmp_path / "particles.star"), str(pre / "info.json"), str(pre / "metadata.npz"),
            str(pre / "sample.npz"), [str(pre / f"shard_{s:04d}.npz") for s in range(3)],
            settings_for("preprocess", validate_config(conf(data))),
        )  # fmt: skip
    msg = str(exc.value)
    assert (
        "2 of 400 particle images are constant: row 151 (image 151 of particles.mrcs)"
        in msg.replace(" (every pixel equal, e.g. all zero)", "")
    ), msg
    errors = run_preflight(
        conf(data, particles=str(tmp_path / "particles.star")), measure=False
    ).errors
    assert f"particles: {msg}" in errors, errors
