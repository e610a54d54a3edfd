"""Final outputs (hetrefine.export) and the assignments gathered from shards (run_files):
STAR files with classes/poses, maps, FSC, zip."""

from __future__ import annotations

import json
import zipfile

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from hetrefine import export
from hetrefine.errors import InputError
from hetrefine.fsc import fsc_crossing
from hetrefine.io import run_files
from hetrefine.rotations import matrix_to_euler, random_rotations

N, K, D, PX = 60, 3, 16, 2.5


def make_table(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """A canonical particle table (optics merged, internal hr_* columns)."""
    return pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@Extract/stack.mrcs" for i in range(n)],
            "rlnDefocusU": rng.uniform(10000, 20000, n).round(2),
            "rlnDefocusV": rng.uniform(10000, 20000, n).round(2),
            "rlnDefocusAngle": rng.uniform(0, 180, n).round(2),
            "rlnVoltage": 300.0,
            "rlnSphericalAberration": 2.7,
            "rlnAmplitudeContrast": 0.1,
            "rlnPhaseShift": 0.0,
            "rlnCtfBfactor": 0.0,
            "rlnImagePixelSize": 1.25,
            "rlnImageSize": 32,
            "rlnOpticsGroup": 1,
            "rlnMicrographName": [f"mic{i % 4}.mrc" for i in range(n)],
            # input poses and a class from an earlier job: must be overwritten
            "rlnAngleRot": 11.0,
            "rlnClassNumber": 7,
            "rlnOriginX": 3.0,
            "hr_stack": "/abs/Extract/stack.mrcs",
            "hr_index": np.arange(n),
        }
    )


