"""envs/*.yaml say what pyproject.toml says: the same packages, the same version bounds.

Conda channels cannot be reached where the project is tested, so `--use-conda`
is not run here (the README says so); this keeps the files from drifting from
the tested venv install instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip(
    "tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)"
)

ROOT = Path(__file__).resolve().parents[1]
ENVS = sorted((ROOT / "envs").glob("*.yaml"))
# PyPI name -> conda-forge name, where they differ.
CONDA_NAME = {"matplotlib": "matplotlib-base", "cupy-cuda12x": "cupy"}
# The driver, not a rule's environment: Snakemake runs the rules' scripts with
# its own package on their path.
DRIVER_ONLY = {"snakemake"}
# Conda-only packages: pip (to install this checkout), the CUDA runtime for CuPy.
CONDA_ONLY = {"pip", "cuda-version"}
REQ = re.compile(r"^([A-Za-z0-9_.\-]+)\s*(.*)$")


def parse(spec: str) -> tuple[str, str]:
    name, bound = REQ.match(spec.strip()).groups()
    return name.lower(), bound.replace(" ", "")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def expected(env: Path) -> dict[str, str]:
    project = pyproject()
    specs = list(project["dependencies"])
    if "gpu" in env.stem:
        specs += project["optional-dependencies"]["gpu"]
    wanted = {}
    for spec in specs:
        name, bound = parse(spec)
        if name not in DRIVER_ONLY:
            wanted[CONDA_NAME.get(name, name)] = bound
    wanted["python"] = project["requires-python"].replace(" ", "")
    return wanted


def test_there_are_envs():
    assert {p.stem for p in ENVS} >= {"kernel", "kernel-gpu", "plots"}


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_env_matches_pyproject(env):
    spec = yaml.safe_load(env.read_text())
    assert spec["channels"][0] == "conda-forge"
    listed = dict(parse(d) for d in spec["dependencies"] if isinstance(d, str))
    extra = set(listed) - set(expected(env)) - CONDA_ONLY
    assert not extra, f"{env.name}: not in pyproject.toml: {sorted(extra)}"
    for name, bound in expected(env).items():
        assert name in listed, f"{env.name}: {name} missing (pyproject.toml lists it)"
        assert listed[name] == bound, f"{env.name}: {name}{listed[name]}, pyproject.toml: {bound}"


def test_readme_says_which_install_is_tested():
    readme = (ROOT / "README.md").read_text()
    sentences = re.split(r"(?<=[.)])\s+", " ".join(readme.split()))
    assert any("venv" in x and "tested" in x and "not tested" not in x for x in sentences)
    assert any("conda" in x and "not tested" in x for x in sentences)
