"""Add a few sums files into one (rule `reduce_sums`; `python scripts/reduce_sums.py --help` outside Snakemake)."""

from hetrefine.cli import run_step

run_step("reduce_sums", globals().get("snakemake"))