def make_assign(n: int, k: int, rng: np.random.Generator) -> dict:
    logits = rng.normal(size=(n, k)) * 3
    logits[np.arange(n), np.arange(n) % k] += 4  # every class gets particles
    post = np.exp(logits - logits.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    eul = matrix_to_euler(random_rotations(n * k, rng)).reshape(n, k, 3)
    return {
        "half": rng.integers(0, 2, n).astype(np.int8),
        "posterior": post.astype(np.float32),
        "euler": eul.astype(np.float32),
        "shift": rng.normal(scale=4, size=(n, k, 2)).astype(np.float32),
        "loglik": rng.normal(-1000, 50, (n, k)).astype(np.float32),
        "pose_peak": rng.uniform(0, 1, (n, k)).astype(np.float32),
    }


def write_shards(tmp_path, assign: dict, n_shards: int, rng) -> list[str]:
    n = assign["posterior"].shape[0]
    perm = rng.permutation(n)
    files = []
    for s, idx in enumerate(np.array_split(perm, n_shards)):
        f = tmp_path / f"shard_{s:04d}.npz"
        np.savez(f, index=idx.astype(np.int64), **{k: v[idx] for k, v in assign.items()})
        files.append(str(f))
    return files


@pytest.fixture
def run_inputs():
    rng = np.random.default_rng(42)
    table = make_table(N, rng)
    assign = make_assign(N, K, rng)
    refs = rng.normal(size=(K, 2, D, D, D)).astype(np.float32)
    hard = rng.normal(size=(K, D, D, D)).astype(np.float32)
    mask = np.ones((D, D, D), np.float32)
    s = np.arange(D // 2 + 1)
    fsc = [np.clip(1.0 - s / (3.0 + 1.5 * k), -0.2, 1.0) for k in range(K)]
    return table, assign, refs, hard, mask, fsc


# --------------------------------------------------------------------------- assemble


def test_assemble_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    assign = make_assign(N, K, rng)
    files = write_shards(tmp_path, assign, 4, rng)
    got = run_files.assemble_assignments(files, N)
    assert set(got) == set(run_files.ASSIGN_KEYS)
    for key, val in assign.items():
        np.testing.assert_array_equal(got[key], val, err_msg=key)


def test_assemble_missing_particle(tmp_path):
    rng = np.random.default_rng(1)
    files = write_shards(tmp_path, make_assign(N, K, rng), 3, rng)
    with pytest.raises(InputError, match="in no assignment shard"):
        run_files.assemble_assignments(files[:2], N)


def test_assemble_duplicate_particle_names_both_files(tmp_path):
    rng = np.random.default_rng(2)
    files = write_shards(tmp_path, make_assign(N, K, rng), 3, rng)
    with pytest.raises(InputError) as exc:
        run_files.assemble_assignments(files + [files[1]], N)
    assert "exactly one shard" in str(exc.value) and files[1] in str(exc.value)


def test_assemble_bad_shapes_and_ranges(tmp_path):
    rng = np.random.default_rng(3)
    a = make_assign(4, K, rng)
    f = tmp_path / "bad.npz"
    np.savez(f, index=np.array([0, 1, 2, 9]), **a)
    with pytest.raises(InputError, match="out of range") as exc:
        run_files.assemble_assignments([f], 4)
    assert "bad.npz" in str(exc.value)
    np.savez(f, index=np.arange(4), **{**a, "euler": a["euler"][:, :, :2]})
    with pytest.raises(InputError, match="'euler' must have shape"):
        run_files.assemble_assignments([f], 4)
    b = dict(a)
    del b["loglik"]
    np.savez(f, index=np.arange(4), **b)
    with pytest.raises(InputError, match="lacks"):
        run_files.assemble_assignments([f], 4)


# --------------------------------------------------------------------------- table


def test_particles_with_classes_columns(run_inputs):
    table, assign, *_ = run_inputs
    df = export.particles_with_classes(table, assign)
    assert not [c for c in df.columns if c.startswith("hr_")]
    assert "rlnOriginX" not in df.columns  # legacy pixel origin would contradict the new one
    cls = assign["posterior"].argmax(1)
    np.testing.assert_array_equal(df["rlnClassNumber"], cls + 1)
    rows = np.arange(N)
    np.testing.assert_allclose(
        df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]],
        assign["euler"][rows, cls],
        rtol=0,
        atol=1e-4,
    )
    np.testing.assert_allclose(
        df[["rlnOriginXAngst", "rlnOriginYAngst"]], assign["shift"][rows, cls], atol=1e-5
    )
    np.testing.assert_allclose(
        df["rlnLogLikeliContribution"], assign["loglik"][rows, cls], rtol=1e-6
    )
    np.testing.assert_allclose(
        df["rlnMaxValueProbDistribution"], assign["posterior"].max(1), rtol=1e-6
    )
    np.testing.assert_array_equal(df["rlnRandomSubset"], assign["half"] + 1)
    post_cols = [f"hrClassPosterior_{k + 1:03d}" for k in range(K)]
    np.testing.assert_allclose(df[post_cols], assign["posterior"], rtol=1e-6)
    # input columns kept, in their order, values untouched
    assert list(df.columns[:3]) == ["rlnImageName", "rlnDefocusU", "rlnDefocusV"]
    pd.testing.assert_series_equal(df["rlnMicrographName"], table["rlnMicrographName"])


# --------------------------------------------------------------------------- files


