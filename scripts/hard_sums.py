"""Backproject one shard's hard-assigned particles after the last iteration (rule `hard_sums`).

Run by Snakemake (reads the `snakemake` object) or from the command line:
`python scripts/hard_sums.py --shard shard_0000.npz --assign iter_008/align/shard_0000.npz
--out-sums final/hard_0000.sums.npz --config config.yaml`.
"""

import argparse

from hetrefine.config import job_setup, parse_cli

if "snakemake" in globals():
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    args = dict(shard=sm.input.shard, assign=sm.input.assign, out_sums=sm.output.sums)
    config, log, threads = sm.config, sm.log[0], sm.threads
else:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("shard", "assign", "out-sums"):
        p.add_argument(f"--{name}", required=True)
    args, config, log, threads = parse_cli(p)

job_setup(log, threads)
from hetrefine import steps  # noqa: E402 (after the thread caps)

steps.hard_sums(**args, config=config)
