"""Gather the shards' sums into an iteration's references (rule `reconstruct`; `python scripts/reconstruct.py --help` outside Snakemake)."""

from hetrefine.cli import run_step

run_step("reconstruct", globals().get("snakemake"))
