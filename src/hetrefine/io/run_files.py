"""A run's files: where each one is (the layout), and one reader and writer per file.

The workflow (``workflow/rules/common.smk``), the step modules, the one-process
driver (``hetrefine.pipeline``), the pre-flight and the tests all take paths from
:class:`RunLayout` and read and write the intermediate files through the
functions here, so a file's name and contents are defined once. Every reader
checks what it reads (keys, shapes) and names the file when something is off.
No file holds pickled objects: arrays are ``.npz`` read with
``allow_pickle=False``, the particle table is an ``.npz`` of plain columns,
statistics are JSON.

Layout under ``results/<run>/`` (``{it}`` 3 digits, 000 = initial references;
``{s}`` shard, 4 digits; ``{c}`` chunk, 5 digits; ``{l}``/``{n}`` a node of the sums
tree: level from 1, node 4 digits)::

    preprocess/info.json            box, pixel size, counts        (read_info)
    preprocess/metadata.npz         the input particle table       (read_metadata)
    preprocess/sample.npz           seeded image sample for init   (read_sample)
    preprocess/chunk_{c}.npz        images, index, half, CTF       (read_shard)
    mask.mrc                        refinement mask (soft sphere)
    mask_focus.mrc                  the references' mask for alignment/classification (mask.file,
                                    else the solvent mask with mask.solvent, else the sphere)
    iter_{it}/references.npz        half-maps per class            (read_references)
    iter_{it}/model.json            statistics of the iteration    (read_model)
    iter_{it}/align/shard_{s}.npz   posteriors and poses           (read_assignments)
    iter_{it}/align/shard_{s}.sums.npz   backprojection sums       (read_sums)
    iter_{it}/sums/tree_{l}_{n}.sums.npz  sums of several files    (read_sums)
    final/hard_{s}.sums.npz         hard-assignment sums           (read_sums)
    final/sums/tree_{l}_{n}.sums.npz      sums of several files    (read_sums)
    class_{k}/...                   per-class outputs (hetrefine.export)
    plots/...                       figures (hetrefine.plots)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hetrefine.errors import InputError
from hetrefine.io.atomic import atomic_path, write_text

PathLike = str | os.PathLike


def _it(it: int | str) -> str:
    return f"{it:03d}" if isinstance(it, int) else str(it)


def _shard(s: int | str) -> str:
    return f"{s:04d}" if isinstance(s, int) else str(s)


def _chunk(c: int | str) -> str:
    return f"{c:05d}" if isinstance(c, int) else str(c)


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run's files under ``root`` (``results/<run>``).

    Iterations and shards are ints (formatted with their zero padding) or
    strings passed through as they are (Snakemake wildcard patterns such as
    ``"{it}"``).
    """

    root: str

    def _p(self, *parts: str) -> str:
        return "/".join([str(self.root), *parts])

    @property
    def info(self) -> str:
        return self._p("preprocess", "info.json")

    @property
    def metadata(self) -> str:
        return self._p("preprocess", "metadata.npz")

    @property
    def sample(self) -> str:
        return self._p("preprocess", "sample.npz")

    @property
    def mask(self) -> str:
        return self._p("mask.mrc")

    @property
    def focus_mask(self) -> str:
        """The references' mask: ``mask.file`` at the refinement box; without one, the
        solvent mask (``mask.solvent``) or the spherical mask."""
        return self._p("mask_focus.mrc")

    def chunk(self, c: int | str) -> str:
        """Preprocessed chunk ``c``: the particles an align job reads at a time."""
        return self._p("preprocess", f"chunk_{_chunk(c)}.npz")

    def references(self, it: int | str) -> str:
        return self._p(f"iter_{_it(it)}", "references.npz")

    def model(self, it: int | str) -> str:
        return self._p(f"iter_{_it(it)}", "model.json")

    def assignments(self, it: int | str, s: int | str) -> str:
        return self._p(f"iter_{_it(it)}", "align", f"shard_{_shard(s)}.npz")

    def sums(self, it: int | str, s: int | str) -> str:
        return self._p(f"iter_{_it(it)}", "align", f"shard_{_shard(s)}.sums.npz")

    def hard_sums(self, s: int | str) -> str:
        return self._p("final", f"hard_{_shard(s)}.sums.npz")

    def tree_sums(self, stage: str, level: int | str, node: int | str) -> str:
        """Node ``node`` of level ``level`` of a sums tree: the sum of several files of the
        level below; ``stage`` is ``iter_{it}`` (an iteration's sums) or ``final`` (hard)."""
        return self._p(stage, "sums", f"tree_{level}_{_shard(node)}.sums.npz")

    @staticmethod
    def iteration_stage(it: int | str) -> str:
        """The ``stage`` of :meth:`tree_sums` for iteration ``it``."""
        return f"iter_{_it(it)}"

    def class_dir(self, k: int | str) -> str:
        """Folder of 1-based class ``k`` (``class_001``)."""
        return self._p(f"class_{k:03d}" if isinstance(k, int) else f"class_{k}")

    def plot(self, name: str, ext: str) -> str:
        return self._p("plots", f"{name}.{ext}")


