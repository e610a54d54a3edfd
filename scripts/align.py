"""Align one shard against the previous iteration's references (rule `align`).

Run by Snakemake (reads the `snakemake` object) or from the command line:
`python scripts/align.py --shard shard_0000.npz --refs iter_000/references.npz
--model iter_000/model.json --mask mask.mrc --iteration 1 --out-assign a.npz --out-sums s.npz`.
"""

import argparse

from hetrefine.config import job_setup, parse_cli

if "snakemake" in globals():
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    i, o = sm.input, sm.output
    args = dict(shard=i.shard, refs=i.refs, model=i.model, mask=i.mask)
    args |= dict(iteration=sm.params.iteration, out_assign=o.assign, out_sums=o.sums)
    config, log, threads = sm.config, sm.log[0], sm.threads
else:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("shard", "refs", "model", "mask", "out-assign", "out-sums"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--iteration", type=int, required=True, help="1..N")
    args, config, log, threads = parse_cli(p, threads=True)

job_setup(log, threads)
from hetrefine import steps  # noqa: E402 (after the thread caps)

steps.align_shard(**args, config=config)
