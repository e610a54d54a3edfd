"""Simulate the demo data set (rule `demo`; `python scripts/demo.py --help` outside Snakemake)."""

from hetrefine.cli import run_step

run_step("demo", globals().get("snakemake"))