# ----------------------------------------------------------------------------- generic


def save_npz(path: PathLike, **arrays) -> None:
    """Arrays into ``path`` (``.npz``, uncompressed), atomically."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def load_npz(path: PathLike, required: Sequence[str] = (), what: str = "file") -> dict:
    """Every array of an ``.npz`` (no pickled objects); ``required`` keys must be there."""
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise InputError(path, f"{what} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read {what} as .npz ({exc})") from None
    missing = [k for k in required if k not in out]
    if missing:
        raise InputError(path, f"{what} lacks array(s) {missing}")
    return out


def write_json(path: PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: PathLike, required: Sequence[str] = (), what: str = "file") -> dict:
    try:
        with open(path) as fh:
            out = json.load(fh)
    except FileNotFoundError:
        raise InputError(path, f"{what} does not exist") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"{what} is not valid JSON ({exc})") from None
    missing = [k for k in required if k not in out]
    if missing:
        raise InputError(path, f"{what} lacks key(s) {missing}")
    return out


# ----------------------------------------------------------------------------- preprocess

INFO_KEYS = ("n_particles", "n_chunks", "box", "pixel_size", "input_box", "input_pixel_size")


def write_info(path: PathLike, info: dict) -> None:
    write_json(path, info)


def read_info(path: PathLike) -> dict:
    """Preprocess's summary: ``box``/``pixel_size`` (refinement), ``input_box``,
    ``input_pixel_size``, ``n_particles``, ``n_chunks``."""
    return read_json(path, INFO_KEYS, "preprocess info")


SHARD_KEYS = ("images", "index", "half", "ctf")


def write_shard(
    path: PathLike, images, index, half, ctf, euler=None, origin_A=None, group=None
) -> None:
    """One shard: ``images`` (n, D, D) float32 normalised, ``index`` (n,) rows of the
    particle table, ``half`` (n,) 0/1, ``ctf`` (n, 8) (``hetrefine.ctf.CTF_FIELDS``),
    optionally the input poses ``euler`` (n, 3) degrees and ``origin_A`` (n, 2), and
    with several optics groups ``group`` (n,) each particle's group position 0..G-1."""
    extra = {} if euler is None else {"euler": euler, "origin_A": origin_A}
    if group is not None:
        extra["group"] = group
    save_npz(path, images=images, index=index, half=half, ctf=ctf, **extra)


def read_shard(path: PathLike) -> dict:
    d = load_npz(path, SHARD_KEYS, "particle shard")
    n = len(d["index"])
    if (
        d["images"].ndim != 3
        or len(d["images"]) != n
        or d["ctf"].shape != (n, 8)
        or len(d["half"]) != n
    ):
        raise InputError(path, f"particle shard arrays disagree in length ({n} particles)")
    return d


def write_sample(path: PathLike, images, index, ctf, group=None) -> None:
    extra = {} if group is None else {"group": group}
    save_npz(path, images=images, index=index, ctf=ctf, **extra)


def read_sample(path: PathLike) -> dict:
    """The seeded image sample (``images``, ``index``, ``ctf``) for init; a shard file works too."""
    return load_npz(path, ("images", "ctf"), "image sample")


_COLUMNS = "__columns__"


def write_metadata(path: PathLike, table: pd.DataFrame) -> None:
    """The particle table as plain columns (numbers as they are, text as fixed-width
    unicode): a format that cannot carry code, unlike a pickle."""
    cols = {}
    for i, name in enumerate(table.columns):
        v = table[name].to_numpy()
        if v.dtype == object:
            v = np.asarray([str(x) for x in v], dtype=str)
        cols[f"c{i}"] = v
    save_npz(path, **cols, **{_COLUMNS: np.asarray([str(c) for c in table.columns], dtype=str)})


def read_metadata(path: PathLike) -> pd.DataFrame:
    d = load_npz(path, (_COLUMNS,), "particle metadata")
    names = [str(c) for c in d[_COLUMNS]]
    data = {}
    for i, name in enumerate(names):
        v = d[f"c{i}"]
        data[name] = v.astype(object) if v.dtype.kind == "U" else v
    return pd.DataFrame(data, columns=names)


# ----------------------------------------------------------------------------- iterations

MODEL_KEYS = (
    "iteration",
    "box",
    "pixel_size",
    "n_classes",
    "class_fractions",
    "sigma2",
    "res_limit_px",
)


def write_model(path: PathLike, model: dict) -> None:
    write_json(path, model)


