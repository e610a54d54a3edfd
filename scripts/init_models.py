"""Resample, rescale and low-pass the initial models into iteration 0 (rule `init_references`).

Run by Snakemake (reads the `snakemake` object) or from the command line:
`python scripts/init_models.py --models a.mrc b.mrc --info info.json --shard shard_0000.npz
--mask mask.mrc --out-refs iter_000/references.npz --out-model iter_000/model.json`.
"""

import argparse

from hetrefine.config import job_setup, parse_cli

if "snakemake" in globals():
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    i, o = sm.input, sm.output
    args = dict(models=list(i.models), info=i.info, shard=i.shard, mask=i.mask)
    args |= dict(out_refs=o.refs, out_model=o.model)
    config, log, threads = sm.config, sm.log[0], sm.threads
else:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("info", "shard", "mask", "out-refs", "out-model"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--models", nargs="+", required=True, help="one MRC per class")
    args, config, log, threads = parse_cli(p)

job_setup(log, threads)
from hetrefine import steps  # noqa: E402 (after the thread caps)

steps.init_references(**args, config=config)
