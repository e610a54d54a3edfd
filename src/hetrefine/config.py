"""The run configuration: load, fill defaults, validate against the JSON schema.

The schema (``workflow/schemas/config.schema.yaml``) is the single source of
every key, its default, type and bounds. :func:`validate_config` turns a user's
``config.yaml`` (plus Snakemake ``--config`` overrides) into a complete,
checked dict, or raises :class:`hetrefine.errors.InputError` naming the key and
what was expected, before any job runs. Step functions receive that dict.
"""

from __future__ import annotations

import copy
import difflib
import functools
import os
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema
import yaml

from hetrefine.errors import InputError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
"""The schema in a source checkout (editable install); the Snakefile passes its own copy."""

DEMO_DIR = "results/demo_data"
"""Where the workflow's ``simulate_demo`` rule writes the demo data set."""

DEMO_PARTICLES = f"{DEMO_DIR}/particles.star"

_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
    "array": list,
    "object": dict,
}


class DatasetSize(NamedTuple):
    """What the workflow must know about the particles at parse time."""

    n_particles: int
    box: int | None  # particle box in pixels, None when not known without reading images


@functools.lru_cache(maxsize=8)
def _load_schema_cached(path: str) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


def load_schema(path: str | os.PathLike | None = None) -> dict:
    """The config JSON schema (a dict), from ``path`` or the source checkout's copy."""
    path = Path(path) if path is not None else SCHEMA_PATH
    if not path.is_file():
        raise InputError(path, "config schema not found (is this a source checkout of hetrefine?)")
    return copy.deepcopy(_load_schema_cached(str(path.resolve())))


def defaults(schema_path: str | os.PathLike | None = None) -> dict:
    """The complete default config: every key of the schema with its default."""
    return _fill_defaults({}, load_schema(schema_path))