def read_model(path: PathLike) -> dict:
    """One iteration's statistics (``model.json``): box, pixel size, class fractions,
    noise spectrum ``sigma2``, resolution limit, FSC, ..."""
    return read_json(path, MODEL_KEYS, "iteration statistics")


def write_references(path: PathLike, maps, num=None, wgt=None) -> None:
    """Half-maps (K, 2, D, D, D) float32; with online-EM decay also the sums (cubes)."""
    extra = {} if num is None else {"num": num, "wgt": wgt}
    save_npz(path, maps=maps, **extra)


def read_references(path: PathLike) -> dict:
    d = load_npz(path, ("maps",), "references")
    if d["maps"].ndim != 5 or d["maps"].shape[1] != 2:
        raise InputError(path, f"references must be (K, 2, D, D, D), got {d['maps'].shape}", "maps")
    return d


#: Arrays every assignment shard holds, with their trailing shape after (n,) and (n, K).
ASSIGN_KEYS: tuple[str, ...] = ("half", "posterior", "euler", "shift", "loglik", "pose_peak")
#: Arrays an assignment shard may hold: the per-particle intensity scale (n, K) and the
#: fit score (n,) (``classification.fit_score``; shards written before it lack it).
OPTIONAL_ASSIGN_KEYS: tuple[str, ...] = ("scale", "fit_score")
_TRAILING: dict[str, tuple[int, ...]] = {
    "half": (),
    "posterior": (-1,),
    "euler": (-1, 3),
    "shift": (-1, 2),
    "loglik": (-1,),
    "pose_peak": (-1,),
    "fit_score": (),
}


def write_assignments(path: PathLike, **arrays) -> None:
    """One shard's alignment result: ``index`` (n,), ``half`` (n,), ``posterior``
    (n, K), ``euler`` (n, K, 3) degrees, ``shift`` (n, K, 2) Angstrom (RELION
    origin), ``loglik`` (n, K), ``pose_peak`` (n, K), ``noise_power`` and
    ``noise_count`` per shell (the residual power of this shard)."""
    missing = [k for k in ("index", *ASSIGN_KEYS) if k not in arrays]
    if missing:
        raise ValueError(f"assignments need {missing}")
    save_npz(path, **arrays)


def read_assignments(path: PathLike) -> dict:
    """One shard's assignments, checked: keys present, shapes consistent."""
    data = load_npz(path, ("index", *ASSIGN_KEYS), "assignment shard")
    index = data["index"]
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise InputError(
            path, f"'index' must be a 1D integer array, got {index.dtype} {index.shape}", "index"
        )
    n = index.shape[0]
    post = data["posterior"]
    if post.ndim != 2 or post.shape[0] != n:
        raise InputError(path, f"'posterior' must be (n={n}, K), got {post.shape}", "posterior")
    for key in ASSIGN_KEYS + tuple(k for k in OPTIONAL_ASSIGN_KEYS if k in data):
        want = (n,) + tuple(post.shape[1] if d == -1 else d for d in _TRAILING.get(key, (-1,)))
        if data[key].shape != want:
            raise InputError(path, f"'{key}' must have shape {want}, got {data[key].shape}", key)
    return data


def assemble_assignments(assign_files: Sequence[PathLike], n_particles: int) -> dict:
    """Gather the per-shard assignment files into arrays indexed by particle row.

    Returns ``half`` int8 (N,), ``posterior`` float32 (N, K), ``euler`` float32
    (N, K, 3) degrees, ``shift`` float32 (N, K, 2) Angstrom, ``loglik`` and
    ``pose_peak`` float32 (N, K), and ``scale`` (N, K) and ``fit_score`` (N,) when the
    shards hold them; row i =
    particle i of the table.

    Raises :class:`InputError` naming the shard when a key is missing, shapes
    disagree, an index is out of range, a particle appears twice, or some
    particles appear in no shard.
    """
    if n_particles < 0:
        raise ValueError(f"n_particles must be >= 0, got {n_particles}")
    if not assign_files:
        raise InputError("<assignments>", "no assignment shard files given")
    out: dict[str, np.ndarray] | None = None
    owner = np.full(n_particles, -1, dtype=np.int64)  # which shard file set each row
    n_classes = None
    for f_i, fname in enumerate(assign_files):
        data = read_assignments(fname)
        index = data["index"]
        k_here = data["posterior"].shape[1]
        if n_classes is None:
            n_classes = k_here
        elif k_here != n_classes:
            raise InputError(
                fname,
                f"shard has K={k_here} classes, earlier shards have K={n_classes}",
                "posterior",
            )
        bad = (index < 0) | (index >= n_particles)
        if bad.any():
            raise InputError(
                fname,
                f"particle index {int(index[bad][0])} out of range [0, {n_particles})",
                f"index[{int(np.flatnonzero(bad)[0])}]",
            )
        uniq, counts = np.unique(index, return_counts=True)
        if (counts > 1).any():
            raise InputError(
                fname,
                f"particle {int(uniq[counts > 1][0])} appears more than once in this shard",
                "index",
            )
        seen = owner[index] >= 0
        if seen.any():
            row = int(index[seen][0])
            raise InputError(
                fname,
                f"particle {row} is also in {assign_files[owner[row]]}; every particle must be in exactly one shard",
                "index",
            )
        owner[index] = f_i
        keys = ASSIGN_KEYS + tuple(k for k in OPTIONAL_ASSIGN_KEYS if k in data)
        if out is None:
            out = {
                key: np.zeros(
                    (n_particles,) + data[key].shape[1:],
                    dtype=np.int8 if key == "half" else np.float32,
                )
                for key in keys
            }
        elif set(keys) != set(out):
            raise InputError(fname, f"shard holds {sorted(keys)}, earlier shards {sorted(out)}")
        for key in keys:
            out[key][index] = data[key]
    assert out is not None
    absent = np.flatnonzero(owner < 0)
    if absent.size:
        raise InputError(
            "<assignments>",
            f"{absent.size} of {n_particles} particles are in no assignment shard (first: row {int(absent[0])}); "
            f"the {len(assign_files)} shard files do not cover the particle table",
        )
    return out