def test_write_final_outputs_round_trip(tmp_path, run_inputs):
    table, assign, refs, hard, mask, fsc = run_inputs
    written = export.write_final_outputs(table, assign, refs, hard, mask, fsc, PX, tmp_path)
    for paths in written.values():
        for p in paths:
            assert p.is_file() and p.stat().st_size > 0, p

    blocks = starfile.read(tmp_path / "particles_all.star", always_dict=True)
    assert set(blocks) == {"optics", "particles"}
    assert float(blocks["optics"]["rlnImagePixelSize"].iloc[0]) == 1.25  # the input pixel size
    allp = blocks["particles"]
    # every input row present once, in input order
    # absolute names (open from any folder); the names as given in rlnImageOriginalName
    assert list(allp["rlnImageOriginalName"]) == list(table["rlnImageName"])
    assert list(allp["rlnImageName"]) == [
        f"{i + 1:06d}@{s}" for i, s in zip(table["hr_index"], table["hr_stack"], strict=True)
    ]
    cls = assign["posterior"].argmax(1)
    np.testing.assert_array_equal(allp["rlnClassNumber"], cls + 1)
    rows = np.arange(N)
    np.testing.assert_allclose(
        allp[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]],
        assign["euler"][rows, cls],
        atol=2e-6 + 1e-4,
    )
    np.testing.assert_allclose(
        allp[["rlnOriginXAngst", "rlnOriginYAngst"]], assign["shift"][rows, cls], atol=1e-5
    )
    post_cols = [f"hrClassPosterior_{k + 1:03d}" for k in range(K)]
    np.testing.assert_allclose(allp[post_cols], assign["posterior"], atol=1e-6)
    np.testing.assert_array_equal(allp["rlnRandomSubset"], assign["half"] + 1)

    # class STARs partition the particles
    seen: list[str] = []
    for k in range(K):
        cp = starfile.read(tmp_path / f"class_{k + 1:03d}" / "particles.star", always_dict=True)[
            "particles"
        ]
        assert (cp["rlnClassNumber"] == k + 1).all()
        assert list(cp["rlnImageOriginalName"]) == list(table["rlnImageName"][cls == k])
        seen += list(cp["rlnImageOriginalName"])
    assert sorted(seen) == sorted(table["rlnImageName"])


def test_maps_headers_and_content(tmp_path, run_inputs):
    table, assign, refs, hard, mask, fsc = run_inputs
    export.write_final_outputs(table, assign, refs, hard, mask, fsc, PX, tmp_path)
    for k in range(K):
        cdir = tmp_path / f"class_{k + 1:03d}"
        expect = {
            "map.mrc": 0.5 * (refs[k, 0] + refs[k, 1]),
            "map_half_A.mrc": refs[k, 0],
            "map_half_B.mrc": refs[k, 1],
            "map_hard.mrc": hard[k],
        }
        for name, vol in expect.items():
            with mrcfile.open(cdir / name) as m:
                assert m.data.shape == (D, D, D)
                assert m.voxel_size.x == pytest.approx(PX)
                assert m.voxel_size.z == pytest.approx(PX)
                np.testing.assert_allclose(m.data, vol, atol=1e-6, err_msg=name)
        with mrcfile.open(cdir / "mask.mrc") as m:
            assert m.voxel_size.x == pytest.approx(PX)
            np.testing.assert_array_equal(m.data, mask)
    assert not (tmp_path / "mask.mrc").exists()  # the mask rule's output there is not touched


def test_no_hard_maps(tmp_path, run_inputs):
    table, assign, refs, _, mask, fsc = run_inputs
    export.write_final_outputs(table, assign, refs, None, mask, fsc, PX, tmp_path)
    assert (tmp_path / "class_001" / "map.mrc").is_file()
    assert not (tmp_path / "class_001" / "map_hard.mrc").exists()


