"""docs/parameters.md is generated from the config schema; the README's doc links and commands hold."""

from __future__ import annotations

import re
from pathlib import Path

from hetrefine.config import defaults, load_schema
from hetrefine.parameters_doc import PARAMETERS_DOC, parameters_markdown
from hetrefine.preflight import main

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "python -m hetrefine.preflight --write-parameters-doc"


def test_parameters_doc_matches_schema():
    """The committed doc is exactly what the schema generates."""
    expected = parameters_markdown(load_schema())
    committed = PARAMETERS_DOC.read_text() if PARAMETERS_DOC.is_file() else ""
    assert committed == expected, (
        f"docs/parameters.md is out of date with workflow/schemas/config.schema.yaml; "
        f"regenerate it with `{REGENERATE}` and commit it"
    )


def _doc_keys(text: str) -> list[str]:
    return re.findall(r"^\| `([^`]+)` \|", text, re.M)


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys += _flat_keys(v, prefix + k + ".")
    return keys


def test_parameters_doc_lists_every_key_with_its_default():
    """Every key of the filled default config (nested ones dotted) has a row, and its default."""
    schema = load_schema()
    text = parameters_markdown(schema)
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)` \|.*$", text, re.M)}
    config = defaults()
    for key in _flat_keys(config):
        assert key in rows, f"{key} missing from docs/parameters.md"
    assert "`mask.inner_diameter_A`" in text and "`demo.n_particles`" in text
    assert "| `iterations` | integer |" in rows["iterations"] + " |"
    assert "`8`" in rows["iterations"] and ">= 1, <= 200" in rows["iterations"]
    assert "Angstrom" in rows["initial_lowpass_A"] and "degrees" in rows["coarse_angle_step_deg"]


def test_parameters_doc_follows_a_schema_change():
    """A changed default or bound changes the doc (so the equality test above can fail)."""
    schema = load_schema()
    before = parameters_markdown(schema)
    schema["properties"]["iterations"]["default"] = 9
    schema["properties"]["shard_size"]["maximum"] = 77
    after = parameters_markdown(schema)
    assert before != after
    assert "`9`" in [r for r in after.splitlines() if r.startswith("| `iterations`")][0]
    assert "<= 77" in [r for r in after.splitlines() if r.startswith("| `shard_size`")][0]


def test_write_parameters_doc_command(tmp_path, capsys):
    out = tmp_path / "p.md"
    assert main(["--write-parameters-doc", str(out)]) == 0
    assert out.read_text() == parameters_markdown(load_schema())


def test_readme_links_exist():
    """Every relative link of the README points at a file of the checkout."""
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)
    assert any("docs/" in link for link in links)
    for link in links:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_troubleshooting_messages_exist_in_code():
    """Quoted error messages in docs/troubleshooting.md are ones the code can print."""
    doc = (ROOT / "docs" / "troubleshooting.md").read_text()
    quoted = re.findall(r"^> `([^`]+)`", doc, re.M)
    assert len(quoted) >= 4
    sources = "\n".join(p.read_text() for p in (ROOT / "src" / "hetrefine").rglob("*.py"))
    sources = re.sub(r"\"\s*\n\s*f?\"", "", sources)  # join implicitly concatenated literals
    for q in quoted:
        # placeholders (<file>, <n>) and "..." stand for the variable parts
        pieces = [x for x in re.split(r"<[^>]*>|\.\.\.", q) if len(x.strip()) >= 8]
        assert pieces, q
        for piece in pieces:
            assert piece in sources, f"'{piece}' (from '{q}') is not in a message of the code"
