"""A third hostile-user pass (issue 13): odd and broken inputs a real user gives, each with
the outcome the user sees locked in. Rows H1-H60 of ``docs/reliability.md`` name these
tests (``hostile::``).

Refusals are checked for their one line (file, row or field, what was expected);
accepted inputs are checked for what was read (the same images and numbers as the
plain form of the same data). Everything runs on a few 16 x 16 images, except the
tests that run the step functions on a small simulated set.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from hetrefine.config import defaults, validate_config
from hetrefine.errors import InputError
from hetrefine.io.cs import load_cs
from hetrefine.io.mrc import read_volume, stack_info, write_mrc
from hetrefine.io.particles import read_particles
from hetrefine.io.stacks import read_images
from hetrefine.steps import settings_for
from hetrefine.steps.preprocess import preprocess
from hetrefine.symmetry import symmetry_matrices

INTEROP = Path(__file__).resolve().parents[2] / "shared" / "interop"
if not INTEROP.is_dir():
    INTEROP = Path("/work/shared/interop")
TOMO = INTEROP / "tomodrgn10076_project"
needs_interop = pytest.mark.skipif(not TOMO.is_dir(), reason="needs ../shared/interop")

COLS = [
    "rlnImageName",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
]
CTF = "10000 9500 10 300 2.7 0.1 2.0"


def row(name: str, ctf: str = CTF) -> str:
    return f"{name} {ctf}"


def star(rows: list[str], cols: list[str] = COLS, head: str = "data_\n\nloop_\n") -> str:
    return head + "".join(f"_{c} #{i + 1}\n" for i, c in enumerate(cols)) + "\n".join(rows) + "\n"


PLAIN = star([row("1@s.mrcs"), row("2@s.mrcs")])
OPTICS = (
    "data_optics\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n_rlnVoltage\n"
    "_rlnSphericalAberration\n_rlnAmplitudeContrast\n_rlnImagePixelSize\n_rlnImageSize\n"
    "_rlnImageDimensionality\n{rows}\n\ndata_particles\nloop_\n_rlnImageName\n_rlnDefocusU\n"
    "_rlnDefocusV\n_rlnDefocusAngle\n_rlnOpticsGroup\n1@s.mrcs 10000 9000 5 {g1}\n"
    "2@s.mrcs 11000 9000 5 {g2}\n"
)


def write_stack(path: Path, data: np.ndarray, pixel: float = 2.0, stack: bool = True) -> None:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        if stack:
            m.set_image_stack()
        m.voxel_size = pixel


@pytest.fixture
def images(tmp_path) -> np.ndarray:
    """Four 16 x 16 images in ``tmp_path/s.mrcs`` (float32, 2 A)."""
    imgs = (np.random.default_rng(0).normal(size=(4, 16, 16)) * 20).astype(np.float32)
    write_stack(tmp_path / "s.mrcs", imgs)
    return imgs


def refused(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    """The message of an InputError (one line); asserts every fragment is in it."""
    assert isinstance(exc.value, InputError), type(exc.value)
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    print(f"\nmessage: {msg}")
    return msg


# ------------------------------------------------------------- STAR files: accepted


ACCEPTED_STAR = {
    "bom": "\ufeff" + PLAIN,
    "tabs": PLAIN.replace("1@s.mrcs ", "1@s.mrcs\t").replace(" 9500", "\t9500"),
    "comments": "# exported by hand\n" + star([row("1@s.mrcs"), "# a comment", row("2@s.mrcs")]),
    "block_named_otherwise": star([row("1@s.mrcs"), row("2@s.mrcs")], head="data_myset\nloop_\n"),
    "no_column_numbers_no_final_newline": "data_\nloop_\n"
    + "".join(f"_{c}\n" for c in COLS)
    + row("1@s.mrcs")
    + "\n"
    + row("2@s.mrcs"),
    "quoted_image_name": star(['"1@s.mrcs" ' + CTF, "'2@s.mrcs' " + CTF]),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED_STAR))
def test_odd_but_valid_star_files_read_like_the_plain_one(tmp_path, images, case):
    (tmp_path / "plain.star").write_text(PLAIN)
    (tmp_path / "odd.star").write_bytes(ACCEPTED_STAR[case].encode())
    plain, odd = read_particles(tmp_path / "plain.star"), read_particles(tmp_path / "odd.star")
    cols = ["hr_stack", "hr_index", "rlnDefocusU", "rlnVoltage", "rlnImagePixelSize"]
    assert odd[cols].equals(plain[cols])
    np.testing.assert_array_equal(read_images(odd), images[:2])


def test_single_particle_as_key_value_block_and_name_without_index(tmp_path, images):
    kv = "data_\n" + "".join(f"_{c} {v}\n" for c, v in zip(COLS, ["s.mrcs", *CTF.split()]))
    (tmp_path / "kv.star").write_text(kv)
    t = read_particles(tmp_path / "kv.star")
    assert len(t) == 1 and t["hr_index"].iloc[0] == 0  # no @: the first image, as in RELION
    np.testing.assert_array_equal(read_images(t), images[:1])


def test_relion31_two_optics_groups_same_pixel_different_voltage(tmp_path, images):
    rows = "1 g1 300 2.7 0.1 2.0 16 2\n2 g2 200 2.0 0.07 2.0 16 2"
    (tmp_path / "p.star").write_text(OPTICS.format(rows=rows, g1=1, g2=2))
    t = read_particles(tmp_path / "p.star")
    assert t["rlnVoltage"].tolist() == [300.0, 200.0]
    assert t["rlnSphericalAberration"].tolist() == [2.7, 2.0]
    assert t["rlnAmplitudeContrast"].tolist() == [0.1, 0.07]


# ------------------------------------------------------------- STAR files: refused


REFUSED_STAR = {
    "at_without_index": (
        star([row("@s.mrcs")]),
        ["(row 1)", "'@s.mrcs' is not of the form <index>@<stack>"],
    ),
    "negative_index": (star([row("-1@s.mrcs")]), ["(row 1)", "1-based (>= 1)"]),
    "fractional_index": (star([row("1.5@s.mrcs")]), ["(row 1)", "integer index"]),
    "pixel_size_0": (star([row("1@s.mrcs", CTF[:-3] + "0")]), ["(row 1)", "must be > 0"]),
    "pixel_size_negative": (
        star([row("1@s.mrcs", CTF[:-3] + "-2")]),
        ["(row 1)", "must be > 0 Angstrom, got -2.0"],
    ),
    "inf_in_a_ctf_column": (
        star([row("1@s.mrcs", CTF.replace("9500", "inf"))]),
        ["(row 1, _rlnDefocusV)", "must be finite, got inf"],
    ),
    "label_in_wrong_case": (
        star([row("1@s.mrcs")], cols=["rlnimagename", *COLS[1:]]),
        ["no block with an _rlnImageName column"],
    ),
    "two_particle_blocks": (
        star([row("1@s.mrcs")], head="data_a\nloop_\n")
        + star([row("2@s.mrcs")], head="\ndata_b\nloop_\n"),
        ["several blocks have an _rlnImageName column", "data_a, data_b"],
    ),
    "optics_group_0": (
        OPTICS.format(rows="0 g 300 2.7 0.1 2.0 16 2", g1=0, g2=0),
        ["(row 1)", "_rlnOpticsGroup must be an integer >= 1"],
    ),
    "empty_optics_table": (
        OPTICS.format(rows="", g1=1, g2=1),
        ["(data_optics)", "data_optics is empty"],
    ),
    "windows_path": (
        star([row("1@Extract\\job001\\s.mrcs")]),
        ["(row 1)", "the path has backslashes (Windows): write it with / instead"],
    ),
    "image_stack_is_a_folder": (
        star([row("1@folder.mrcs")]),
        ["(row 1)", "image stack 'folder.mrcs' not found"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_STAR))
def test_broken_star_files_refused_in_one_line(tmp_path, images, case):
    text, fragments = REFUSED_STAR[case]
    (tmp_path / "folder.mrcs").mkdir()
    (tmp_path / "p.star").write_text(text)
    with pytest.raises(InputError) as exc:
        read_particles(tmp_path / "p.star")
    refused(exc, "p.star", *fragments)


def test_star_file_not_in_utf8_is_named(tmp_path, images):
    """Latin-1 (a Windows editor) and UTF-16 (Notepad's 'Unicode'): was 'no data blocks
    found (empty file or not a STAR file)', which sent the user looking at the wrong thing."""
    latin1 = PLAIN.replace("data_\n", "data_\n# particules triées\n", 1).encode("latin-1")
    (tmp_path / "l.star").write_bytes(latin1)
    with pytest.raises(InputError) as exc:
        read_particles(tmp_path / "l.star")
    refused(exc, "l.star (line 2)", "byte 0xe9", "not UTF-8", "iconv -f latin1 -t utf-8")
    (tmp_path / "w.star").write_text(PLAIN, encoding="utf-16")
    with pytest.raises(InputError) as exc:
        read_particles(tmp_path / "w.star")
    refused(exc, "w.star", "is UTF-16 text", "iconv -f utf-16 -t utf-8")


def test_a_stack_or_cs_given_as_the_star_file(tmp_path, images):
    """Was 'no data blocks found (empty file or not a STAR file)'."""
    (tmp_path / "s_copy.mrcs").write_bytes((tmp_path / "s.mrcs").read_bytes())
    (tmp_path / "cs.star").write_bytes(cs_file(tmp_path / "p.cs").read_bytes())
    (tmp_path / "img.star").write_bytes((tmp_path / "s.mrcs").read_bytes())
    for name in ("s_copy.mrcs", "img.star"):
        with pytest.raises(InputError) as exc:
            read_particles(tmp_path / name)
        refused(exc, name, "is an MRC file (images or a map), not a particle STAR file")
    with pytest.raises(InputError) as exc:
        read_particles(tmp_path / "cs.star")
    refused(exc, "cs.star", "is a numpy file (a CryoSPARC .cs file?), not a STAR file: name it .cs")


@needs_interop
@pytest.mark.parametrize(
    "name, fragment",
    [
        ("Class3D/job001/run_it004_model.star", "data_model_general, data_model_classes"),
        ("Class3D/job001/run_it004_optimiser.star", "blocks: data_optimiser_general"),
        ("refs.star", "blocks: data_"),
    ],
)
def test_a_relion_model_optimiser_or_reference_list_given_as_particles(name, fragment):
    """Real RELION 3.1.3 outputs (not particle files) given as particles."""
    with pytest.raises(InputError) as exc:
        read_particles(TOMO / name)
    refused(exc, "not a particle STAR file", fragment)


# ------------------------------------------------------------- MRC stacks


def test_big_endian_stacks_read_like_little_endian(tmp_path, images):
    write_stack(tmp_path / "be.mrcs", images.astype(">f4"))
    write_stack(tmp_path / "be16.mrcs", np.round(images).astype(">i2"))
    assert open(tmp_path / "be.mrcs", "rb").read()[212:214] == b"\x11\x11"  # big-endian stamp
    (tmp_path / "p.star").write_text(star([row("1@be.mrcs"), row("2@be.mrcs"), row("3@be16.mrcs")]))
    got = read_images(read_particles(tmp_path / "p.star"))
    np.testing.assert_array_equal(got[:2], images[:2])
    np.testing.assert_array_equal(got[2], np.round(images[2]))


def test_extended_header_single_image_and_trailing_bytes_accepted(tmp_path, images):
    with mrcfile.new(tmp_path / "ext.mrcs") as m:  # an FEI-style extended header
        m.set_data(images)
        m.set_image_stack()
        m.set_extended_header(np.zeros(128, dtype=np.uint8))
    write_stack(tmp_path / "one.mrc", images[3], stack=False)  # one 2D image per file
    write_stack(tmp_path / "long.mrcs", images)
    with open(tmp_path / "long.mrcs", "ab") as fh:
        fh.write(b"\0" * 1000)
    rows = [row("2@ext.mrcs"), row("1@one.mrc"), row("4@long.mrcs")]
    (tmp_path / "p.star").write_text(star(rows))
    got = read_images(read_particles(tmp_path / "p.star"))
    np.testing.assert_array_equal(got, images[[1, 3, 3]])


def test_star_pixel_size_wins_over_the_stack_header(tmp_path, images):
    write_stack(tmp_path / "h3.mrcs", images, pixel=3.0)
    (tmp_path / "p.star").write_text(star([row("1@h3.mrcs")]))
    assert read_particles(tmp_path / "p.star")["rlnImagePixelSize"].iloc[0] == 2.0


def test_a_stack_of_3d_volumes_is_refused_as_particles(tmp_path):
    """Space group 401 (a stack of volumes, e.g. sub-tomograms): was accepted and read as
    (4, 16, 16, 16) 'images', which failed later in preprocess."""
    vols = np.random.default_rng(1).normal(size=(4, 16, 16, 16)).astype(np.float32)
    with mrcfile.new(tmp_path / "v.mrcs") as m:
        m.set_data(vols)
    (tmp_path / "p.star").write_text(star([row("1@v.mrcs")]))
    with pytest.raises(InputError) as exc:
        read_particles(tmp_path / "p.star")
    refused(exc, "v.mrcs", "stack of 4 3D volumes of 16x16x16 (space group 401)", "p.star")
    with pytest.raises(InputError) as exc:  # the same file given as an initial model
        read_volume(tmp_path / "v.mrcs")
    refused(exc, "v.mrcs", "expected one 3D map, got an array of shape (4, 16, 16, 16)")


def test_empty_stack_file(tmp_path):
    (tmp_path / "e.mrcs").write_bytes(b"")
    with pytest.raises(InputError) as exc:
        stack_info(tmp_path / "e.mrcs")
    refused(exc, "e.mrcs", "0 bytes, shorter than the 1024-byte MRC header")


# ------------------------------------------------------------- CryoSPARC .cs


def cs_file(path: Path, n: int = 4, drop=(), **values) -> Path:
    fields = [
        ("blob/path", "S32"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4"), ("blob/shape", "<u4", (2,)),
        ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/accel_kv", "<f4"),
        ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"),
    ]  # fmt: skip
    arr = np.zeros(n, dtype=[f for f in fields if f[0] not in drop])
    base = {
        "blob/path": b"s.mrcs", "blob/idx": np.arange(n), "blob/psize_A": 2.0, "blob/shape": 16,
        "ctf/df1_A": 10000, "ctf/df2_A": 9000, "ctf/df_angle_rad": 0.3, "ctf/accel_kv": 300,
        "ctf/cs_mm": 2.7, "ctf/amp_contrast": 0.1,
    }  # fmt: skip
    base.update({k.replace("__", "/"): v for k, v in values.items()})
    for k, v in base.items():
        if k in arr.dtype.names:
            arr[k] = v
    with open(path, "wb") as fh:
        np.save(fh, arr)
    return path


REFUSED_CS = {
    "index_past_the_end": (
        dict(blob__idx=[0, 1, 2, 9]),
        ["(row 4)", "image index 10 is past the end"],
    ),
    "empty_path": (dict(blob__path=b""), ["(row 1)", "has no stack path"]),
    "shape_disagrees_with_stack": (dict(blob__shape=32), ["(row 1)", "_rlnImageSize is 32"]),
    "pixel_size_0": (dict(blob__psize_A=0.0), ["(row 1)", "pixel size must be > 0"]),
    "angle_in_degrees": (
        dict(ctf__df_angle_rad=45.0),
        ["(row 1, ctf/df_angle_rad)", "45 looks like degrees: write 0.7854"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_CS))
def test_broken_cs_files_refused_in_one_line(tmp_path, images, case):
    values, fragments = REFUSED_CS[case]
    with pytest.raises(InputError) as exc:
        read_particles(cs_file(tmp_path / "p.cs", **values))
    refused(exc, "p.cs", *fragments)


def test_cs_without_pixel_size_takes_the_stack_header(tmp_path, images):
    t = read_particles(cs_file(tmp_path / "p.cs", drop=("blob/psize_A",)))
    assert t["rlnImagePixelSize"].iloc[0] == 2.0
    np.testing.assert_array_equal(read_images(t), images)


def test_files_that_are_no_cs_say_what_they_are(tmp_path):
    """A STAR file named .cs was answered with numpy's advice to load it 'unsafely using
    allow_pickle'; a pickled object array likewise."""
    (tmp_path / "t.cs").write_text(PLAIN)
    with pytest.raises(InputError) as exc:
        load_cs(tmp_path / "t.cs")
    msg = refused(exc, "t.cs", "is a text file (a STAR file: name it .star)")
    assert "allow_pickle" not in msg
    with open(tmp_path / "o.cs", "wb") as fh:
        np.save(fh, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError) as exc:
        load_cs(tmp_path / "o.cs")
    msg = refused(exc, "o.cs", "holds Python objects (pickled data), which are never loaded")
    assert "allow_pickle" not in msg
    np.savez(tmp_path / "z.npz", a=np.zeros(2))
    os.replace(tmp_path / "z.npz", tmp_path / "z.cs")
    with pytest.raises(InputError) as exc:
        load_cs(tmp_path / "z.cs")
    refused(exc, "z.cs", "is a zip archive (a numpy .npz?)")
    good = cs_file(tmp_path / "g.cs").read_bytes()
    (tmp_path / "cut.cs").write_bytes(good[:-30])
    with pytest.raises(InputError) as exc:
        load_cs(tmp_path / "cut.cs")
    refused(exc, "cut.cs", "not fully written")


# ------------------------------------------------------------- config


@pytest.mark.parametrize(
    "over, fragment",
    [
        ({"iteratons": 3}, "unknown key 'iteratons' (did you mean 'iterations'?)"),
        ({"mask": {"inner_diamter_A": 100}}, "did you mean 'mask.inner_diameter_A'?"),
        ({"iterations": 0}, "(key 'iterations'): 0 is less than the minimum of 1"),
        ({"iterations": "ten"}, "'ten' is not of type 'integer'"),
        ({"symmetry": "C1 "}, "(key 'symmetry'): 'C1 ' does not match"),
        ({"symmetry": 2}, "(key 'symmetry'): 2 is not of type 'string'"),
        ({"symmetry": "X"}, "(key 'symmetry'): 'X' does not match"),
        ({"device": "GPU"}, "'GPU' is not one of ['auto', 'cpu', 'gpu']"),
        ({"run": "my run"}, "(key 'run'): 'my run' does not match"),
        ({"run": "../up"}, "(key 'run'): '../up' does not match"),
        ({"pixel_size": 0}, "(key 'pixel_size'): 0 is less than or equal to the minimum of 0"),
    ],
)
def test_bad_config_values_refused_naming_the_key(over, fragment):
    with pytest.raises(InputError) as exc:
        validate_config({"particles": "p.star", "initial_models": ["a.mrc", "b.mrc"], **over})
    refused(exc, fragment)


@pytest.mark.parametrize("symbol, n", [("c2", 2), ("D1", 2), ("I2", 60), ("i3", 60), ("t", 12)])
def test_symmetry_spellings_accepted(symbol, n):
    assert validate_config({"symmetry": symbol})["symmetry"] == symbol
    assert len(symmetry_matrices(symbol)) == n


def test_a_config_key_given_twice_is_refused(tmp_path, capsys):
    """YAML keeps the last of two equal keys without a word: a `symmetry: C2` appended to a
    file that says `symmetry: C1` earlier ran C2 (and `iterations` likewise)."""
    from hetrefine.preflight import main
    from hetrefine.validation import check_config_files

    cfg = tmp_path / "config.yaml"
    cfg.write_text("symmetry: C1\nmask:\n  enabled: true\niterations: 8\nsymmetry: C2\n")
    with pytest.raises(InputError) as exc:
        check_config_files([cfg])
    refused(exc, "config.yaml (line 5)", "key 'symmetry' is given twice (first at line 1)")
    cfg.write_text("mask:\n  enabled: true\n  enabled: false\n")
    with pytest.raises(InputError) as exc:
        check_config_files([cfg])
    refused(exc, "(line 3)", "key 'enabled' is given twice (first at line 2)")
    assert main(["--config", str(cfg), "--no-measure"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ERROR: ") and "given twice" in err and len(err.splitlines()) == 1
    cfg.write_text("symmetry: C1\nmask:\n  enabled: true\n")
    check_config_files([cfg])  # one of each: fine


def test_the_workflow_checks_its_config_files_for_keys_given_twice():
    root = Path(__file__).resolve().parents[1]
    text = (root / "Snakefile").read_text()
    assert "hetrefine.validation.check_config_files(workflow.configfiles)" in text
    assert text.index("check_config_files") < text.index("validate_config(")


# ------------------------------------------------------------- through preprocess


def prep_tiny(tmp_path: Path, imgs: np.ndarray, extra: str = "", **over) -> Path:
    """``imgs`` as particles.star/s.mrcs (4 A) through preprocess; the shard file."""
    tmp_path.mkdir(exist_ok=True)
    write_stack(tmp_path / "s.mrcs", imgs.astype(np.float32), pixel=4.0)
    ctf = "10000 9500 10 300 2.7 0.1 4.0"
    (tmp_path / "p.star").write_text(star([row(f"{i + 1}@s.mrcs", ctf) for i in range(len(imgs))]))
    cfg = defaults()
    cfg.update(shard_size=1000, **over)
    pre = tmp_path / "pre"
    preprocess(
        str(tmp_path / "p.star"), str(pre / "info.json"), str(pre / "metadata.npz"),
        str(pre / "sample.npz"), [str(pre / "shard_0000.npz")], settings_for("preprocess", cfg),
    )  # fmt: skip
    return pre / "shard_0000.npz"


@pytest.mark.parametrize("scale", [1e-30, 1e-14, 1e30])
def test_images_on_any_grey_scale_preprocess_alike(tmp_path, scale):
    """Images stored at 1e-14 or 1e-30 (not in counts or electrons) were left at ~1e-30
    after normalising (an absolute 1e-12 guard took them for constant): every image blank
    to the engine, and the run ended 'converged' on nothing."""
    imgs = np.random.default_rng(0).normal(size=(40, 24, 24))
    ref = np.load(prep_tiny(tmp_path / "a", imgs))["images"]
    got = np.load(prep_tiny(tmp_path / "b", imgs * scale))["images"]
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


def test_config_pixel_size_that_disagrees_with_the_file(tmp_path):
    """`pixel_size: 4.4` with a STAR that says 4.0 was silently ignored."""
    imgs = np.random.default_rng(0).normal(size=(8, 24, 24))
    with pytest.raises(InputError) as exc:
        prep_tiny(tmp_path, imgs, pixel_size=4.4)
    refused(exc, "config (pixel_size)", "pixel_size is 4.4 A but p.star gives 4 A per pixel")
    assert not (tmp_path / "pre" / "info.json").exists()
    prep_tiny(tmp_path / "same", imgs, pixel_size=4.0)  # agreeing: fine


# ------------------------------------------------------------- initial models


@needs_interop
def test_a_real_map_whose_header_pixel_size_is_wrong(tmp_path, caplog):
    """tomodrgn's data/10076_classD_32.mrc says 1.0 A for the 13.1 A particles: it was
    resampled to a 2.4-voxel dot, silently (references correlating 0.07 with the right
    ones); the pre-flight only warned. Now both refuse it with the same line."""
    from hetrefine.preflight import run_preflight
    from hetrefine.steps.init_references import init_references
    from hetrefine.steps.mask import make_mask

    cfg = defaults()
    cfg.update(shard_size=500, project_dir=str(TOMO))
    pre = tmp_path / "preprocess"
    chunks = [str(pre / f"chunk_{c:05d}.npz") for c in range(3)]  # 1296 particles
    preprocess(
        str(TOMO / "data/10076_both_32_sim.star"), str(pre / "info.json"), str(pre / "metadata.npz"),
        str(pre / "sample.npz"), chunks, settings_for("preprocess", cfg),
    )  # fmt: skip
    make_mask(
        str(pre / "info.json"),
        str(tmp_path / "mask.mrc"),
        str(tmp_path / "mask_focus.mrc"),
        [],
        settings_for("mask", cfg),
    )
    wrong = [str(TOMO / "data/10076_classD_32.mrc"), str(TOMO / "ref_classE_13.1A.mrc")]
    with pytest.raises(InputError) as exc:
        init_references(
            wrong, str(pre / "info.json"), str(pre / "sample.npz"), str(tmp_path / "mask.mrc"),
            str(tmp_path / "r.npz"), str(tmp_path / "m.json"), settings_for("init_references", cfg),
        )  # fmt: skip
    msg = refused(
        exc,
        "10076_classD_32.mrc (initial model pixel size)",
        "the map spans 32 A (32 px at 1 A/px in its header) but the particle box spans 419.2 A",
        "--force_header_angpix 13.1",
    )
    assert not (tmp_path / "r.npz").exists()
    conf = {
        "particles": str(TOMO / "data/10076_both_32_sim.star"),
        "project_dir": str(TOMO),
        "initial_models": wrong,
        "device": "cpu",
    }
    rep = run_preflight(conf, measure=False)
    assert f"initial model: {msg}" in rep.errors, rep.errors


def test_model_extent_check_refuses_far_off_and_warns_near():
    from hetrefine.validation import check_model_extent

    assert check_model_extent("m.mrc", 64, 4.0, 64, 4.0) is None
    assert check_model_extent("m.mrc", 96, 4.0, 64, 4.0) is None  # a larger box: fine
    warn = check_model_extent("m.mrc", 24, 4.0, 64, 4.0)  # 96 A for 256 A: is it right?
    assert warn and "is the header pixel size right?" in warn
    for n, px in ((64, 0.9), (64, 17.0)):
        with pytest.raises(InputError, match="the header pixel size must be wrong"):
            check_model_extent("m.mrc", n, px, 64, 4.0)


def test_initial_model_10_percent_other_pixel_size_is_resampled(tmp_path, caplog):
    """A map at 4.4 A for 4.0 A particles (a re-scaled ab-initio job): resampled and said,
    and the references are those of the same object at 4.0 A."""
    from hetrefine.simulate import SimulationSpec, simulate_dataset
    from hetrefine.steps.init_references import init_references
    from hetrefine.steps.mask import make_mask

    d = tmp_path / "data"
    simulate_dataset(SimulationSpec(n_particles=60, box=24, pixel_size=4.0, seed=0), d)
    cfg = defaults()
    cfg.update(shard_size=100)
    pre = tmp_path / "pre"
    preprocess(
        str(d / "particles.star"), str(pre / "info.json"), str(pre / "metadata.npz"),
        str(pre / "sample.npz"), [str(pre / "shard_0000.npz")], settings_for("preprocess", cfg),
    )  # fmt: skip
    make_mask(
        str(pre / "info.json"),
        str(tmp_path / "mask.mrc"),
        str(tmp_path / "mask_focus.mrc"),
        [],
        settings_for("mask", cfg),
    )
    vol, _ = read_volume(d / "initial_model_01.mrc")
    # the same object sampled at 4.4 A: Fourier-crop 4.0 A x 44 px (176 A) to 40 px (176 A)
    f = np.fft.fftshift(np.fft.fftn(np.pad(vol, 10)))
    c = f[2:42, 2:42, 2:42]
    coarse = np.fft.ifftn(np.fft.ifftshift(c)).real.astype(np.float32)
    write_mrc(tmp_path / "m44.mrc", coarse, 4.4)

    def refs(models):
        out = tmp_path / f"r{len(list(tmp_path.glob('r*')))}"
        out.mkdir()
        init_references(
            [str(m) for m in models], str(pre / "info.json"), str(pre / "sample.npz"),
            str(tmp_path / "mask.mrc"), str(out / "r.npz"), str(out / "m.json"),
            settings_for("init_references", cfg),
        )  # fmt: skip
        return np.load(out / "r.npz")["maps"]

    native = refs([d / "initial_model_01.mrc", d / "initial_model_02.mrc"])
    with caplog.at_level(logging.INFO, logger="hetrefine"):
        other = refs([tmp_path / "m44.mrc", d / "initial_model_02.mrc"])
    assert any("m44.mrc: resampled from box 40 at 4.400 A/px" in r.message for r in caplog.records)
    a, b = native[0, 0].ravel(), other[0, 0].ravel()
    a, b = a - a.mean(), b - b.mean()
    assert a @ b / np.sqrt((a @ a) * (b @ b)) > 0.98


# ------------------------------------------------------------- runs and folders


def test_a_second_run_in_a_live_runs_folder_is_told_not_to_unlock(tmp_path, capsys):
    """Snakemake's LockException suggests --unlock, which would let both runs write the
    same files; the workflow now says what is going on first."""
    from hetrefine.workflow_locks import remove_stale_lock, snakemake_running_in

    lock_dir = tmp_path / ".snakemake" / "locks"
    lock_dir.mkdir(parents=True)
    (lock_dir / "0.input.lock").write_text("results/x\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "snakemake"], cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 10
        while not snakemake_running_in(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert remove_stale_lock(tmp_path) == 0
        err = capsys.readouterr().err
        assert f"another run (Snakemake, process {proc.pid}) is running in this folder" in err
        assert "Do not use --unlock while it runs" in err
        assert (lock_dir / "0.input.lock").exists()
    finally:
        proc.kill()
        proc.wait()


def test_the_workflow_start_counts_a_bom_star_and_names_what_the_reader_names(tmp_path, images):
    """The start-up count (``config.dataset_size``, before any job) refused a STAR with a
    UTF-8 BOM that the reader accepts ('no particle loop with an _rlnImageName column'),
    and a Latin-1 byte ended in a raw UnicodeDecodeError there."""
    from hetrefine.config import dataset_size

    def start(name: str):
        return dataset_size(validate_config({"particles": str(tmp_path / name)}), tmp_path)

    (tmp_path / "bom.star").write_text(
        "\ufeff" + OPTICS.format(rows="1 g 300 2.7 0.1 2 16 2", g1=1, g2=1)
    )
    assert start("bom.star") == (2, 16)
    latin1 = PLAIN.replace("data_\n", "data_\n# triées\n", 1).encode("latin-1")
    (tmp_path / "l.star").write_bytes(latin1)
    with pytest.raises(InputError) as exc:
        start("l.star")
    refused(exc, "l.star (line 2)", "byte 0xe9", "not UTF-8")
    (tmp_path / "w.star").write_text(PLAIN, encoding="utf-16")
    with pytest.raises(InputError) as exc:
        start("w.star")
    refused(exc, "w.star", "is UTF-16 text")
    with pytest.raises(InputError) as exc:
        start("s.mrcs")
    refused(exc, "s.mrcs", "is an MRC file (images or a map), not a particle STAR file")


def test_a_run_folder_that_is_not_writable_is_named_at_start(tmp_path, monkeypatch):
    """A read-only class folder in an existing run ended in Snakemake's raw PermissionError
    traceback (removing the old output before write_classes); a new run under a read-only
    results/ in Snakemake's 'Failed to create output directory'. Permission bits are what
    a user meets; the tests run as root, so os.access is what is replaced here."""
    from hetrefine.validation import check_writable

    run = tmp_path / "results" / "demo"
    (run / "class_001").mkdir(parents=True)
    (run / "iter_001" / "align").mkdir(parents=True)
    check_writable(run)
    check_writable(tmp_path / "results" / "new_run")  # not there yet: its parent is checked
    real = os.access
    locked = {run / "class_001", tmp_path / "results"}
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) not in locked and real(p, mode))
    with pytest.raises(InputError) as exc:
        check_writable(run)
    refused(exc, "class_001: folder is not writable by this user", "chmod -R u+w")
    with pytest.raises(InputError) as exc:
        check_writable(tmp_path / "results" / "new_run")
    refused(exc, "results: folder is not writable", "results/new_run")
    common = (Path(__file__).resolve().parents[1] / "workflow/rules/common.smk").read_text()
    assert "hetrefine.validation.check_writable(RUN)" in common


def test_a_schedule_whose_last_iteration_is_online_em_is_refused_at_start(tmp_path):
    """`iterations: 2` with `online_em_iterations: 5` and batches of 40 per class for 300
    particles ran every iteration, then write_classes failed with `<assignments>: 213 of
    300 particles are in no assignment shard`. A batch covering every particle is fine
    (the demo: iterations 2, the default 3 online iterations, 1000 per class)."""
    from hetrefine.preflight import run_preflight
    from hetrefine.simulate import SimulationSpec, simulate_dataset
    from hetrefine.validation import check_online_em

    with pytest.raises(InputError) as exc:
        check_online_em(2, 5, 40, 2, 300)
    msg = refused(
        exc,
        "config (online_em_iterations): every one of the 2 iteration(s) is online EM",
        "about 80 of the 300 particles",
        "set online_em_iterations to at most 1",
    )
    check_online_em(2, 3, 1000, 2, 120)  # the batch holds every particle
    check_online_em(8, 3, 40, 2, 300)  # the last iterations see every particle
    check_online_em(2, 1, 40, 2, 300)
    d = tmp_path / "data"
    simulate_dataset(SimulationSpec(n_particles=300, box=24, pixel_size=4.0, seed=0), d)
    conf = {
        "particles": str(d / "particles.star"),
        "initial_models": [str(d / "initial_model_01.mrc"), str(d / "initial_model_02.mrc")],
        "iterations": 2,
        "online_em_iterations": 5,
        "batch_size_per_class": 40,
        "device": "cpu",
    }
    assert f"online EM: {msg}" in run_preflight(conf, measure=False).errors
    common = (Path(__file__).resolve().parents[1] / "workflow/rules/common.smk").read_text()
    assert "hetrefine.validation.check_online_em(" in common


@pytest.mark.parametrize(
    "flag, what",
    [
        ("rlnCtfDataAreCtfPremultiplied", "premultiplied by their CTF"),
        ("rlnCtfDataArePhaseFlipped", "phase-flipped"),
    ],
)
def test_images_whose_ctf_was_applied_already_are_refused(tmp_path, flag, what):
    """RELION 3.1+ optics flag 1 (e.g. RELION 4 pseudo-subtomograms, a phase-flipping
    extraction; cylindra's real refine3d_run_it050_data.star has it): the CTF was applied
    a second time without a word. 0, as RELION writes it for ordinary particles, is fine."""
    from hetrefine.preflight import run_preflight

    imgs = np.random.default_rng(0).normal(size=(8, 24, 24)).astype(np.float32)
    write_stack(tmp_path / "s.mrcs", imgs, pixel=4.0)
    models = []
    for k in range(2):
        vol = np.random.default_rng(k).normal(size=(24, 24, 24)).astype(np.float32)
        write_mrc(tmp_path / f"m{k}.mrc", vol, 4.0)
        models.append(str(tmp_path / f"m{k}.mrc"))

    def star31(value: int) -> Path:
        path = tmp_path / f"p{value}.star"
        path.write_text(
            "data_optics\nloop_\n_rlnOpticsGroup\n_rlnVoltage\n_rlnSphericalAberration\n"
            f"_rlnAmplitudeContrast\n_rlnImagePixelSize\n_rlnImageSize\n_{flag}\n"
            f"1 300 2.7 0.1 4.0 24 {value}\n\ndata_particles\nloop_\n_rlnImageName\n"
            "_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n_rlnOpticsGroup\n"
            + "".join(f"{i + 1}@s.mrcs 10000 9500 10 1\n" for i in range(8))
        )
        return path

    cfg = defaults()
    cfg.update(shard_size=100)
    pre = tmp_path / "pre"

    def prep(path: Path) -> None:
        preprocess(
            str(path), str(pre / "info.json"), str(pre / "metadata.npz"), str(pre / "sample.npz"),
            [str(pre / "shard_0000.npz")], settings_for("preprocess", cfg),
        )  # fmt: skip

    with pytest.raises(InputError) as exc:
        prep(star31(1))
    msg = refused(exc, "p1.star (row 1, _" + flag + ")", f"these images are {what}", "twice")
    assert not (pre / "info.json").exists()
    conf = {"particles": str(star31(1)), "initial_models": models, "device": "cpu"}
    assert f"particles: {msg}" in run_preflight(conf, measure=False).errors
    prep(star31(0))
    assert (pre / "info.json").exists()
