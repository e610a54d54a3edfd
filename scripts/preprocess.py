"""Read, crop, normalise and shard the particles (rule `preprocess`; `python scripts/preprocess.py --help` outside Snakemake)."""

from hetrefine.cli import run_step

run_step("preprocess", globals().get("snakemake"))
