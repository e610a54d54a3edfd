"""The soft spherical mask (rule `mask`; `python scripts/mask.py --help` outside Snakemake)."""

from hetrefine.cli import run_step

run_step("mask", globals().get("snakemake"))
