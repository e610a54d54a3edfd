"""Every figure of a run (rule `plots`; `python scripts/plots.py --help` outside Snakemake)."""

from hetrefine.cli import run_step

run_step("plots", globals().get("snakemake"))