def test_zip_contents_and_byte_stability(tmp_path, run_inputs):
    table, assign, refs, hard, mask, fsc = run_inputs
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        export.write_final_outputs(table, assign, refs, hard, mask, fsc, PX, d)
    with zipfile.ZipFile(a / "volumes_all.zip") as z:
        names = z.namelist()
        assert names == [f"class_{k + 1:03d}.mrc" for k in range(K)]
        for k, name in enumerate(names):
            assert z.read(name) == (a / f"class_{k + 1:03d}" / "map.mrc").read_bytes()
            assert z.getinfo(name).date_time == (1980, 1, 1, 0, 0, 0)
    # every file is byte-identical on a rerun
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_fsc_csv_and_resolution(tmp_path, run_inputs):
    table, assign, refs, hard, mask, fsc = run_inputs
    export.write_final_outputs(table, assign, refs, hard, mask, fsc, PX, tmp_path)
    for k in range(K):
        cdir = tmp_path / f"class_{k + 1:03d}"
        csv = export.read_fsc_csv(cdir / "fsc.csv")
        assert list(csv.columns) == ["shell", "resolution_A", "fsc"]
        np.testing.assert_array_equal(csv["shell"], np.arange(D // 2 + 1))
        np.testing.assert_allclose(csv["fsc"], fsc[k], atol=1e-6)
        np.testing.assert_allclose(
            csv["resolution_A"][1:], D * PX / np.arange(1, D // 2 + 1), rtol=1e-4
        )
        # fsc = 1 - s/c crosses 0.143 at s = c * (1 - 0.143) exactly (linear between shells)
        c = 3.0 + 1.5 * k
        info = json.loads((cdir / "resolution.json").read_text())
        assert info["resolution_0143_A"] == pytest.approx(D * PX / (c * (1 - 0.143)), rel=1e-9)
        assert info["resolution_05_A"] == pytest.approx(D * PX / (c * 0.5), rel=1e-9)
        assert info["n_particles_hard"] == int((assign["posterior"].argmax(1) == k).sum())
        # the crossing read off the csv lies between the two shells around 0.143
        below = int(np.flatnonzero(csv["fsc"].to_numpy()[1:] < 0.143)[0]) + 1
        assert (
            csv["resolution_A"][below]
            <= info["resolution_0143_A"]
            <= csv["resolution_A"][below - 1]
        )


def test_fsc_crossing_edge_cases():
    assert fsc_crossing(np.ones(9), 16, 2.0) == pytest.approx(16 * 2.0 / 8)  # Nyquist
    assert fsc_crossing(np.array([1.0, 0.0, 0.0]), 16, 2.0) == pytest.approx(32.0)


def test_empty_class_gets_a_readable_star(tmp_path, run_inputs):
    table, assign, refs, hard, mask, fsc = run_inputs
    assign = dict(assign)
    post = assign["posterior"].copy()
    post[:, 2] = 0.0  # nobody in class 3
    post /= post.sum(1, keepdims=True)
    assign["posterior"] = post
    export.write_final_outputs(table, assign, refs, hard, mask, fsc, PX, tmp_path)
    blocks = starfile.read(tmp_path / "class_003" / "particles.star", always_dict=True)
    assert len(blocks["particles"]) == 0
    assert "rlnClassNumber" in blocks["particles"].columns
    assert float(blocks["optics"]["rlnImagePixelSize"].iloc[0]) == 1.25
    info = json.loads((tmp_path / "class_003" / "resolution.json").read_text())
    assert info["n_particles_hard"] == 0


def test_write_final_outputs_rejects_mismatched_inputs(tmp_path, run_inputs):
    table, assign, refs, hard, mask, fsc = run_inputs
    with pytest.raises(ValueError, match="posterior"):
        export.write_final_outputs(table.iloc[:10], assign, refs, hard, mask, fsc, PX, tmp_path)
    with pytest.raises(ValueError, match="one FSC per class"):
        export.write_final_outputs(table, assign, refs, hard, mask, fsc[:1], PX, tmp_path)


def test_particles_all_cs_for_cryosparc(tmp_path):
    """particles_all.cs carries every class's pose, shift and posterior in CryoSPARC's
    hetero-refinement fields, consistent with the STAR file's best-class pose."""
    import numpy as np
    from scipy.spatial.transform import Rotation

    from hetrefine.export import particles_with_classes, write_cs
    from hetrefine.io.cs import load_cs
    from hetrefine.rotations import euler_to_matrix

    rng = np.random.default_rng(0)
    n, k = 7, 3
    table = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@/data/s.mrcs" for i in range(n)],
            "hr_stack": "/data/s.mrcs",
            "hr_index": np.arange(n),
            "rlnImageSize": 64,
            "rlnImagePixelSize": 1.5,
            "rlnOpticsGroup": 1,
            "rlnVoltage": 300.0,
            "rlnSphericalAberration": 2.7,
            "rlnAmplitudeContrast": 0.1,
            "rlnDefocusU": 15000.0,
            "rlnDefocusV": 14000.0,
            "rlnDefocusAngle": 30.0,
            "rlnPhaseShift": 0.0,
            "rlnCtfBfactor": 0.0,
        }
    )
    post = rng.dirichlet(np.ones(k), n).astype(np.float32)
    assign = {
        "half": rng.integers(0, 2, n),
        "posterior": post,
        "euler": rng.uniform([-180, 0, -180], [180, 180, 180], (n, k, 3)).astype(np.float32),
        "shift": rng.normal(0, 3, (n, k, 2)).astype(np.float32),
        "loglik": rng.normal(size=(n, k)).astype(np.float32),
        "pose_peak": np.ones((n, k), np.float32),
    }
    df = particles_with_classes(table, assign)
    write_cs(tmp_path / "p.cs", table, df, assign)
    cs = load_cs(tmp_path / "p.cs")
    assert len(cs) == n
    best = post.argmax(1)
    assert np.array_equal(cs["alignments3D/class"], best)
    for j in range(k):
        mats = Rotation.from_rotvec(cs[f"alignments_class_{j}/pose"]).as_matrix().transpose(0, 2, 1)
        np.testing.assert_allclose(mats, euler_to_matrix(assign["euler"][:, j]), atol=1e-5)
        np.testing.assert_allclose(
            cs[f"alignments_class_{j}/shift"], assign["shift"][:, j] / 1.5, atol=1e-5
        )
        np.testing.assert_allclose(cs[f"alignments_class_{j}/class_posterior"], post[:, j])
    # the best class's pose is also alignments3D, as CryoSPARC's own outputs have it
    best_pose = np.stack([cs[f"alignments_class_{b}/pose"][i] for i, b in enumerate(best)])
    r1 = Rotation.from_rotvec(cs["alignments3D/pose"]).as_matrix()
    r2 = Rotation.from_rotvec(best_pose).as_matrix()
    np.testing.assert_allclose(r1, r2, atol=1e-4)


def test_full_box_maps_keep_the_refinement_map_within_its_nyquist(tmp_path, run_inputs):
    """Refined at box 16 and 2.5 A/px from particles of box 32 at 1.25 A/px: each class
    also gets its map and half-maps at 32 px and 1.25 A/px, whose Fourier components up to
    the refinement box's Nyquist are the refinement map's (FSC 1 there)."""
    from hetrefine.fourier import fourier_resize
    from hetrefine.fsc import fsc

    table, assign, refs, hard, mask, fsc_curves = run_inputs
    export.write_final_outputs(
        table, assign, refs, hard, mask, fsc_curves, PX, tmp_path, full_box=(2 * D, PX / 2)
    )
    for k in range(K):
        cdir = tmp_path / f"class_{k + 1:03d}"
        for name, half in (("map", None), ("map_half_A", 0), ("map_half_B", 1)):
            with mrcfile.open(cdir / f"{name}_full_box.mrc") as m:
                big = m.data.copy()
                assert big.shape == (2 * D,) * 3 and m.voxel_size.x == pytest.approx(PX / 2)
            with mrcfile.open(cdir / f"{name}.mrc") as m:
                small = m.data.copy()
            back = fourier_resize(big, D, ndim=3)
            curve = fsc(back, small)
            assert curve[1 : D // 2].min() > 0.9999, (name, curve)
            if half is not None:
                np.testing.assert_allclose(small, refs[k, half], atol=1e-6)


def test_no_full_box_maps_without_cropping(tmp_path, run_inputs):
    table, assign, refs, hard, mask, fsc_curves = run_inputs
    export.write_final_outputs(table, assign, refs, hard, mask, fsc_curves, PX, tmp_path)
    assert not list(tmp_path.rglob("*full_box*"))


def test_angdist_bild_points_along_the_viewing_directions():
    """BILD cylinders (RELION's _angdist.bild, for ChimeraX) start on the sphere of the
    given radius around the map's centre, point outwards along the views, and the most
    populated bin has the longest, reddest one."""
    from hetrefine.orientations import angdist_bild

    # 300 particles seen down +z (tilt 0), 100 from the side (tilt 90, rot 0 -> +x)
    euler = np.array([[0.0, 0.0, 10.0]] * 300 + [[0.0, 90.0, -40.0]] * 100)
    text = angdist_bild(euler, box=40, pixel_size=2.0, radius_A=30.0)
    lines = text.strip().splitlines()
    cyl = np.array(
        [[float(v) for v in line.split()[1:]] for line in lines if line.startswith(".cylinder")]
    )
    col = np.array(
        [[float(v) for v in line.split()[1:]] for line in lines if line.startswith(".color")]
    )
    assert len(cyl) == 2 and len(col) == 2
    centre = np.full(3, 40.0)  # box * pixel / 2
    for c in cyl:
        start, end = c[:3] - centre, c[3:6] - centre
        assert np.linalg.norm(start) == pytest.approx(30.0, abs=0.05)
        assert np.dot(start, end - start) > 0  # outwards
    lengths = np.linalg.norm(cyl[:, 3:6] - cyl[:, :3], axis=1)
    up = int(np.argmax(cyl[:, 2]))  # the +z cylinder
    assert (cyl[up, :3] - centre)[2] == pytest.approx(30.0, abs=1.5)
    assert lengths[up] > lengths[1 - up] and col[up, 0] > col[1 - up, 0]
    assert angdist_bild(np.zeros((0, 3)), 40, 2.0, 30.0) == "\n"


def test_per_particle_scale_is_written_at_the_chosen_class(tmp_path):
    rng = np.random.default_rng(5)
    table, assign = make_table(N, rng), make_assign(N, K, rng)
    assert "hrIntensityScale" not in export.particles_with_classes(table, assign).columns
    assign["scale"] = rng.uniform(0.7, 1.3, (N, K)).astype(np.float32)
    files = write_shards(tmp_path, assign, 3, rng)
    got = run_files.assemble_assignments(files, N)
    np.testing.assert_array_equal(got["scale"], assign["scale"])
    df = export.particles_with_classes(table, got)
    cls = df["rlnClassNumber"].to_numpy() - 1
    np.testing.assert_allclose(
        df["hrIntensityScale"], assign["scale"][np.arange(N), cls], rtol=1e-6
    )


def test_fit_score_in_outputs_and_flagged_left_out(tmp_path):
    """hrFitScore and the junk flag in particles_all (STAR and .cs); flagged particles
    are in no class file."""
    from hetrefine.io.cs import load_cs

    rng = np.random.default_rng(5)
    table, assign = make_table(N, rng), make_assign(N, K, rng)
    assign["fit_score"] = rng.normal(size=N).astype(np.float32)
    assign["fit_score"][:7] = -8.0
    refs = rng.normal(size=(K, 2, 16, 16, 16)).astype(np.float32)
    mask = np.ones((16, 16, 16), np.float32)
    fsc = [np.linspace(1, 0, 9)] * K
    export.write_final_outputs(
        table, assign, refs, None, mask, fsc, PX, tmp_path, junk_fit_score=-4.0
    )
    allp = starfile.read(tmp_path / "particles_all.star", always_dict=True)["particles"]
    np.testing.assert_allclose(allp["hrFitScore"], assign["fit_score"], atol=1e-5)
    np.testing.assert_array_equal(allp["hrJunkByFitScore"], (assign["fit_score"] < -4).astype(int))
    cs = load_cs(tmp_path / "particles_all.cs")
    np.testing.assert_allclose(cs["hetrefine/fit_score"], assign["fit_score"])
    kept = 0
    for k in range(K):
        cdir = tmp_path / f"class_{k + 1:03d}"
        cp = starfile.read(cdir / "particles.star", always_dict=True)["particles"]
        assert (cp["hrFitScore"] >= -4).all()
        assert len(load_cs(cdir / "particles.cs")) == len(cp)
        assert json.loads((cdir / "resolution.json").read_text())["n_particles_hard"] == len(cp)
        kept += len(cp)
    assert kept == N - 7
