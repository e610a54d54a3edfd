"""Simulate the demo data set: particles, truth and initial models (rule `simulate_demo`).

Run by Snakemake (reads the `snakemake` object) or from the command line:
`python scripts/simulate.py --out-dir results/demo_data --config config.yaml`.
"""

import argparse

from hetrefine.config import job_setup, load_config

if "snakemake" in globals():
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    out_dir, config, log, threads = sm.params.out_dir, sm.config, sm.log[0], sm.threads
else:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", required=True, help="folder for particles.star, .mrcs, truth")
    p.add_argument("--config", default="config.yaml", help="config file (its `demo:` section)")
    p.add_argument("--log", help="log file (default: stderr)")
    a = p.parse_args()
    out_dir, config, log, threads = a.out_dir, load_config(a.config), a.log, 1

job_setup(log, threads)
from hetrefine import steps  # noqa: E402 (after the thread caps)

steps.simulate_demo(out_dir, config)