def write_sums(path: PathLike, num, wgt, grid_size: int) -> None:
    """Backprojection sums on the Hermitian half ball (``projection.backproject_packed``):
    ``num`` complex, ``wgt`` real, (..., n_packed), and the grid size they unpack to.
    Stored in single precision (complex64, float32) whatever they were summed in: the
    maps and FSC from them equal those from double-precision sums to float32 rounding
    (``tests/test_sums_tree.py``), at half the bytes."""
    save_npz(
        path,
        num=np.asarray(num, np.complex64),
        wgt=np.asarray(wgt, np.float32),
        grid_size=np.int64(grid_size),
    )


def read_sums(path: PathLike) -> dict:
    d = load_npz(path, ("num", "wgt", "grid_size"), "backprojection sums")
    if d["num"].shape != d["wgt"].shape:
        raise InputError(path, f"num {d['num'].shape} and wgt {d['wgt'].shape} differ in shape")
    return d


class SumsTotal:
    """A running sum of sums (``num`` complex128, ``wgt`` float64) on one packed grid:
    :meth:`add` arrays or a file, :meth:`write` it (single precision, :func:`write_sums`)."""

    def __init__(self):
        self.num = self.wgt = None
        self.grid_size: int | None = None

    def add(self, num, wgt, grid_size: int, source: PathLike = "<sums>") -> None:
        if self.num is None:
            self.num = np.asarray(num).astype(np.complex128)
            self.wgt = np.asarray(wgt).astype(np.float64)
            self.grid_size = int(grid_size)
            return
        if int(grid_size) != self.grid_size or np.shape(num) != self.num.shape:
            raise InputError(
                source,
                f"sums of grid {int(grid_size)} {np.shape(num)} do not match grid "
                f"{self.grid_size} {self.num.shape}",
            )
        self.num += num
        self.wgt += wgt

    def add_file(self, path: PathLike) -> None:
        d = read_sums(path)
        self.add(d["num"], d["wgt"], int(d["grid_size"]), path)

    def write(self, path: PathLike) -> None:
        if self.num is None:
            raise InputError(path, "no sums were added")
        write_sums(path, self.num, self.wgt, self.grid_size)


def add_sums(paths: Sequence[PathLike]):
    """The sum of several sums files, in sorted order: (num complex128, wgt float64, grid_size)."""
    total = SumsTotal()
    for p in sorted(str(x) for x in paths):
        total.add_file(p)
    if total.num is None:
        raise InputError("<sums>", "no sums files given")
    return total.num, total.wgt, total.grid_size


#: Per-shell arrays of an assignment file that are summed, not concatenated, on merging.
_SUMMED_ASSIGN_KEYS = (
    "noise_power", "noise_count", "noise_power_groups", "noise_count_groups",
    "self_evidence_stats",  # (2, K, 5): classification.self_evidence_stats per half-set
)  # fmt: skip


def merge_assignments(paths: Sequence[PathLike]) -> dict:
    """Several assignment files (the chunks of one shard, in order) as one: per-particle
    arrays concatenated, the residual noise power and counts summed."""
    parts = [read_assignments(p) for p in paths]
    if not parts:
        raise InputError("<assignments>", "no assignment files given")
    out = {}
    for key in parts[0]:
        if key in _SUMMED_ASSIGN_KEYS:
            out[key] = sum(d[key] for d in parts)
        else:
            out[key] = np.concatenate([d[key] for d in parts])
    return out
