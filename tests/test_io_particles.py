"""Canonical particle table: STAR 3.0/3.1 reading, path resolution, validation, lazy images."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest

from hetrefine.errors import InputError
from hetrefine.io.mrc import write_mrc
from hetrefine.io.particles import CANONICAL_COLUMNS, count_particles, read_particles
from hetrefine.io.stacks import iter_image_chunks, read_images

CTF_LINE_COLS = [
    "rlnImageName",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
]


def make_stack(path, n, box=16, seed=0, pixel=2.0, dtype=np.float32):
    """A stack whose image i has mean ~ i (so order is checkable)."""
    rng = np.random.default_rng(seed)
    imgs = rng.normal(size=(n, box, box)) + np.arange(n)[:, None, None] * 10
    if np.dtype(dtype).kind in "iu":
        imgs = np.clip(np.round(imgs), np.iinfo(dtype).min, np.iinfo(dtype).max)
    imgs = imgs.astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(imgs)
        m.set_image_stack()
        m.voxel_size = pixel
    return imgs


def star30(path, names, extra_cols=None, rows_extra=None, header_extra=""):
    """Write a RELION 3.0 single-table STAR with full CTF columns."""
    cols = CTF_LINE_COLS + list(extra_cols or [])
    lines = ["", "data_", "", "loop_"] + [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    for i, name in enumerate(names):
        vals = [
            name,
            f"{10000 + 100 * i:.1f}",
            f"{9000 + 100 * i:.1f}",
            "12.5",
            "300",
            "2.7",
            "0.1",
        ]
        vals += [str(v) for v in (rows_extra[i] if rows_extra else [])]
        lines.append(" ".join(vals))
    path.write_text(header_extra + "\n".join(lines) + "\n")
    return path


def star31(path, names, optics_rows, groups, reverse=False, block="particles"):
    optics = ["data_optics", "", "loop_"] + [
        "_rlnOpticsGroup #1",
        "_rlnOpticsGroupName #2",
        "_rlnVoltage #3",
        "_rlnSphericalAberration #4",
        "_rlnAmplitudeContrast #5",
        "_rlnImagePixelSize #6",
        "_rlnImageSize #7",
        "_rlnImageDimensionality #8",
    ]
    optics += [" ".join(str(v) for v in r) for r in optics_rows]
    parts = [f"data_{block}", "", "loop_"] + [
        "_rlnImageName #1",
        "_rlnDefocusU #2",
        "_rlnDefocusV #3",
        "_rlnDefocusAngle #4",
        "_rlnOpticsGroup #5",
    ]
    parts += [
        f"{n} {11000 + i} {10000 + i} 45.0 {g}"
        for i, (n, g) in enumerate(zip(names, groups, strict=True))
    ]
    blocks = [parts, optics] if reverse else [optics, parts]
    path.write_text("\n# version 30001\n\n" + "\n\n".join("\n".join(b) for b in blocks) + "\n")
    return path


# ---------------------------------------------------------------------------------------
# STAR 3.0 / 3.1 reading
# ---------------------------------------------------------------------------------------


def test_relion30_pixel_from_detector_and_magnification(tmp_path):
    make_stack(tmp_path / "s.mrcs", 5, pixel=0.0)
    names = [f"{i}@s.mrcs" for i in (3, 1, 5)]
    f = star30(
        tmp_path / "p.star",
        names,
        ["rlnDetectorPixelSize", "rlnMagnification", "rlnMyExtra"],
        [[5.0, 25000.0, "a"], [5.0, 25000.0, "b"], [5.0, 25000.0, "c"]],
    )
    df = read_particles(f)
    assert list(df["hr_index"]) == [2, 0, 4]  # 1-based idx@stack -> 0-based
    assert set(CANONICAL_COLUMNS) <= set(df.columns)
    assert df["rlnImagePixelSize"].iloc[0] == pytest.approx(2.0)
    assert (df["rlnImageSize"] == 16).all() and (df["rlnOpticsGroup"] == 1).all()
    assert (df["rlnPhaseShift"] == 0).all() and (df["rlnCtfBfactor"] == 0).all()
    assert list(df["rlnMyExtra"]) == ["a", "b", "c"]  # input columns kept
    assert df["rlnDefocusU"].tolist() == [10000.0, 10100.0, 10200.0]
    assert df["hr_stack"].iloc[0] == str((tmp_path / "s.mrcs").resolve())
    assert count_particles(f) == 3


def test_pixel_size_fallbacks_and_error(tmp_path):
    make_stack(tmp_path / "s.mrcs", 3, pixel=0.0)
    f = star30(tmp_path / "p.star", ["1@s.mrcs", "2@s.mrcs"])
    with pytest.raises(InputError, match="pixel size unknown") as exc:
        read_particles(f)
    assert "p.star" in str(exc.value)
    assert read_particles(f, pixel_size=1.7)["rlnImagePixelSize"].iloc[0] == pytest.approx(1.7)
    make_stack(tmp_path / "s.mrcs", 3, pixel=3.1)  # header pixel size used last
    assert read_particles(f)["rlnImagePixelSize"].iloc[0] == pytest.approx(3.1, abs=1e-4)
    # the file's own value wins over the argument
    g = star30(tmp_path / "q.star", ["1@s.mrcs"], ["rlnImagePixelSize"], [[1.25]])
    assert read_particles(g, pixel_size=9.0)["rlnImagePixelSize"].iloc[0] == 1.25


def test_relion31_two_optics_groups_reversed_blocks_odd_name(tmp_path):
    make_stack(tmp_path / "s.mrcs", 4)
    rows = [[1, "og1", 300, 2.7, 0.1, 1.5, 16, 2], [2, "og2", 200, 2.0, 0.07, 1.5, 16, 2]]
    names = [f"{i}@s.mrcs" for i in (1, 2, 3, 4)]
    a = read_particles(star31(tmp_path / "a.star", names, rows, [1, 2, 2, 1]))
    b = read_particles(
        star31(tmp_path / "b.star", names, rows, [1, 2, 2, 1], reverse=True, block="images")
    )
    pd.testing.assert_frame_equal(a, b)
    assert a["rlnVoltage"].tolist() == [300, 200, 200, 300]
    assert a["rlnSphericalAberration"].tolist() == [2.7, 2.0, 2.0, 2.7]
    assert a["rlnOpticsGroupName"].tolist() == ["og1", "og2", "og2", "og1"]
    assert count_particles(tmp_path / "b.star") == 4


def test_optics_groups_keep_their_own_pixel_size_and_box(tmp_path):
    make_stack(tmp_path / "s.mrcs", 2)
    names = ["1@s.mrcs", "2@s.mrcs"]
    rows = [[1, "a", 300, 2.7, 0.1, 1.5, 16, 2], [2, "b", 300, 2.7, 0.1, 1.9, 16, 2]]
    t = read_particles(star31(tmp_path / "p.star", names, rows, [1, 2]))
    assert t["rlnImagePixelSize"].tolist() == [1.5, 1.9]
    rows = [[1, "a", 300, 2.7, 0.1, 1.5, 16, 2], [2, "b", 300, 2.7, 0.1, 1.5, 24, 2]]
    with pytest.raises(InputError, match="_rlnImageSize is 24"):  # the stack says 16
        read_particles(star31(tmp_path / "q.star", names, rows, [1, 2]))
    t = read_particles(star31(tmp_path / "q.star", names, rows, [1, 2]), check_images=False)
    assert t["rlnImageSize"].tolist() == [16, 24]
    with pytest.raises(InputError, match="optics group 3 is not defined"):
        read_particles(star31(tmp_path / "r.star", names, rows[:1], [1, 3]))


# ---------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------


def test_stack_paths_resolve_from_star_dir_parents_and_project_dir(tmp_path):
    make_stack(tmp_path / "proj" / "Extract" / "s.mrcs", 3)
    job = tmp_path / "proj" / "Class3D" / "job001"
    job.mkdir(parents=True)
    f = star30(job / "p.star", ["2@Extract/s.mrcs"], ["rlnImagePixelSize"], [[1.0]])
    df = read_particles(f)  # found two folders up (RELION project convention)
    assert df["hr_stack"].iloc[0] == str((tmp_path / "proj/Extract/s.mrcs").resolve())
    deep = tmp_path / "elsewhere" / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    g = star30(deep / "p.star", ["1@Extract/s.mrcs"], ["rlnImagePixelSize"], [[1.0]])
    with pytest.raises(InputError) as exc:
        read_particles(g)
    msg = str(exc.value)
    assert "p.star" in msg and "row 1" in msg and "Extract/s.mrcs" in msg
    df = read_particles(g, project_dir=tmp_path / "proj")
    assert df["hr_index"].iloc[0] == 0
    # absolute paths are used as they are
    h = star30(
        deep / "abs.star",
        [f"3@{tmp_path / 'proj/Extract/s.mrcs'}"],
        ["rlnImagePixelSize"],
        [[1.0]],
    )
    assert read_particles(h)["hr_index"].iloc[0] == 2


# ---------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------


@pytest.fixture
def stackdir(tmp_path):
    make_stack(tmp_path / "s.mrcs", 4, box=16)
    make_stack(tmp_path / "big.mrcs", 2, box=24)
    return tmp_path


def _write(path, text):
    path.write_text(text)
    return path


HDR = "data_\nloop_\n" + "\n".join(f"_{c}" for c in CTF_LINE_COLS) + "\n"
GOOD = "1@s.mrcs 10000 9000 10 300 2.7 0.1\n"


@pytest.mark.parametrize(
    "body, pattern, where",
    [
        (GOOD + "0@s.mrcs 10000 9000 10 300 2.7 0.1\n", "1-based", "row 2"),
        (GOOD + "5@s.mrcs 10000 9000 10 300 2.7 0.1\n", "past the end.*holds 4", "row 2"),
        (GOOD + "x@s.mrcs 10000 9000 10 300 2.7 0.1\n", "integer index", "row 2"),
        (
            GOOD + "1@big.mrcs 10000 9000 10 300 2.7 0.1\n",
            "optics group 1 have different image sizes",
            "row 2",
        ),
        (GOOD + "2@s.mrcs 1e4 abc 10 300 2.7 0.1\n", "_rlnDefocusV must be a number", "row 2"),
        (GOOD + "2@s.mrcs 10000 nan 10 300 2.7 0.1\n", "NaN", "row 2"),
        (GOOD + "2@s.mrcs 10000 9000 10 300\n", "missing", "row 2"),
        (GOOD + "2@s.mrcs 10000 9000 10 300 2.7 0.1 99\n", "different number of fields", None),
        (GOOD + "2@nothere.mrcs 10000 9000 10 300 2.7 0.1\n", "nothere.mrcs' not found", "row 2"),
    ],
)
def test_broken_star_rows_are_refused(stackdir, body, pattern, where):
    f = _write(stackdir / "p.star", HDR + body)
    with pytest.raises(InputError, match=pattern) as exc:
        read_particles(f, pixel_size=1.0)
    assert str(f) in str(exc.value)
    if where:
        assert where in str(exc.value)


def test_missing_ctf_columns_empty_loop_duplicates(stackdir):
    f = _write(stackdir / "a.star", "data_\nloop_\n_rlnImageName\n_rlnDefocusU\n1@s.mrcs 1000\n")
    with pytest.raises(InputError, match="missing CTF column.*_rlnDefocusV"):
        read_particles(f, pixel_size=1.0)
    df = read_particles(f, pixel_size=1.0, require_ctf=False)
    assert "rlnDefocusV" not in df.columns and df["hr_index"].iloc[0] == 0
    f = _write(stackdir / "b.star", HDR)
    with pytest.raises(InputError, match="empty"):
        read_particles(f, pixel_size=1.0)
    f = _write(stackdir / "c.star", HDR.replace("_rlnVoltage", "_rlnDefocusU") + GOOD)
    with pytest.raises(InputError, match="duplicate column.*_rlnDefocusU"):
        read_particles(f, pixel_size=1.0)
    f = _write(stackdir / "d.star", "")
    with pytest.raises(InputError, match="no data blocks"):
        read_particles(f, pixel_size=1.0)
    f = _write(stackdir / "e.star", "data_x\n_rlnFoo 3\n")
    with pytest.raises(InputError, match="not a particle STAR"):
        read_particles(f)
    with pytest.raises(InputError, match="does not exist"):
        read_particles(stackdir / "nope.star")


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float16, np.float32])
def test_image_modes_read_as_float32(tmp_path, dtype):
    imgs = make_stack(tmp_path / "s.mrcs", 6, box=8, dtype=dtype)
    f = star30(
        tmp_path / "p.star", [f"{i}@s.mrcs" for i in (4, 2, 6)], ["rlnImagePixelSize"], [[1]] * 3
    )
    out = read_images(read_particles(f))
    assert out.dtype == np.float32 and out.shape == (3, 8, 8)
    np.testing.assert_array_equal(out, imgs[[3, 1, 5]].astype(np.float32))


def test_chunks_follow_input_order_across_stacks(tmp_path):
    a = make_stack(tmp_path / "a.mrcs", 5, seed=1)
    b = make_stack(tmp_path / "b.mrcs", 5, seed=2)
    order = [("a", 1), ("a", 2), ("b", 5), ("b", 1), ("a", 3), ("a", 5), ("b", 2)]
    f = star30(
        tmp_path / "p.star", [f"{i}@{s}.mrcs" for s, i in order], ["rlnImagePixelSize"], [[1]] * 7
    )
    table = read_particles(f)
    want = np.stack([(a if s == "a" else b)[i - 1] for s, i in order])
    got_pos, got = [], []
    for pos, imgs in iter_image_chunks(table, 3):
        assert len(pos) == len(imgs) <= 3 and imgs.dtype == np.float32
        got_pos.append(pos)
        got.append(imgs)
    np.testing.assert_array_equal(np.concatenate(got_pos), np.arange(7))
    np.testing.assert_array_equal(np.concatenate(got), want)


def test_nan_pixels_truncated_and_volume_stacks_are_refused(tmp_path):
    imgs = make_stack(tmp_path / "s.mrcs", 4)
    imgs[2, 3, 3] = np.nan
    with pytest.warns(RuntimeWarning, match="NaN"):  # mrcfile warns on writing NaN
        write_mrc(tmp_path / "n.mrcs", imgs, 1.0)
    f = star30(tmp_path / "p.star", ["1@n.mrcs", "3@n.mrcs"], ["rlnImagePixelSize"], [[1]] * 2)
    table = read_particles(f)
    first = next(iter_image_chunks(table, 1))[1]
    assert np.isfinite(first).all()
    with pytest.raises(InputError, match="NaN or Inf") as exc:
        read_images(table)
    assert "n.mrcs" in str(exc.value) and "image 3" in str(exc.value)

    write_mrc(tmp_path / "vol.mrc", np.zeros((16, 16, 16), np.float32), 1.0)
    f = star30(tmp_path / "v.star", ["1@vol.mrc"], ["rlnImagePixelSize"], [[1]])
    with pytest.raises(InputError, match="3D volume"):
        read_particles(f)

    raw = (tmp_path / "s.mrcs").read_bytes()
    (tmp_path / "t.mrcs").write_bytes(raw[:-100])
    f = star30(tmp_path / "t.star", ["1@t.mrcs"], ["rlnImagePixelSize"], [[1]])
    with pytest.raises(InputError, match="truncated"):
        read_particles(f)
    # truncated after the table was read (file replaced underneath): still clear
    g = star30(tmp_path / "u.star", ["1@u.mrcs"], ["rlnImagePixelSize"], [[1]])
    (tmp_path / "u.mrcs").write_bytes(raw)
    table = read_particles(g)
    (tmp_path / "u.mrcs").write_bytes(raw[:2000])
    with pytest.raises(InputError, match="u.mrcs"):
        read_images(table)


def test_single_image_files_without_at(tmp_path):
    write_mrc(tmp_path / "one.mrc", np.full((12, 12), 3.0, np.float32), 1.0)
    f = star30(tmp_path / "p.star", ["one.mrc"], ["rlnImagePixelSize"], [[1]])
    t = read_particles(f)
    assert t["hr_index"].iloc[0] == 0 and t["rlnImageSize"].iloc[0] == 12
    assert read_images(t)[0].mean() == 3.0


# ---------------------------------------------------------------------------------------
# Interop corpus
# ---------------------------------------------------------------------------------------

VALID = [
    # (file, project_dir relative to interop or None, expected rows)
    ("tomodrgn10076_project/both_sim_rln31.star", None, 1296),
    ("tomodrgn10076_project/data/10076_both_32_sim.star", "tomodrgn10076_project", 1296),
    ("tomodrgn10076_project/Class3D/job001/run_it004_data.star", None, 1296),
    ("tomodrgn10076_project/Project/classD_proj_ctf.star", None, 40),
    ("aspire/sample_particles_relion30.star", None, 17),
    ("aspire/sample_particles_relion31.star", None, 17),
    ("aspire/sample_relion_symmetry_group_D4.star", None, 17),
    ("cryodrgn/relion31.star", None, 5),
    ("cryodrgn/relion31.v2.star", None, 5),
    ("cryodrgn/empiar_10076_7.star", None, 7),
    ("cryodrgn/empiar_10076_7.cs", None, 7),
    ("cryodrgn/toy_projections.star", None, 1000),
    ("cryodrgn/toy_projections_dir.star", "cryodrgn/toy_datadir", 1000),
    ("cryodrgn/sta_testing_bin8.star", None, 219),
    ("cryojax/test_starfile.star", None, 3),
    ("simplecryoem/relion_proj_batch.star", None, 24),
    ("pyem_csparc2star/empiar_10076_7_csparc2star.star", "cryodrgn", 7),
]


@pytest.mark.parametrize("name, proj, n", VALID, ids=[v[0] for v in VALID])
def test_valid_interop_files_read(interop, name, proj, n):
    t = read_particles(interop / name, project_dir=interop / proj if proj else None)
    assert len(t) == n == count_particles(interop / name)
    assert set(CANONICAL_COLUMNS) <= set(t.columns)
    assert (t["rlnImagePixelSize"] > 0).all() and (t["rlnImageSize"] > 0).all()
    assert t["hr_index"].min() >= 0
    first = next(iter_image_chunks(t.iloc[:4], 4))[1]
    assert first.shape == (min(4, n), t["rlnImageSize"].iloc[0], t["rlnImageSize"].iloc[0])
    assert np.isfinite(first).all() and first.std() > 0


# Metadata-only reads (stacks absent from the corpus, or no CTF: sub-tomograms, pose-only tables).
META_ONLY = [
    ("cryocat/relion_3.0.star", 3, 5.364),
    ("cryocat/relion_3.1_optics.star", 3, 2.446),
    ("cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star", 5, 1.035),
    ("cryodrgn/cryosparc_P12_J24_001_particles.cs", 2019, 2.95),
    ("cryodrgn/cryosparc_J2_particles_exported.cs", 22, 1.345),
    ("starfile_teamtomo/historical_2020/optics_group_inter1965.star", 1, 1.04),
    ("cylindra/refine3d_run_it050_data.star", 5, None),
]


@pytest.mark.parametrize("name, n, pix", META_ONLY, ids=[m[0] for m in META_ONLY])
def test_metadata_only_interop_reads(interop, name, n, pix):
    t = read_particles(interop / name, check_images=False, require_ctf=False, pixel_size=1.0)
    assert len(t) == n == count_particles(interop / name)
    if pix is not None:
        assert t["rlnImagePixelSize"].iloc[0] == pytest.approx(pix, rel=1e-4)
    # and the full read refuses clearly (missing stacks / CTF / 3D images)
    with pytest.raises(InputError):
        read_particles(interop / name)


BROKEN = [
    ("aspire/sample.star", "different number of fields"),
    ("cryodrgn/toy_projections_13.star", "_rlnImageSize is 300 but the stack images are 30x30"),
    ("cryodrgn/relion5.star", "toy_images_a.mrcs' not found"),
    ("aspire/sample_incomplete_ctf_params.star", "missing CTF column.*_rlnVoltage"),
    ("tomodrgn10076_project/data/10076_both_32_clean.star", "missing CTF"),
    ("aspire/rln_proj_65.star", "missing CTF"),
    ("starfile_teamtomo/empty_loop.star", "empty"),
    ("starfile_teamtomo/postprocess.star", "not a particle STAR"),
    ("starfile_teamtomo/rln3.1_data_style.star", "several blocks"),
]


@pytest.mark.parametrize("name, pattern", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_interop_files_refused(interop, name, pattern):
    with pytest.raises(InputError, match=pattern) as exc:
        read_particles(interop / name)
    assert name.split("/")[-1] in str(exc.value)


def test_six_optics_groups_with_two_pixel_sizes_read(interop):
    t = read_particles(interop / "cryodrgn/relion31.6opticsgroups.star", check_images=False)
    px = t.groupby("rlnOpticsGroupName")["rlnImagePixelSize"].first().to_dict()
    assert px == {f"opticsGroup{i}": 1.24 if i in (3, 4) else 1.25 for i in range(1, 7)}
    assert set(t["rlnImageSize"]) == {196}
    t = read_particles(
        interop / "cryocat/relion_3.1_optics2.star", check_images=False, require_ctf=False
    )
    assert sorted(t.groupby("rlnOpticsGroup")["rlnImagePixelSize"].first()) == [2.446, 3.446]
    with pytest.raises(InputError, match="only 2D particle images"):
        read_particles(interop / "cryocat/relion_3.1_optics2.star", require_ctf=False)


def test_relion5_with_project_dir_hits_box_mismatch(interop):
    with pytest.raises(InputError, match="_rlnImageSize is 448"):
        read_particles(
            interop / "cryodrgn/relion5.star", project_dir=interop / "cryodrgn/toy_datadir"
        )


def test_relion30_and_31_versions_of_the_tomodrgn_set_agree(interop):
    p = interop / "tomodrgn10076_project"
    a = read_particles(p / "data/10076_both_32_sim.star", project_dir=p)
    b = read_particles(p / "both_sim_rln31.star")
    for col in (
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnVoltage",
        "rlnPhaseShift",
        "rlnImagePixelSize",
        "rlnImageSize",
        "hr_stack",
        "hr_index",
    ):
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=col)
    np.testing.assert_allclose(a["rlnOriginXAngst"], b["rlnOriginXAngst"], atol=1e-4)
    # images: class D is the first 576, class E the last 720
    assert (a["hr_stack"].str.contains("classD")).sum() == 576
    assert np.array_equal(read_images(a.iloc[570:582]), read_images(b.iloc[570:582]))


# ---------------------------------------------------------------- issue 13, items 2 and 4


@pytest.mark.parametrize(
    "col,value,expect",
    [
        (
            "rlnAmplitudeContrast",
            "1.5",
            r"_rlnAmplitudeContrast is 1.5; expected 0-1 \(a fraction, typically 0.07-0.1\)$",
        ),
        ("rlnAmplitudeContrast", "10", r"looks like a percentage: write 0.1"),
        ("rlnAmplitudeContrast", "-0.1", r"_rlnAmplitudeContrast is -0.1; expected 0-1"),
        (
            "rlnVoltage",
            "300000",
            r"_rlnVoltage is 300000; expected 60-400 kV .*looks like volts: write 300 \(kV\)",
        ),
        ("rlnVoltage", "30", r"_rlnVoltage is 30; expected 60-400 kV"),
        ("rlnSphericalAberration", "-2.7", r"expected 0-10 mm .*negative Cs is not physical"),
        ("rlnSphericalAberration", "2700", r"looks like micrometres: write 2.7 \(mm\)"),
        (
            "rlnDefocusU",
            "-15000",
            r"_rlnDefocusU is -15000; expected 0 or 100-200000 Angstrom .*underfocus positive",
        ),
        (
            "rlnDefocusV",
            "1.5",
            r"_rlnDefocusV is 1.5; .*looks like micrometres: write 15000 \(Angstrom\)",
        ),
        ("rlnDefocusU", "5e6", r"_rlnDefocusU is 5e\+06; expected 0 or 100-200000 Angstrom"),
    ],
)
def test_ctf_values_in_wrong_units_or_signs_are_refused(tmp_path, col, value, expect):
    """One line naming the file, the row, the field, the expected range (and the likely
    unit slip); 1.5 amplitude contrast used to give NaN maps, the rest silent damage."""
    make_stack(tmp_path / "s.mrcs", 3)
    f = star30(tmp_path / "p.star", ["1@s.mrcs", "2@s.mrcs", "3@s.mrcs"])
    a = read_particles(f)  # the good file reads
    assert a["rlnAmplitudeContrast"].between(0, 1).all()
    lines = f.read_text().splitlines()
    header = [ln.split()[0] for ln in lines if ln.startswith("_")]
    j = header.index("_" + col)
    first_row = next(i for i, ln in enumerate(lines) if ln.startswith("2@s.mrcs"))
    fields = lines[first_row].split()
    fields[j] = value
    lines[first_row] = " ".join(fields)
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=expect) as err:
        read_particles(f)
    assert err.value.where == f"row 2, _{col}"
    assert str(err.value).startswith(str(f))
    assert "\n" not in str(err.value)


def test_implausible_pixel_size_is_refused(tmp_path):
    make_stack(tmp_path / "s.mrcs", 2)
    f = star30(tmp_path / "p.star", ["1@s.mrcs", "2@s.mrcs"])
    with pytest.raises(
        InputError, match=r"pixel size 1e-10 A is out of range; expected 0.05-100"
    ) as e:
        read_particles(f, pixel_size=1e-10)
    assert e.value.where == "row 1, pixel size"


def test_duplicated_images_are_refused_naming_both_rows(tmp_path):
    """Same image twice (here spelled 2@ and 000002@): it used to be accepted and split
    across the half-sets, inflating the FSC."""
    make_stack(tmp_path / "s.mrcs", 4)
    f = star30(
        tmp_path / "p.star", ["1@s.mrcs", "2@s.mrcs", "3@s.mrcs", "000002@s.mrcs", "1@s.mrcs"]
    )
    with pytest.raises(InputError) as err:
        read_particles(f)
    msg = str(err.value)
    assert err.value.where == "row 4"
    assert "2 row(s) name an image already named by an earlier row" in msg
    assert f"row 4 repeats row 2 (image 2 of {tmp_path / 's.mrcs'})" in msg
    assert "relion_star_handler --remove_duplicates" in msg
    # the same index in two different stacks is two images
    make_stack(tmp_path / "t.mrcs", 4)
    ok = read_particles(star30(tmp_path / "q.star", ["1@s.mrcs", "1@t.mrcs"]))
    assert len(ok) == 2


def test_particle_loop_scan_follows_a_rewritten_file(tmp_path):
    """The line scan is cached per file and modification time: a file rewritten with other
    rows is scanned again; labels and counts come from the particle loop, data_particles
    preferred over another loop holding _rlnImageName."""
    import os

    from hetrefine.io.particles import particle_loop

    f = tmp_path / "p.star"

    def write(rows: int, mtime: int) -> None:
        lines = ["data_other", "loop_", "_rlnImageName #1", "1@a.mrcs", ""]
        lines += ["data_particles", "loop_", "_rlnImageName #1", "_rlnDefocusU #2"]
        lines += [f"{i + 1}@s.mrcs 10000" for i in range(rows)]
        f.write_text("\n".join(lines) + "\n")
        os.utime(f, ns=(mtime, mtime))

    write(3, 10**18)
    assert particle_loop(f) == (["rlnImageName", "rlnDefocusU"], 3)
    assert count_particles(f) == 3
    write(5, 2 * 10**18)
    assert count_particles(f) == 5
