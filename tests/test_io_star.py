"""STAR reading wrapper and the RELION 3.1 writer: round trips, layout, refusals."""

from __future__ import annotations

import re

import mrcfile
import numpy as np
import pandas as pd
import pytest

from hetrefine.errors import InputError
from hetrefine.io.particles import read_particles
from hetrefine.io.star import OPTICS_COLUMNS, read_star_blocks, write_particles_star


def _stack(path, n, box=16, pixel=1.5):
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.random.default_rng(0).normal(size=(n, box, box)).astype(np.float32))
        m.set_image_stack()
        m.voxel_size = pixel


def _star30(path, stack="s.mrcs", n=4):
    cols = [
        "rlnImageName",
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnMagnification",
        "rlnDetectorPixelSize",
        "rlnAngleRot",
        "rlnOriginX",
        "rlnGroupName",
    ]
    rows = [
        f"{i + 1}@{stack} {12000.5 + i} {11000.25 - i} {10 * i} 300 2.7 0.1 10000 1.5 {7.5 * i} "
        f"{i - 1.5} grp{i % 2}"
        for i in range(n)
    ]
    path.write_text(
        "data_\nloop_\n" + "\n".join("_" + c for c in cols) + "\n" + "\n".join(rows) + "\n"
    )
    return path


def test_relion30_to_31_round_trip(tmp_path):
    _stack(tmp_path / "s.mrcs", 4)
    a = read_particles(_star30(tmp_path / "in.star"))
    out = tmp_path / "out" / "ours.star"
    write_particles_star(out, a)
    blocks = read_star_blocks(out)
    assert list(blocks) == ["optics", "particles"]
    assert list(blocks["optics"].columns[: len(OPTICS_COLUMNS)]) == list(OPTICS_COLUMNS)
    assert not any(c.startswith("hr_") for c in blocks["particles"].columns)
    assert "rlnVoltage" not in blocks["particles"].columns
    b = read_particles(out)  # image names are absolute, so it reads from another folder
    cols = [
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnPhaseShift",
        "rlnCtfBfactor",
        "rlnImagePixelSize",
        "rlnImageSize",
        "rlnOpticsGroup",
        "hr_stack",
        "hr_index",
        "rlnAngleRot",
        "rlnOriginXAngst",
        "rlnGroupName",
    ]
    pd.testing.assert_frame_equal(a[cols], b[cols], check_dtype=False)
    assert a["rlnImagePixelSize"].iloc[0] == pytest.approx(1.5)
    np.testing.assert_allclose(a["rlnOriginXAngst"], (np.arange(4) - 1.5) * 1.5)


def test_two_optics_groups_round_trip_and_renumbering(tmp_path):
    _stack(tmp_path / "s.mrcs", 4)
    a = read_particles(_star30(tmp_path / "in.star"))
    a["rlnOpticsGroup"] = [7, 3, 7, 3]  # RELION wants 1..N: renumbered by rank on write
    a["rlnVoltage"] = [300.0, 200.0, 300.0, 200.0]
    write_particles_star(tmp_path / "o.star", a)
    opt = read_star_blocks(tmp_path / "o.star")["optics"]
    assert opt["rlnOpticsGroup"].tolist() == [1, 2]
    assert opt["rlnOpticsGroupName"].tolist() == ["opticsGroup3", "opticsGroup7"]
    assert opt["rlnVoltage"].tolist() == [200.0, 300.0]
    b = read_particles(tmp_path / "o.star")
    assert b["rlnOpticsGroup"].tolist() == [2, 1, 2, 1]
    assert b["rlnVoltage"].tolist() == [300.0, 200.0, 300.0, 200.0]


def test_write_is_byte_stable_and_refuses_inconsistent_groups(tmp_path):
    _stack(tmp_path / "s.mrcs", 4)
    a = read_particles(_star30(tmp_path / "in.star"))
    write_particles_star(tmp_path / "1.star", a)
    write_particles_star(tmp_path / "2.star", a)
    assert (tmp_path / "1.star").read_bytes() == (tmp_path / "2.star").read_bytes()
    a.loc[2, "rlnVoltage"] = 200.0  # same optics group, different voltage
    with pytest.raises(InputError, match="rlnVoltage differs"):
        write_particles_star(tmp_path / "3.star", a)
    assert not (tmp_path / "3.star").exists()
    with pytest.raises(InputError, match="no particles"):
        write_particles_star(tmp_path / "4.star", a.iloc[:0])


def test_keep_image_names(tmp_path):
    _stack(tmp_path / "s.mrcs", 4)
    a = read_particles(_star30(tmp_path / "in.star"))
    write_particles_star(tmp_path / "k.star", a, image_names="keep")
    names = read_star_blocks(tmp_path / "k.star")["particles"]["rlnImageName"].tolist()
    assert names == a["rlnImageName"].tolist()


