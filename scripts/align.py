"""Align and classify one shard (rule `align`; `python scripts/align.py --help` outside Snakemake)."""

from hetrefine.cli import run_step

run_step("align", globals().get("snakemake"))
