"""The shape of the code: small modules, no import circles, no reaching into another
module's private names, thin scripts, console scripts that run, ruff-formatted."""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "hetrefine"


def modules() -> dict[str, Path]:
    return {
        ".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): f
        for f in sorted(PACKAGE.rglob("*.py"))
    }


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every ``from hetrefine... import names`` in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hetrefine"):
            out.append((node.module, [a.name for a in node.names]))
    return out


def test_no_module_over_500_lines():
    big = {name: n for name, f in modules().items() if (n := len(f.read_text().splitlines())) > 500}
    assert not big, big


def test_no_import_circle():
    mods = modules()
    edges = {name: set() for name in mods}
    for name, f in mods.items():
        for module, names in imports(f):
            if module in mods:
                edges[name].add(module)
            for n in names:  # `from hetrefine.io import run_files`
                if f"{module}.{n}" in mods:
                    edges[name].add(f"{module}.{n}")
        edges[name].discard(name)

    def reach(a, b, seen):
        return any(d == b or (d not in seen and reach(d, b, seen | {d})) for d in edges[a])

    circles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if reach(b, a, {b})})
    assert not circles, circles


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_imported_from_another_module():
    bad = []
    for name, f in modules().items():
        for module, names in imports(f):
            bad += [f"{name}: {module}.{n}" for n in names if private(n) and module != name]
    for f in sorted((ROOT / "scripts").glob("*.py")):
        for module, names in imports(f):
            bad += [f"{f.name}: {module}.{n}" for n in names if private(n)]
    assert not bad, bad


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_scripts_are_thin(script):
    lines = [x for x in (ROOT / "scripts" / script).read_text().splitlines() if x.strip()]
    assert len(lines) <= 15, (script, len(lines))


def test_every_step_module_is_in_the_cli_and_the_settings_table():
    from hetrefine.cli import STEPS
    from hetrefine.steps import SETTINGS

    assert set(STEPS) == set(SETTINGS)
    for step, spec in STEPS.items():
        fn = getattr(importlib.import_module(spec.module), spec.function)
        params = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
        want = [a.name for a in spec.args] + ["settings"] + (["device"] if spec.device else [])
        assert params == want, (step, params, want)


def test_a_step_cannot_read_a_key_that_does_not_rerun_it():
    from hetrefine.config import defaults
    from hetrefine.steps import settings_for

    s = settings_for("mask", defaults())
    assert set(s) == {"mask", "particle_diameter_A"}
    with pytest.raises(KeyError, match="not among its settings"):
        s["refine_box"]


@pytest.mark.parametrize(
    ("command", "text"), [("hetrefine", "align"), ("hetrefine-simulate", "--snr")]
)
def test_console_scripts_run(command, text):
    exe = shutil.which(command, path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip(f"{command} is not installed here (pip install -e . installs it)")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert text in result.stdout


def test_step_command_line_reports_bad_input_in_one_line(tmp_path):
    """A step run by hand on a missing file: exit 1 and one line naming the file."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("particles: x.star\ninitial_models: [a.mrc, b.mrc]\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "mask.py"), "--info", str(tmp_path / "nope.json"),
         "--out-mask", str(tmp_path / "m.mrc"), "--out-focus-mask", str(tmp_path / "f.mrc"),
         "--config", str(cfg)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()
    assert len(last) == 1 and "nope.json" in last[0] and "does not exist" in last[0], result.stderr
