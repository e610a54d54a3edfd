"""The final files (STAR, .cs, maps, zip) (rule `write_classes`; `python scripts/write_classes.py --help` outside Snakemake)."""

from hetrefine.cli import run_step

run_step("write_classes", globals().get("snakemake"))