def test_read_star_blocks_errors(tmp_path):
    (tmp_path / "rag.star").write_text("data_\nloop_\n_rlnA\n_rlnB\n1 2\n3 4 5\n")
    with pytest.raises(InputError, match="different number of fields") as exc:
        read_star_blocks(tmp_path / "rag.star")
    assert "rag.star" in str(exc.value) and "line" in str(exc.value)
    (tmp_path / "dup.star").write_text("data_x\nloop_\n_rlnA\n_rlnA\n1 2\n")
    with pytest.raises(InputError, match="duplicate column.*_rlnA") as exc:
        read_star_blocks(tmp_path / "dup.star")
    assert "data_x" in str(exc.value)
    (tmp_path / "bin.star").write_bytes(b"\xff\xfe\x00data_\x00\x81")
    with pytest.raises(InputError):
        read_star_blocks(tmp_path / "bin.star")
    with pytest.raises(InputError, match="does not exist"):
        read_star_blocks(tmp_path / "missing.star")
    kv = tmp_path / "kv.star"
    kv.write_text("data_general\n_rlnFinalResolution 3.5\n_rlnMaskName mask.mrc\n")
    blk = read_star_blocks(kv)["general"]
    assert blk.shape == (1, 2) and blk["rlnFinalResolution"].iloc[0] == 3.5


def test_interop_formatting_edge_cases_parse(interop):
    b = read_star_blocks(interop / "starfile_teamtomo/two_single_line_loop_blocks.star")
    assert [len(v) for v in b.values()] == [1, 1]
    b = read_star_blocks(interop / "cryocat/relion_3.1_optics.star")  # comment before loop_
    assert set(b) == {"optics", "particles"}
    with pytest.raises(InputError, match="different number of fields"):
        read_star_blocks(interop / "aspire/sample.star")


def test_stack_path_with_a_space_is_written_quoted_as_relion_does(tmp_path):
    """A space in a stack path (issue 13, item 1): the STAR file quotes the name, starfile
    reads it back whole, we read it back, and RELION (when on PATH) opens every image."""
    import shutil
    import subprocess

    import starfile

    folder = tmp_path / "my data" / "stacks 2"
    folder.mkdir(parents=True)
    _stack(folder / "part one.mrcs", 4)
    star = _star30(folder / "in.star", stack="part one.mrcs")
    star.write_text(re.sub(r"(?m)^(\d+@part one\.mrcs)", r'"\1"', star.read_text()))
    a = read_particles(star)
    out = tmp_path / "out" / "ours.star"
    write_particles_star(out, a)
    text = out.read_text()
    assert f'"000001@{folder}/part one.mrcs"' in text
    assert "\t" not in text
    names = starfile.read(out, always_dict=True)["particles"]["rlnImageName"]
    assert list(names) == [f"{i:06d}@{folder}/part one.mrcs" for i in range(1, 5)]
    b = read_particles(out)
    assert set(b["hr_stack"]) == {str(folder / "part one.mrcs")}
    np.testing.assert_array_equal(b["hr_index"], [0, 1, 2, 3])
    if shutil.which("relion_star_handler") is None:
        return
    # RELION's own parser: select rows by name, which needs every name read whole ...
    res = subprocess.run(
        ["relion_star_handler", "--i", str(out), "--o", "sel.star",
         "--select_by_str", "rlnImageName", "--select_include", "one.mrcs"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-1000:] + res.stderr[-1000:]
    back = starfile.read(tmp_path / "sel.star", always_dict=True)["particles"]
    assert list(back["rlnImageName"]) == list(names)
    # ... and reading every image through the quoted path
    res = subprocess.run(
        ["relion_reconstruct", "--i", str(out), "--o", "rec.mrc", "--maxres", "10"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-1000:] + res.stderr[-1000:]
    assert (tmp_path / "rec.mrc").stat().st_size > 1024


@pytest.mark.parametrize(
    "name,why",
    [("two  spaces", "two consecutive spaces"), ('quo"te', "double quote")],
)
def test_stack_names_relion_cannot_read_back_are_refused_at_read_time(tmp_path, name, why):
    folder = tmp_path / name
    folder.mkdir()
    _stack(folder / "s.mrcs", 4)
    with pytest.raises(InputError, match=why) as err:
        read_particles(_star30(folder / "in.star"))
    assert err.value.where == "row 1"


def test_other_text_columns_relion_cannot_read_back_are_refused_at_read_time(tmp_path):
    """A micrograph name with two spaces would only fail when the outputs are written."""
    _stack(tmp_path / "s.mrcs", 4)
    star = _star30(tmp_path / "in.star")
    star.write_text(star.read_text().replace("grp1", '"grp  1"'))
    with pytest.raises(
        InputError, match=r"_rlnGroupName = 'grp  1': RELION reads two consecutive spaces"
    ) as err:
        read_particles(star)
    assert err.value.where == "row 2, _rlnGroupName"
