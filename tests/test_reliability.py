"""Reliability: bad or odd input is refused clearly (or handled and said), inputs are
never modified, a full disk leaves no half-written output, and results are
deterministic. Each test here is a row of the table in ``docs/reliability.md``.

The step functions run on a tiny simulated data set (120 particles, box 24) in
``tmp_path``, called in the order the workflow calls them.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from hetrefine.config import dataset_size, defaults, validate_config
from hetrefine.errors import InputError
from hetrefine.io.mrc import read_volume, write_mrc
from hetrefine.io.particles import read_particles
from hetrefine.io.run_files import RunLayout
from hetrefine.io.stacks import read_images
from hetrefine.io.star import read_star_blocks, write_particles_star
from hetrefine.simulate import SimulationSpec, simulate_dataset
from hetrefine.steps import settings_for
from hetrefine.steps.align import align_shard
from hetrefine.steps.hard_sums import hard_sums
from hetrefine.steps.init_references import init_references
from hetrefine.steps.mask import make_mask
from hetrefine.steps.preprocess import preprocess
from hetrefine.steps.reconstruct import reconstruct
from hetrefine.steps.write_classes import write_classes
from hetrefine.symmetry import symmetry_matrices

N_PARTICLES, BOX, PIXEL = 120, 24, 4.0
CTF_COLS = [
    "rlnImageName",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
]


# ---------------------------------------------------------------------------- helpers


def base_config(**over) -> dict:
    """A validated config for the tiny set: 2 iterations, first one online EM."""
    cfg = defaults()
    cfg.update(iterations=2, shard_size=60, online_em_iterations=1)
    cfg.update(over)
    return cfg


def run_steps(
    particles: Path,
    models: list[Path],
    run: Path,
    config: dict,
    iter0: Path | None = None,
) -> Path:
    """Every step function in workflow order; returns the final output folder.

    ``iter0``: copy this iteration-0 folder (references + model) instead of
    running ``init_references`` (to compare shard counts from the same start).
    """
    n_shards = -(-N_PARTICLES // int(config["shard_size"]))
    L = RunLayout(str(run))
    shards = [L.chunk(s) for s in range(n_shards)]  # shard_size <= 500: a shard is one chunk
    preprocess(
        str(particles), L.info, L.metadata, L.sample, shards, settings_for("preprocess", config)
    )
    make_mask(L.info, L.mask, L.focus_mask, [str(m) for m in models], settings_for("mask", config))
    if iter0 is None:
        init_references(
            [str(m) for m in models], L.info, L.sample, L.mask, L.references(0), L.model(0),
            settings_for("init_references", config),
        )  # fmt: skip
    else:
        shutil.copytree(iter0, run / "iter_000")
    prev: list[str] = []
    for it in range(1, int(config["iterations"]) + 1):
        assign = [L.assignments(it, s) for s in range(n_shards)]
        sums = [L.sums(it, s) for s in range(n_shards)]
        for shard, a, s in zip(shards, assign, sums, strict=True):
            align_shard(
                shard, L.references(it - 1), L.model(it - 1), L.mask, L.focus_mask, it, a, s,
                settings_for("align", config),
                "cpu",
            )  # fmt: skip
        reconstruct(
            assign, sums, L.model(it - 1), L.references(it - 1), prev, L.mask, it, L.references(it), L.model(it),
            settings_for("reconstruct", config),
        )  # fmt: skip
        prev = assign
    hard = [L.hard_sums(s) for s in range(n_shards)]
    for shard, a, h in zip(shards, prev, hard, strict=True):
        hard_sums(
            [shard],
            a,
            L.model(int(config["iterations"])),
            h,
            settings_for("hard_sums", config),
            "cpu",
        )
    last = int(config["iterations"])
    out = run / "out"
    write_classes(
        L.metadata, L.info, prev, hard, L.references(last), L.model(last), L.mask, str(out),
        settings_for("write_classes", config),
    )  # fmt: skip
    return out


def prep(particles, out_dir, n_shards: int, config: dict) -> None:
    """The preprocess step into ``out_dir`` (its files named as in a run's preprocess/)."""
    pre = Path(out_dir)
    preprocess(
        str(particles), str(pre / "info.json"), str(pre / "metadata.npz"), str(pre / "sample.npz"),
        [str(pre / f"shard_{s:04d}.npz") for s in range(n_shards)], settings_for("preprocess", config),
    )  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def star30(path: Path, names: list[str], extra: str = "") -> Path:
    """A RELION 3.0 single-table STAR with full CTF columns and a pixel size."""
    cols = CTF_COLS + ["rlnImagePixelSize"]
    lines = ["data_", "loop_"] + [f"_{c}" for c in cols]
    lines += [f"{n} 10000 9500 10 300 2.7 0.1 2.0" for n in names]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def stack(path: Path, n: int = 4, box: int = 16, dtype=np.float32, pixel: float = 2.0):
    imgs = np.random.default_rng(0).normal(size=(n, box, box)) * 20
    if np.dtype(dtype).kind in "iu":
        imgs = np.clip(np.round(imgs + 50), np.iinfo(dtype).min, np.iinfo(dtype).max)
    imgs = imgs.astype(dtype)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(imgs)
        m.set_image_stack()
        m.voxel_size = pixel
    return imgs


def refused(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    """The message of an InputError; asserts every fragment (file, field, expectation) is in it."""
    assert isinstance(exc.value, InputError), type(exc.value)
    msg = str(exc.value)
    for f in fragments:
        assert f in msg, (f, msg)
    print(f"\nmessage: {msg}")
    return msg


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The simulated set: particles.star/.mrcs and initial_model_01/02.mrc."""
    d = tmp_path_factory.mktemp("data")
    simulate_dataset(SimulationSpec(n_particles=N_PARTICLES, box=BOX, pixel_size=PIXEL, seed=0), d)
    return d


@pytest.fixture(scope="module")
def models(data) -> list[Path]:
    return [data / "initial_model_01.mrc", data / "initial_model_02.mrc"]


@pytest.fixture(scope="module")
def prepared(data, tmp_path_factory) -> Path:
    """A run folder after preprocess and make_mask (for init_references tests)."""
    run = tmp_path_factory.mktemp("prep")
    cfg = base_config()
    prep(str(data / "particles.star"), str(run / "preprocess"), 2, cfg)
    make_mask(
        str(run / "preprocess" / "info.json"),
        str(run / "mask.mrc"),
        str(run / "mask_focus.mrc"),
        [],
        settings_for("mask", cfg),
    )
    return run


def init(run: Path, models: list, out: Path, config: dict | None = None) -> np.ndarray:
    """init_references on ``models``; returns the references (K, 2, D, D, D)."""
    init_references(
        [str(m) for m in models],
        str(run / "preprocess" / "info.json"),
        str(run / "preprocess" / "shard_0000.npz"),
        str(run / "mask.mrc"),
        str(out / "references.npz"),
        str(out / "model.json"),
        settings_for("init_references", config or base_config()),
    )
    return np.load(out / "references.npz")["maps"]


@pytest.fixture(scope="module")
def native_refs(prepared, models, tmp_path_factory) -> np.ndarray:
    return init(prepared, models, tmp_path_factory.mktemp("native"))


@pytest.fixture(scope="module")
def reference_run(data, models, tmp_path_factory) -> Path:
    """One full run of the step functions (shard size 60: 2 shards)."""
    return run_steps(data / "particles.star", models, tmp_path_factory.mktemp("ref"), base_config())


def upsample(vol: np.ndarray, m: int) -> np.ndarray:
    """A cubic map (n, n, n) Fourier-padded to (m, m, m): the same object on a finer grid."""
    n = vol.shape[0]
    f = np.fft.fftshift(np.fft.fftn(vol))
    g = np.zeros((m,) * 3, complex)
    a = m // 2 - n // 2
    g[a : a + n, a : a + n, a : a + n] = f
    return (np.fft.ifftn(np.fft.ifftshift(g)).real * (m / n) ** 3).astype(np.float32)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


# ---------------------------------------------------------------------------- MRC stacks


def test_corrupt_stack_header(tmp_path):
    stack(tmp_path / "s.mrcs")
    raw = bytearray((tmp_path / "s.mrcs").read_bytes())
    raw[:12] = np.array([-5, 16, 16], "<i4").tobytes()  # nx < 0
    (tmp_path / "s.mrcs").write_bytes(bytes(raw))
    f = star30(tmp_path / "p.star", ["1@s.mrcs"])
    with pytest.raises(InputError) as exc:
        read_particles(f)
    refused(exc, "s.mrcs", "non-positive dimensions")


def test_garbage_instead_of_stack(tmp_path):
    (tmp_path / "s.mrcs").write_bytes(np.random.default_rng(1).bytes(5000))
    f = star30(tmp_path / "p.star", ["1@s.mrcs"])
    with pytest.raises(InputError) as exc:
        read_particles(f)
    refused(exc, "s.mrcs")


def test_truncated_stack_through_preprocess(tmp_path):
    stack(tmp_path / "s.mrcs", n=4)
    raw = (tmp_path / "s.mrcs").read_bytes()
    (tmp_path / "s.mrcs").write_bytes(raw[: 1024 + 16 * 16 * 4 * 2 + 7])
    f = star30(tmp_path / "p.star", [f"{i}@s.mrcs" for i in (1, 2, 3)])
    with pytest.raises(InputError) as exc:
        prep(str(f), str(tmp_path / "out"), 1, base_config())
    refused(exc, "s.mrcs", "truncated", "image 3")
    assert not (tmp_path / "out" / "shard_0000.npz").exists()


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float16])
def test_other_modes_preprocess_like_float32(tmp_path, dtype):
    """The same pixel values as int8/int16/uint16/float16 give the same shards as float32."""
    imgs = stack(tmp_path / "a.mrcs", n=6, dtype=dtype)
    with mrcfile.new(tmp_path / "b.mrcs") as m:
        m.set_data(imgs.astype(np.float32))
        m.set_image_stack()
        m.voxel_size = 2.0
    cfg = base_config(shard_size=10)
    out = {}
    for name in ("a", "b"):
        f = star30(tmp_path / f"{name}.star", [f"{i}@{name}.mrcs" for i in range(1, 7)])
        prep(str(f), str(tmp_path / name), 1, cfg)
        out[name] = np.load(tmp_path / name / "shard_0000.npz")["images"]
    assert np.isfinite(out["a"]).all() and out["a"].dtype == np.float32
    np.testing.assert_array_equal(out["a"], out["b"])


def test_non_square_images(tmp_path):
    with mrcfile.new(tmp_path / "s.mrcs") as m:
        m.set_data(np.zeros((3, 16, 20), np.float32))
        m.set_image_stack()
    f = star30(tmp_path / "p.star", ["1@s.mrcs"])
    with pytest.raises(InputError) as exc:
        read_particles(f)
    refused(exc, "p.star", "16x20", "square")


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_inf_pixel_through_preprocess(tmp_path, bad):
    imgs = stack(tmp_path / "s.mrcs", n=4)
    imgs[1, 2, 2] = bad
    with pytest.warns(RuntimeWarning):
        write_mrc(tmp_path / "s.mrcs", imgs, 2.0)
    f = star30(tmp_path / "p.star", [f"{i}@s.mrcs" for i in (1, 2, 3)])
    with pytest.raises(InputError) as exc:
        prep(str(f), str(tmp_path / "out"), 1, base_config())
    refused(exc, "s.mrcs", "NaN or Inf", "image 2")


# ---------------------------------------------------------------------------- STAR metadata


def test_crlf_line_endings_read_like_unix(tmp_path):
    stack(tmp_path / "s.mrcs")
    f = star30(tmp_path / "p.star", ["1@s.mrcs", "3@s.mrcs"])
    g = tmp_path / "w.star"
    g.write_bytes(f.read_bytes().replace(b"\n", b"\r\n"))
    a, b = read_particles(f), read_particles(g)
    assert b["hr_index"].tolist() == [0, 2]
    pd.testing.assert_frame_equal(a, b)


def test_relion31_particles_without_optics_block(tmp_path):
    stack(tmp_path / "s.mrcs")
    f = tmp_path / "p.star"
    f.write_text(
        "data_particles\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnDefocusV\n"
        "_rlnDefocusAngle\n_rlnOpticsGroup\n1@s.mrcs 10000 9000 5 1\n"
    )
    with pytest.raises(InputError) as exc:
        read_particles(f)
    refused(exc, "p.star", "missing CTF column", "_rlnVoltage")


def test_voltage_zero(tmp_path):
    stack(tmp_path / "s.mrcs")
    f = tmp_path / "p.star"
    f.write_text(star30(f, ["1@s.mrcs"]).read_text().replace(" 300 ", " 0 "))
    with pytest.raises(InputError) as exc:
        read_particles(f)
    refused(exc, "p.star", "row 1", "_rlnVoltage must be > 0")


def test_star_file_is_binary(tmp_path):
    f = tmp_path / "p.star"
    f.write_bytes(b"\xff\xfe\x00data_\x80\x81")
    with pytest.raises(InputError) as exc:
        read_particles(f)
    refused(exc, "p.star")


# ---------------------------------------------------------------------------- CryoSPARC .cs


def _cs(path: Path, n: int, stack_name: str) -> Path:
    fields = [
        ("blob/path", "S32"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4"),
        ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"),
        ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"),
    ]  # fmt: skip
    arr = np.zeros(n, dtype=fields)
    arr["blob/path"] = stack_name.encode()
    arr["blob/idx"] = np.arange(n)
    arr["blob/psize_A"], arr["ctf/df1_A"], arr["ctf/df2_A"] = 2.0, 10000, 9000
    arr["ctf/accel_kv"], arr["ctf/cs_mm"], arr["ctf/amp_contrast"] = 300, 2.7, 0.1
    with open(path, "wb") as fh:
        np.save(fh, arr)
    return path


def test_cs_with_no_particles(tmp_path):
    with pytest.raises(InputError) as exc:
        read_particles(_cs(tmp_path / "p.cs", 0, "s.mrcs"))
    refused(exc, "p.cs", "no particles")


def test_cs_pointing_at_missing_stack(tmp_path):
    with pytest.raises(InputError) as exc:
        read_particles(_cs(tmp_path / "p.cs", 2, ">J12/imported/s.mrcs"))
    refused(exc, "p.cs", "row 1", "J12/imported/s.mrcs' not found", "project_dir")
    (tmp_path / "J12" / "imported").mkdir(parents=True)
    stack(tmp_path / "J12" / "imported" / "s.mrcs", n=2)
    t = read_particles(tmp_path / "p.cs", project_dir=tmp_path)
    assert read_images(t).shape == (2, 16, 16)


# ---------------------------------------------------------------------------- initial models


def test_initial_model_not_cubic(prepared, models, tmp_path):
    """A (20, 24, 24) map is padded to a 24^3 cube around its centre and used (issue 13, item 7)."""
    vol, px = read_volume(models[0])
    write_mrc(tmp_path / "flat.mrc", vol[2:22], px)
    padded, ppx = read_volume(tmp_path / "flat.mrc")
    assert padded.shape == (24, 24, 24) and ppx == pytest.approx(px)
    np.testing.assert_array_equal(padded[2:22], vol[2:22])
    refs = init(prepared, [models[0], tmp_path / "flat.mrc"], tmp_path)
    assert np.isfinite(refs).all() and refs.shape[0] == 2


def test_initial_model_is_2d(prepared, models, tmp_path):
    write_mrc(tmp_path / "img.mrc", np.ones((24, 24), np.float32), 4.0)
    with pytest.raises(InputError) as exc:
        init(prepared, [models[0], tmp_path / "img.mrc"], tmp_path)
    refused(exc, "img.mrc", "cubic 3D volume", "(24, 24)")


def test_initial_model_with_nan(prepared, models, tmp_path):
    vol, px = read_volume(models[0])
    vol[3, 4, 5] = np.nan
    with pytest.warns(RuntimeWarning):
        write_mrc(tmp_path / "nan.mrc", vol, px)
    with pytest.raises(InputError) as exc:
        init(prepared, [tmp_path / "nan.mrc", models[1]], tmp_path)
    refused(exc, "nan.mrc", "NaN or Inf")


def test_initial_model_missing_or_empty(prepared, models, tmp_path):
    with pytest.raises(InputError) as exc:
        init(prepared, [models[0], tmp_path / "gone.mrc"], tmp_path)
    refused(exc, "gone.mrc", "does not exist")
    write_mrc(tmp_path / "zero.mrc", np.zeros((24,) * 3, np.float32), 4.0)
    with pytest.raises(InputError) as exc:
        init(prepared, [models[0], tmp_path / "zero.mrc"], tmp_path)
    refused(exc, "zero.mrc", "empty")
    assert not (tmp_path / "references.npz").exists()


def test_initial_model_other_box_and_pixel_is_resampled(
    prepared, models, native_refs, tmp_path, caplog
):
    """The same map at box 48 and 2 A/px (same extent) gives the same references, and the
    log says so; a box-24 map at 5 A/px is resampled too."""
    vol, px = read_volume(models[1])
    write_mrc(tmp_path / "fine.mrc", upsample(vol, 48), px / 2)
    write_mrc(tmp_path / "px5.mrc", vol, 5.0)
    with caplog.at_level(logging.INFO, logger="hetrefine"):
        refs = init(prepared, [models[0], tmp_path / "fine.mrc", tmp_path / "px5.mrc"], tmp_path)
    text = caplog.text
    print("\nlog:", [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()])
    assert "fine.mrc: resampled from box 48 at 2.000 A/px to box 24 at 4.000 A/px" in text
    assert "px5.mrc: resampled from box 24 at 5.000 A/px to box 24 at 4.000 A/px" in text
    assert "initial_model_01.mrc: resampled" not in text
    assert refs.shape == (3, 2, 24, 24, 24)
    assert corr(refs[1, 0], native_refs[1, 0]) > 0.99
    np.testing.assert_allclose(refs[1].std(), native_refs[1].std(), rtol=0.05)


def test_initial_model_without_pixel_size(prepared, models, native_refs, tmp_path, caplog):
    vol, _ = read_volume(models[1])
    write_mrc(tmp_path / "nopix.mrc", vol, 0.0)
    with caplog.at_level(logging.INFO, logger="hetrefine"):
        refs = init(prepared, [models[0], tmp_path / "nopix.mrc"], tmp_path)
    assert "nopix.mrc: no pixel size in the header; assuming the particles' 4.000 A" in caplog.text
    np.testing.assert_allclose(refs, native_refs, rtol=1e-4, atol=1e-5 * abs(native_refs).max())


def test_initial_model_on_wrong_grey_scale(prepared, models, native_refs, tmp_path, caplog):
    """A model 1000x too bright gives the same references: the scale is measured, and said."""
    vol, px = read_volume(models[1])
    write_mrc(tmp_path / "bright.mrc", vol * 1000, px)
    with caplog.at_level(logging.INFO, logger="hetrefine"):
        refs = init(prepared, [models[0], tmp_path / "bright.mrc"], tmp_path)
    line = [r.getMessage() for r in caplog.records if "bright.mrc: grey scale" in r.getMessage()]
    print("\nlog:", line)
    assert line and "to match the particles" in line[0]
    np.testing.assert_allclose(refs, native_refs, rtol=1e-3, atol=1e-4 * abs(native_refs).max())


def test_initial_model_with_inverted_contrast(prepared, models, native_refs, tmp_path, caplog):
    """A model with inverted contrast is detected, said in the log, and flipped back."""
    vol, px = read_volume(models[1])
    write_mrc(tmp_path / "inverted.mrc", -vol, px)
    with caplog.at_level(logging.INFO, logger="hetrefine"):
        refs = init(prepared, [models[0], tmp_path / "inverted.mrc"], tmp_path)
    warn = [
        r for r in caplog.records if r.levelno == logging.WARNING and "inverted" in r.getMessage()
    ]
    print("\nlog:", [r.getMessage() for r in warn])
    assert len(warn) == 1 and "inverted.mrc: contrast looks inverted" in warn[0].getMessage()
    np.testing.assert_allclose(refs, native_refs, rtol=1e-3, atol=1e-4 * abs(native_refs).max())


# ---------------------------------------------------------------------------- config vs data


def test_more_classes_than_particles(tmp_path):
    stack(tmp_path / "s.mrcs")
    star30(tmp_path / "p.star", ["1@s.mrcs", "2@s.mrcs"])
    cfg = validate_config({"particles": "p.star", "initial_models": ["a.mrc", "b.mrc", "c.mrc"]})
    with pytest.raises(InputError) as exc:
        dataset_size(cfg, workdir=tmp_path)
    refused(exc, "p.star", "key 'initial_models'", "3 initial models", "only 2 particles")
    cfg["initial_models"] = ["a.mrc", "b.mrc"]
    assert dataset_size(cfg, workdir=tmp_path).n_particles == 2


@pytest.mark.parametrize("symbol", ["C0", "D0", "X5", "I5", "C", ""])
def test_symmetry_that_does_not_exist(symbol):
    with pytest.raises(InputError) as exc:
        validate_config({"symmetry": symbol})
    refused(exc, "key 'symmetry'")
    with pytest.raises(InputError) as exc:
        symmetry_matrices(symbol)
    refused(exc, "symmetry")


def test_refine_box_larger_than_particle_box_in_preprocess(data, tmp_path):
    with pytest.raises(InputError) as exc:
        prep(str(data / "particles.star"), str(tmp_path), 2, base_config(refine_box=32))
    refused(exc, "refine_box", "32", "larger than the particle box 24")
    assert not list(tmp_path.iterdir())


def test_mask_larger_than_box(prepared, tmp_path):
    cfg = base_config(mask={"enabled": True, "inner_diameter_A": 120, "outer_diameter_A": None})
    with pytest.raises(InputError) as exc:
        make_mask(
            str(prepared / "preprocess" / "info.json"),
            str(tmp_path / "m.mrc"),
            str(tmp_path / "m_focus.mrc"),
            [],
            settings_for("mask", cfg),
        )
    refused(exc, "mask.inner_diameter_A", "larger than the box", "use at most 96.0 A")
    assert not (tmp_path / "m.mrc").exists()


def test_particles_changed_since_planning(data, tmp_path):
    with pytest.raises(InputError) as exc:
        prep(str(data / "particles.star"), str(tmp_path), 3, base_config())
    refused(exc, "particles.star", "120 particles", "planned 3", "rerun snakemake")


# ---------------------------------------------------------------------------- disk full


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def _assert_clean(folder: Path, final: Path, before: bytes | None) -> None:
    """No temporary file left behind; the final name holds its previous content or nothing."""
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(f".{final.name}.")]
    assert leftovers == []
    if before is None:
        assert not final.exists()
    else:
        assert final.read_bytes() == before


def test_disk_full_writing_a_map(prepared, tmp_path, monkeypatch):
    final = tmp_path / "mask.mrc"
    shutil.copy(prepared / "mask.mrc", final)
    before = final.read_bytes()
    real_new = mrcfile.new

    def full(path, *a, **k):
        Path(path).write_bytes(before[:3000])  # part of it got out
        raise _enospc(path)

    monkeypatch.setattr(mrcfile, "new", full)
    with pytest.raises(OSError) as exc:
        make_mask(
            str(prepared / "preprocess" / "info.json"),
            str(final),
            str(tmp_path / "final_focus.mrc"),
            [],
            settings_for("mask", base_config()),
        )
    assert exc.value.errno == errno.ENOSPC and "mask.mrc" in str(exc.value)
    print(f"\nmessage: {exc.value}")
    _assert_clean(tmp_path, final, before)
    monkeypatch.setattr(mrcfile, "new", real_new)
    with mrcfile.open(final) as m:
        assert m.data.shape == (24, 24, 24)


def test_disk_full_writing_shards(data, tmp_path, monkeypatch):
    """A full disk at the second shard: the first shard complete, no partial second one."""
    calls = []

    def full(path, **arrays):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"PK\x03\x04 partial")
            raise _enospc(path)
        real(path, **arrays)

    real = np.savez
    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(OSError) as exc:
        prep(str(data / "particles.star"), str(tmp_path), 2, base_config())
    assert exc.value.errno == errno.ENOSPC and "shard_0001.npz" in str(exc.value)
    _assert_clean(tmp_path, tmp_path / "shard_0001.npz", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_0000.npz"]
    with np.load(tmp_path / "shard_0000.npz") as z:
        assert z["images"].shape == (60, 24, 24)


def test_disk_full_writing_a_star_file(reference_run, tmp_path, monkeypatch):
    import starfile

    final = tmp_path / "particles_all.star"
    shutil.copy(reference_run / "particles_all.star", final)
    before = final.read_bytes()
    blocks = read_star_blocks(final)
    df = blocks["particles"].merge(blocks["optics"], on="rlnOpticsGroup")

    def full(data, path, **k):
        Path(path).write_text("data_optics\nloop_\n_rlnOp")
        raise _enospc(path)

    monkeypatch.setattr(starfile, "write", full)
    with pytest.raises(OSError) as exc:
        write_particles_star(final, df, image_names="keep")
    assert exc.value.errno == errno.ENOSPC and "particles_all.star" in str(exc.value)
    _assert_clean(tmp_path, final, before)


# ---------------------------------------------------------------------------- inputs untouched


def test_inputs_are_never_modified(data, models, tmp_path):
    """Hash and stat every input before and after a full run of the step functions."""
    inputs = [data / "particles.star", data / "particles.mrcs", *models]
    before = {p: (sha256(p), p.stat().st_mtime_ns, p.stat().st_size) for p in inputs}
    listing = sorted(p.name for p in data.iterdir())
    out = run_steps(data / "particles.star", models, tmp_path / "run", base_config())
    assert (out / "particles_all.star").is_file()
    after = {p: (sha256(p), p.stat().st_mtime_ns, p.stat().st_size) for p in inputs}
    assert after == before
    assert sorted(p.name for p in data.iterdir()) == listing  # nothing written next to them


# ---------------------------------------------------------------------------- determinism


def _maps(out: Path) -> dict[str, np.ndarray]:
    maps = {}
    for p in sorted(out.rglob("*.mrc")):
        with mrcfile.open(p) as m:
            maps[str(p.relative_to(out))] = m.data.copy()
    return maps


def _stars(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.star"))


def test_rerun_from_scratch_is_byte_identical(data, models, reference_run, tmp_path):
    again = run_steps(data / "particles.star", models, tmp_path / "again", base_config())
    files = output_files(reference_run)
    assert files == output_files(again) and len(files) > 15
    differ = [f for f in files if sha256(reference_run / f) != sha256(again / f)]
    assert differ == []


def _max_rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a)


def _compare_across_shards(a: Path, b: Path) -> tuple[list[str], float]:
    """STAR files that differ in bytes, after checking that classes and image names agree
    exactly, poses to 1e-4 degree and 1e-5 A, and every other number within 1e-5
    relative; and the maps' max relative difference.

    Poses are not required to be bit-equal: a refined pose can be reached along two
    paths (two coarse candidates, each with a local step) that give the same rotation
    up to float64 rounding (1e-6 degree), and which path wins then depends on the
    maps' last bits, which depend on how the sums were grouped into shards."""
    differ = []
    for name in _stars(a):
        if (a / name).read_bytes() == (b / name).read_bytes():
            continue
        differ.append(name)
        ta, tb = read_star_blocks(a / name)["particles"], read_star_blocks(b / name)["particles"]
        assert list(ta.columns) == list(tb.columns)
        for col in ta.columns:
            if col in ("rlnClassNumber", "rlnImageName"):
                assert ta[col].tolist() == tb[col].tolist(), (name, col)
            elif col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
                d = np.abs(ta[col].to_numpy() - tb[col].to_numpy())
                assert np.minimum(d, 360.0 - d).max() < 1e-4, (name, col)
            elif col in ("rlnOriginXAngst", "rlnOriginYAngst"):
                np.testing.assert_allclose(ta[col], tb[col], rtol=0, atol=1e-5, err_msg=col)
            elif pd.api.types.is_numeric_dtype(ta[col]):
                np.testing.assert_allclose(ta[col], tb[col], rtol=1e-5, atol=1e-6, err_msg=col)
    ma, mb = _maps(a), _maps(b)
    assert ma.keys() == mb.keys()
    return differ, _max_rel(ma, mb)


def test_shard_count_from_the_same_start(data, models, reference_run, tmp_path):
    """Shard size 120 vs 60 from the same iteration-0 references: same classes and poses,
    every number within 1e-5, maps within 1e-5 relative (measured: ~1e-7, float32 GEMM
    and per-shard float32 sums round differently; STAR files differ in the last digits
    of _rlnLogLikeliContribution)."""
    one = run_steps(
        data / "particles.star", models, tmp_path / "one", base_config(shard_size=120),
        iter0=reference_run.parent / "iter_000",
    )  # fmt: skip
    differ, rel = _compare_across_shards(reference_run, one)
    print(f"\nshard 60 vs 120, same start: STAR files not byte-identical: {differ}; "
          f"maps max relative difference {rel:.2e}")  # fmt: skip
    assert rel < 1e-5


def test_shard_count_full_run(data, models, reference_run, tmp_path):
    """Shard size 120 vs 60 from scratch: the same classes, poses and maps (within 1e-5)."""
    one = run_steps(data / "particles.star", models, tmp_path / "one", base_config(shard_size=120))
    differ, rel = _compare_across_shards(reference_run, one)
    print(f"\nshard 60 vs 120 from scratch: STAR differ {differ}; maps {rel:.2e}")
    assert rel < 1e-5


@pytest.mark.xfail(
    strict=True,
    reason="per-shard sums are rounded (complex64) before they are added, so maps differ "
    "in their last bits with the grouping into shards: STAR files differ in the 7th digit "
    "of the log-likelihood and poses by ~1e-6 degree (lead: steps; needs exact summation)",
)
def test_shard_count_byte_identical(data, models, reference_run, tmp_path):
    one = run_steps(
        data / "particles.star", models, tmp_path / "one", base_config(shard_size=120),
        iter0=reference_run.parent / "iter_000",
    )  # fmt: skip
    assert [sha256(reference_run / s) for s in _stars(reference_run)] == [
        sha256(one / s) for s in _stars(one)
    ]
    ma, mb = _maps(reference_run), _maps(one)
    assert all(np.array_equal(ma[k], mb[k]) for k in ma)


def test_write_mrc_is_byte_stable(tmp_path, monkeypatch):
    import datetime as dt

    import mrcfile.mrcobject

    vol = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    for i, day in enumerate((1, 2)):

        class Fixed(dt.datetime):
            @classmethod
            def now(cls, tz=None, _day=day):
                return dt.datetime(2030, 1, _day, 12, 0, 0)

        monkeypatch.setattr(mrcfile.mrcobject, "datetime", Fixed)
        write_mrc(tmp_path / f"{i}.mrc", vol, 1.5)
    assert (tmp_path / "0.mrc").read_bytes() == (tmp_path / "1.mrc").read_bytes()


def test_star_fixed_after_a_failed_read_is_read_afresh(tmp_path):
    """A STAR refused, then corrected in place, is read from disk again in the same process
    (starfile's line cache was left stale after a failed parse)."""
    stack(tmp_path / "s.mrcs")
    f = star30(
        tmp_path / "p.star", ["1@s.mrcs"], extra="2@s.mrcs 10000 9500 10 300 2.7 0.1 2.0 99\n"
    )
    with pytest.raises(InputError) as exc:
        read_particles(f)
    refused(exc, "p.star", "different number of fields")
    star30(f, ["1@s.mrcs", "2@s.mrcs"])
    assert read_particles(f)["hr_index"].tolist() == [0, 1]


def test_a_write_error_without_a_file_name_names_the_file(tmp_path):
    """numpy writing through a file object raises ENOSPC with no file name: the error
    that reaches the user names the output."""
    from hetrefine.io.atomic import atomic_path

    target = tmp_path / "out.npz"
    with pytest.raises(OSError) as exc, atomic_path(target, suffix=".npz"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(target)
    assert not target.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iterations: [8\nseed: 1\n", "line"),  # unclosed bracket
        ("run: !!python/object/apply:os.system ['echo owned']\n", "python/object"),  # unsafe tag
        ("- a\n- b\n", "mapping"),
    ],
)
def test_preflight_bad_yaml_is_one_line(tmp_path, text, expected):
    import subprocess
    import sys

    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    r = subprocess.run(
        [sys.executable, "-m", "hetrefine.preflight", "--config", str(cfg), "--no-measure"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.yaml" in lines[0] and expected in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_one_sided_random_subset_is_split_again_with_a_warning(data, tmp_path, caplog):
    """A STAR selected from one half of a RELION refinement (_rlnRandomSubset 1 on every
    row): the preprocess step splits it again (seeded) and says so, so half B is not empty."""
    blocks = read_star_blocks(data / "particles.star")
    table = blocks["particles"].merge(blocks["optics"], on="rlnOpticsGroup")
    table["rlnRandomSubset"] = 1
    table["rlnImageName"] = [
        f"{n.split('@')[0]}@{data / 'particles.mrcs'}" for n in table["rlnImageName"]
    ]
    star = tmp_path / "one_half.star"
    write_particles_star(star, table)
    with caplog.at_level(logging.WARNING, logger="hetrefine"):
        prep(str(star), str(tmp_path / "pre"), 2, base_config())
    assert any("split again" in r.getMessage() for r in caplog.records), caplog.text
    halves = np.concatenate(
        [np.load(tmp_path / "pre" / f"shard_{s:04d}.npz")["half"] for s in range(2)]
    )
    assert abs(int(halves.sum()) - N_PARTICLES // 2) <= 1


def test_blank_images_refused_by_preprocess_with_their_count(data, tmp_path):
    """All-zero images (an extraction past the micrograph edge) are refused with the
    count and the first rows, instead of being classified with confidence."""
    stack_path = tmp_path / "particles.mrcs"
    shutil.copy(data / "particles.mrcs", stack_path)
    with mrcfile.open(stack_path, "r+") as m:
        m.data[[4, 70]] = 0.0
    shutil.copy(data / "particles.star", tmp_path / "particles.star")
    with pytest.raises(InputError) as exc:
        prep(str(tmp_path / "particles.star"), str(tmp_path / "pre"), 2, base_config())
    refused(exc, "particles.star", "2 of 120", "constant", "row 5")
    assert not (tmp_path / "pre" / "info.json").exists()


def test_constant_initial_model_refused_by_init_and_preflight_alike(
    prepared, models, tmp_path, data
):
    """One check of an initial model (validation.read_initial_model) for the run and the
    pre-flight: a constant map is refused by both, naming the file (issue 13, item 10)."""
    from hetrefine.preflight import run_preflight

    write_mrc(tmp_path / "flat.mrc", np.full((BOX,) * 3, 2.0, np.float32), PIXEL)
    with pytest.raises(InputError) as exc:
        init(prepared, [models[0], tmp_path / "flat.mrc"], tmp_path)
    refused(exc, "flat.mrc", "constant")
    conf = {
        "particles": str(data / "particles.star"),
        "initial_models": [str(models[0]), str(tmp_path / "flat.mrc")],
        "device": "cpu",
    }
    rep = run_preflight(conf, measure=False)
    assert not rep.ok and any("flat.mrc" in e and "constant" in e for e in rep.errors), rep.errors


# ------------------------------------- one validator for the pre-flight and the run (item 10)


def preflight_errors(data: Path, particles: Path | None = None, **over) -> list[str]:
    """The pre-flight's errors (no timed sample) for the tiny set with ``over`` in the config."""
    from hetrefine.preflight import run_preflight

    conf = {
        "particles": str(particles or data / "particles.star"),
        "initial_models": [str(data / "initial_model_01.mrc"), str(data / "initial_model_02.mrc")],
        "device": "cpu",
        **over,
    }
    return run_preflight(conf, measure=False).errors


@pytest.mark.parametrize(
    "mask, key",
    [
        ({"inner_diameter_A": 120, "outer_diameter_A": None}, "mask.inner_diameter_A"),
        ({"inner_diameter_A": 80, "outer_diameter_A": 120}, "mask.outer_diameter_A"),
    ],
)
def test_mask_wider_than_box_same_message_in_preflight_and_run(prepared, data, tmp_path, mask, key):
    """R27: the mask step and the pre-flight refuse a mask wider than the box (96 A) with the
    same message (validation.check_mask_fits); the pre-flight used to accept an inner
    diameter of 120 A (its outer is capped at the box) and the mask step blamed the inner
    diameter for a too-wide outer one."""
    cfg = base_config(mask={"enabled": True, **mask})
    with pytest.raises(InputError) as exc:
        make_mask(
            str(prepared / "preprocess" / "info.json"),
            str(tmp_path / "m.mrc"),
            str(tmp_path / "m_focus.mrc"),
            [],
            settings_for("mask", cfg),
        )
    msg = refused(exc, f"config ({key})", "larger than the box", "use at most 96.0 A")
    assert f"mask: {msg}" in preflight_errors(data, mask={"enabled": True, **mask})


def test_input_poses_without_poses_same_message_at_start_in_preflight_and_align(
    prepared, models, data, tmp_path
):
    """R28: `input_poses: fixed` with a particle file without poses: the workflow's start-up
    check (the file's column names), the pre-flight and the align job raise the same error
    (validation.check_input_poses); the pre-flight used to accept it."""
    from hetrefine.validation import check_input_poses, has_poses, particle_file_columns

    init(prepared, models, tmp_path)
    cfg = base_config(input_poses="fixed")
    with pytest.raises(InputError) as exc:
        align_shard(
            str(prepared / "preprocess" / "shard_0000.npz"), str(tmp_path / "references.npz"),
            str(tmp_path / "model.json"), str(prepared / "mask.mrc"), str(prepared / "mask.mrc"), 1,
            str(tmp_path / "a.npz"),
            str(tmp_path / "a.sums.npz"), settings_for("align", cfg), "cpu",
        )  # fmt: skip
    msg = refused(
        exc, "config (input_poses)", "input_poses: fixed needs poses", "input_poses: ignore"
    )
    with pytest.raises(InputError) as start:
        columns = particle_file_columns(data / "particles.star")
        check_input_poses("fixed", has_poses(columns))
    assert str(start.value) == msg
    assert f"particles: {msg}" in preflight_errors(data, input_poses="fixed")
    assert not any("input_poses" in e for e in preflight_errors(data, input_poses="ignore"))


def test_gpu_without_gpu_same_message_in_preflight_and_align(
    prepared, models, data, tmp_path, monkeypatch
):
    """R29: `device: gpu` on a machine where CuPy sees no GPU: the pre-flight calls the same
    backend.select_device as the align job and reports its message (it used to pass)."""
    import hetrefine.backend

    monkeypatch.setattr(hetrefine.backend, "cupy_available", lambda: False)
    init(prepared, models, tmp_path)
    with pytest.raises(RuntimeError) as exc:
        align_shard(
            str(prepared / "preprocess" / "shard_0000.npz"), str(tmp_path / "references.npz"),
            str(tmp_path / "model.json"), str(prepared / "mask.mrc"), str(prepared / "mask.mrc"), 1,
            str(tmp_path / "a.npz"),
            str(tmp_path / "a.sums.npz"), settings_for("align", base_config()), "gpu",
        )  # fmt: skip
    assert "device: gpu was asked for" in str(exc.value)
    assert f"device: {exc.value}" in preflight_errors(data, device="gpu")
    assert not any(e.startswith("device") for e in preflight_errors(data, device="auto"))


def test_nan_mid_stack_same_message_in_preflight_and_preprocess(data, tmp_path):
    """R30: a NaN pixel in image 70 of 120 (neither the first nor the last): preprocess and
    the pre-flight both read every image and refuse it with the same message; the
    pre-flight used to read only the first and last images and passed."""
    shutil.copy(data / "particles.star", tmp_path / "particles.star")
    with mrcfile.open(data / "particles.mrcs", permissive=True) as src:
        stack = np.array(src.data)
    stack[69, 5, 7] = np.nan
    with mrcfile.new(tmp_path / "particles.mrcs") as out:
        out.set_data(stack)
        out.set_image_stack()
        out.voxel_size = PIXEL
    with pytest.raises(InputError) as exc:
        prep(tmp_path / "particles.star", tmp_path / "pre", 2, base_config())
    msg = refused(exc, "particles.mrcs", "NaN or Inf", "image 70 ")
    assert f"particles: {msg}" in preflight_errors(data, particles=tmp_path / "particles.star")
    assert not (tmp_path / "pre" / "info.json").exists()


def test_a_run_that_never_separated_says_so(data, models, tmp_path, caplog):
    """Two copies of one map: every particle ends in one class. The iterations' statistics
    say `separated: false` and never `converged`, and the log says why (issue 18)."""
    import json

    with caplog.at_level(logging.WARNING, logger="hetrefine"):
        run_steps(data / "particles.star", [models[0], models[0]], tmp_path, base_config())
    last = json.loads((tmp_path / "iter_002" / "model.json").read_text())
    assert last["separated"] is False and last["converged"] is False
    assert any("have not separated" in r.getMessage() for r in caplog.records), caplog.text
