"""One shard's hard-assignment sums (rule `hard_sums`; `python scripts/hard_sums.py --help` outside Snakemake)."""

from hetrefine.cli import run_step

run_step("hard_sums", globals().get("snakemake"))
