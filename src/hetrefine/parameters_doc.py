"""``docs/parameters.md`` from the config schema: every key, its unit, default and bounds.

``python -m hetrefine.preflight --write-parameters-doc`` rewrites the file; a test
checks the committed file equals what this module makes of the schema.
"""

from __future__ import annotations

import json
from pathlib import Path

PARAMETERS_DOC = Path(__file__).resolve().parents[2] / "docs" / "parameters.md"
"""``docs/parameters.md`` in a source checkout."""


def _fmt_value(v) -> str:
    if v is None:
        return "`null`"
    if isinstance(v, bool):
        return "`true`" if v else "`false`"
    if isinstance(v, (list, dict)):
        return "`" + json.dumps(v) + "`" if v else ("`[]`" if isinstance(v, list) else "`{}`")
    return f"`{v}`"


def _unit(key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if leaf.endswith("_A") or leaf == "pixel_size":
        return "Angstrom"
    if leaf.endswith("_px") or leaf in ("box", "refine_box"):
        return "pixels"
    if leaf.endswith("_deg"):
        return "degrees"
    if leaf in ("shard_size", "n_particles", "batch_size_per_class"):
        return "particles"
    if "iterations" in leaf:
        return "iterations"
    if leaf in ("domain_fraction", "junk_fraction", "class_similarity", "online_em_decay"):
        return "fraction"
    return ""


def _bounds(sub: dict) -> str:
    parts = []
    if "minimum" in sub:
        parts.append(f">= {sub['minimum']}")
    if "exclusiveMinimum" in sub:
        parts.append(f"> {sub['exclusiveMinimum']}")
    if "maximum" in sub:
        parts.append(f"<= {sub['maximum']}")
    if "exclusiveMaximum" in sub:
        parts.append(f"< {sub['exclusiveMaximum']}")
    if sub.get("multipleOf") == 2:
        parts.append("even")
    elif "multipleOf" in sub:
        parts.append(f"multiple of {sub['multipleOf']}")
    if "enum" in sub:
        parts.append("one of " + ", ".join(f"`{e}`" for e in sub["enum"]))
    if "pattern" in sub:
        parts.append(f"matches `{sub['pattern']}`")
    if "minItems" in sub:
        parts.append(f"at least {sub['minItems']} entries")
    if "minLength" in sub:
        parts.append("non-empty")
    return ", ".join(parts).replace("|", "\\|")


def _type(sub: dict) -> str:
    t = sub.get("type", "")
    types = [t] if isinstance(t, str) else list(t)
    if "array" in types and isinstance(sub.get("items"), dict):
        types = [
            f"array of {sub['items'].get('type', 'any')}" if x == "array" else x for x in types
        ]
    return " or ".join(types)


def _rows(schema: dict, prefix: str = "") -> list[tuple[str, dict]]:
    rows = []
    for key, sub in schema.get("properties", {}).items():
        full = f"{prefix}{key}"
        rows.append((full, sub))
        if "properties" in sub:
            rows += _rows(sub, prefix=f"{full}.")
    return rows


def parameters_markdown(schema: dict) -> str:
    """``docs/parameters.md``: one table row per config key (nested keys dotted).

    schema: the config JSON schema as a dict (``hetrefine.config.load_schema()``).
    Columns: key, type, meaning (the schema's description), unit (from the key's
    suffix: ``_A`` Angstrom, ``_px`` pixels, ``_deg`` degrees), default, bounds.
    Deterministic: the same schema gives the same bytes.
    """

    def clean(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    lines = [
        "# Configuration parameters",
        "",
        "<!-- Generated from workflow/schemas/config.schema.yaml by "
        "`python -m hetrefine.preflight --write-parameters-doc`; do not edit by hand. -->",
        "",
        clean(schema.get("description", "")),
        "",
        "Set them in `config.yaml`, or one at a time on the command line "
        "(`snakemake --cores 8 --config iterations=12`). Nested keys (`mask.*`, `demo.*`) "
        "go under their section in the YAML file. A value outside its bounds, or an unknown "
        "key, is refused before any job runs.",
        "",
        "| key | type | meaning | unit | default | bounds |",
        "|---|---|---|---|---|---|",
    ]
    for key, sub in _rows(schema):
        default = _fmt_value(sub["default"]) if "default" in sub else ""
        if "properties" in sub:
            default = "(section)"
        lines.append(
            f"| `{key}` | {_type(sub)} | {clean(sub.get('description', ''))} | {_unit(key)} "
            f"| {default} | {_bounds(sub)} |"
        )
    return "\n".join(lines) + "\n"
