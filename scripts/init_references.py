"""The initial models as iteration 0's references (rule `init_references`; `python scripts/init_references.py --help` outside Snakemake)."""

from hetrefine.cli import run_step

run_step("init_references", globals().get("snakemake"))