def load_config(
    path: str | os.PathLike,
    overrides: dict | None = None,
    schema_path: str | os.PathLike | None = None,
) -> dict:
    """Read a config YAML file, merge ``overrides`` (nested dicts merge), validate, fill defaults."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file does not exist")
    try:
        with open(path) as fh:
            config = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise InputError(path, "expected a mapping of keys to values at the top level")
    if overrides:
        config = _merge(config, overrides)
    return validate_config(config, schema_path=schema_path, source=path)


def validate_config(
    config: dict,
    *,
    schema_path: str | os.PathLike | None = None,
    source: str | os.PathLike = "config",
) -> dict:
    """A validated copy of ``config`` with every default filled in.

    Checks, in order: unknown keys (with a did-you-mean), the number of initial
    models, types and bounds from the schema (strings from the command line
    such as ``"12"`` or ``"null"`` are read as YAML where the schema wants a
    number, boolean or null), then cross-key rules (odd ``refine_box``, mask
    outer diameter under the inner one, demo models that the demo does not
    write). ``source`` names the config file in error messages.
    """
    schema = load_schema(schema_path)
    if not isinstance(config, dict):
        raise InputError(source, "expected a mapping of keys to values at the top level")
    _check_unknown(config, schema, source, prefix="")
    config = _coerce(copy.deepcopy(config), schema)
    models = config.get("initial_models")
    if isinstance(models, list) and len(models) < 2:
        raise InputError(
            source,
            f"heterogeneous refinement needs at least 2 initial models (one per class), "
            f"got {len(models)}: {models}",
            where="key 'initial_models'",
        )
    config = _fill_defaults(config, schema)
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(
        validator_cls(schema).iter_errors(config), key=lambda e: [str(p) for p in e.path]
    )
    if errors:
        err = errors[0]
        key = ".".join(str(p) for p in err.path) or "(top level)"
        sub = _subschema(schema, list(err.path))
        expected = f" Expected: {sub['description'].strip()}" if "description" in sub else ""
        raise InputError(source, f"{err.message}.{expected}", where=f"key '{key}'")
    _check_consistency(config, source)
    return config


def dataset_size(config: dict, workdir: str | os.PathLike = ".") -> DatasetSize:
    """Number of particles and particle box of a validated config, for planning the DAG.

    For the demo data set (``particles`` is ``results/demo_data/particles.star``)
    the sizes come from ``demo`` (the demo rule rewrites the files when ``demo``
    changes); otherwise the particle file is read (it must exist). Also checks
    that there are no more classes (initial models) than particles and that
    ``refine_box`` is not larger than the particle box.
    """
    particles = config["particles"]
    if os.path.normpath(particles) == os.path.normpath(DEMO_PARTICLES):
        size = DatasetSize(config["demo"]["n_particles"], config["demo"]["box"])
    else:
        path = Path(workdir) / particles
        if not path.is_file():
            raise InputError(
                particles,
                "particle file does not exist (set `particles` in config.yaml to a RELION "
                f".star or CryoSPARC .cs file, or to {DEMO_PARTICLES} for the demo)",
                where="key 'particles'",
            )
        size = _count_particles(path)
    if size.n_particles < 1:
        raise InputError(particles, "the particle file lists no particles")
    k = len(config.get("initial_models") or [])
    if k > size.n_particles:
        raise InputError(
            particles,
            f"{k} initial models (classes) but only {size.n_particles} particles; "
            "every class needs particles: give at most as many initial models as particles",
            where="key 'initial_models'",
        )
    box = config.get("refine_box")
    if box is not None and size.box is not None and box > size.box:
        raise InputError(
            "config",
            f"refine_box = {box} px is larger than the particle box ({size.box} px); "
            "the refinement box can only crop (use null for the particle box)",
            where="key 'refine_box'",
        )
    return size


def check_input_files(config: dict, workdir: str | os.PathLike = ".") -> None:
    """Raise :class:`InputError` for an initial model that does not exist (demo models excepted).

    Run at parse time so a wrong path is named before any job runs, rather than
    as Snakemake's missing-input error after the DAG is built.
    """
    demo = {os.path.normpath(p) for p in demo_initial_models(config["demo"])}
    for i, model in enumerate(config["initial_models"]):
        if os.path.normpath(model) in demo:
            continue
        if not (Path(workdir) / model).is_file():
            raise InputError(
                model, "initial model does not exist", where=f"key 'initial_models', entry {i + 1}"
            )


def _count_particles(path: Path) -> DatasetSize:
    try:
        from hetrefine.io.particles import count_particles
    except ImportError:  # the particle reader is optional at parse time
        count_particles = None
    box = None
    if count_particles is not None:
        n = int(count_particles(str(path)))
    else:
        import starfile

        data = starfile.read(path, always_dict=True)
        table = data.get("particles", next(iter(data.values())))
        n = len(table)
    if path.suffix == ".star":
        grids = _star_grids(path)
        box = max(grids)[1] if grids else None  # the refinement grid's (hetrefine.optics)
    elif path.suffix == ".cs":
        box = _cs_box(path)
    return DatasetSize(n, box)


def largest_image_box(config: dict, workdir: str | os.PathLike = ".") -> int | None:
    """The largest image box of any optics group (the images preprocess reads, for its
    memory), read cheaply from a RELION 3.1 optics table; None when not known that way
    (then :func:`dataset_size`'s box is the one)."""
    path = Path(workdir) / config["particles"]
    if path.suffix != ".star" or not path.is_file():
        return None
    grids = _star_grids(path)
    return max(b for _, b in grids) if grids else None


def _cs_box(path: Path) -> int | None:
    """The largest ``blob/shape`` of a CryoSPARC .cs file (memory-mapped); None if absent."""
    import numpy as np

    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        shape = np.asarray(arr["blob/shape"])
    except (OSError, ValueError, KeyError):
        return None
    return int(shape.max()) if shape.size else None


def _star_grids(path: Path) -> list[tuple[float, int]] | None:
    """(pixel size, box) of each group of a RELION 3.1 optics table, read cheaply; None
    if absent. The largest is the refinement grid's (``hetrefine.optics``: the coarsest
    pixel size, then the larger box); pixel size 0 when the table has none."""
    lines: list[str] = []
    with open(
        path, encoding="utf-8-sig", errors="replace"
    ) as fh:  # a bad byte is named by the reader, not here
        in_optics = False
        for line in fh:
            s = line.strip()
            if s.startswith("data_"):
                if in_optics:
                    break
                in_optics = s == "data_optics"
            elif in_optics:
                lines.append(s)
    labels = [s.split()[0] for s in lines if s.startswith("_rln")]
    if "_rlnImageSize" not in labels:
        return None
    col = labels.index("_rlnImageSize")
    pcol = labels.index("_rlnImagePixelSize") if "_rlnImagePixelSize" in labels else None
    grids = []  # (pixel size, box) per group
    for s in lines:
        if s and not s.startswith(("_", "#", "loop_")):
            parts = s.split()
            if len(parts) > max(col, pcol or 0):
                try:
                    px = float(parts[pcol]) if pcol is not None else 0.0
                    grids.append((round(px, 4), int(float(parts[col]))))
                except ValueError:
                    return None
    return grids or None


def _types(schema: dict) -> list[str]:
    t = schema.get("type", [])
    return [t] if isinstance(t, str) else list(t)


def _subschema(schema: dict, path: list) -> dict:
    for part in path:
        if isinstance(part, int):
            schema = schema.get("items", {})
        else:
            schema = schema.get("properties", {}).get(part, {})
    return schema


def _check_unknown(config: dict, schema: dict, source, prefix: str) -> None:
    props = schema.get("properties", {})
    for key, value in config.items():
        full = f"{prefix}{key}"
        if key not in props:
            close = difflib.get_close_matches(str(key), list(props), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise InputError(
                source,
                f"unknown key '{full}'{hint}; known keys"
                f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(props)}",
                where=f"key '{full}'",
            )
        if isinstance(value, dict) and "properties" in props[key]:
            _check_unknown(value, props[key], source, prefix=f"{full}.")


def _coerce(value: Any, schema: dict) -> Any:
    """Read command-line strings as YAML where the schema wants a non-string."""
    types = _types(schema)
    if isinstance(value, str) and types and ("string" not in types or value == "null"):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if any(isinstance(parsed, _TYPES[t]) for t in types if t in _TYPES):
            value = parsed
    if isinstance(value, float) and "integer" in types and value.is_integer():
        value = int(value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        value = {k: _coerce(v, props.get(k, {})) for k, v in value.items()}
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [_coerce(v, schema["items"]) for v in value]
    return value


def _fill_defaults(config: dict, schema: dict) -> dict:
    out = dict(config)
    for key, sub in schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if isinstance(out.get(key), dict) and "properties" in sub:
            out[key] = _fill_defaults(out[key], sub)
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_consistency(config: dict, source) -> None:
    box = config["refine_box"]
    if box is not None and box % 2:
        raise InputError(
            source,
            f"refine_box must be even (Fourier cropping keeps the centre at D/2), got {box}; "
            f"use {box - 1} or {box + 1}",
            where="key 'refine_box'",
        )
    mask = config["mask"]
    inner = mask["inner_diameter_A"]
    inner_key = "mask.inner_diameter_A"
    if inner is None:
        inner, inner_key = config["particle_diameter_A"], "particle_diameter_A"
    outer = mask["outer_diameter_A"]
    if outer is not None and inner is not None and outer < inner:
        raise InputError(
            source,
            f"the mask's outer diameter ({outer} A) is smaller than its inner diameter "
            f"({inner_key} = {inner} A); the soft edge runs from inner out to outer",
            where="key 'mask.outer_diameter_A'",
        )
    if os.path.normpath(config["particles"]) == os.path.normpath(DEMO_PARTICLES):
        demo = config["demo"]
        n_models = demo["n_classes"] + (1 if demo["decoy"] else 0)
        made = {os.path.normpath(p) for p in demo_initial_models(config["demo"])}
        for model in config["initial_models"]:
            norm = os.path.normpath(model)
            if norm.startswith(os.path.normpath(DEMO_DIR) + os.sep) and norm not in made:
                raise InputError(
                    source,
                    f"initial model {model} is not written by the demo "
                    f"(demo.n_classes = {demo['n_classes']}, decoy = {demo['decoy']}: "
                    f"{n_models} models)",
                    where="key 'initial_models'",
                )


def demo_initial_models(demo: dict) -> list[str]:
    """The initial-model paths the demo writes: one per class, plus the decoy if asked for."""
    n = demo["n_classes"] + (1 if demo["decoy"] else 0)
    return [f"{DEMO_DIR}/initial_model_{k:02d}.mrc" for k in range(1, n + 1)]
