"""Gather every shard's sums into the next references and statistics (rule `reconstruct`).

Run by Snakemake (reads the `snakemake` object) or from the command line:
`python scripts/reconstruct.py --assign a_*.npz --sums s_*.npz --prev-model iter_000/model.json
--mask mask.mrc --iteration 1 --out-refs iter_001/references.npz --out-model iter_001/model.json`.
"""

import argparse

from hetrefine.config import job_setup, parse_cli

if "snakemake" in globals():
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    i, o = sm.input, sm.output
    args = dict(assign=list(i.assign), sums=list(i.sums), prev_model=i.prev_model)
    args |= dict(prev_assign=list(i.prev_assign), mask=i.mask, iteration=sm.params.iteration)
    args |= dict(out_refs=o.refs, out_model=o.model)
    config, log, threads = sm.config, sm.log[0], sm.threads
else:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("assign", "sums", "prev-assign"):
        p.add_argument(f"--{name}", nargs="*", default=[], help="one file per shard")
    for name in ("prev-model", "mask", "out-refs", "out-model"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--iteration", type=int, required=True, help="1..N")
    args, config, log, threads = parse_cli(p)

job_setup(log, threads)
from hetrefine import steps  # noqa: E402 (after the thread caps)

steps.reconstruct(**args, config=config)
