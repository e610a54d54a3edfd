"""Write the per-class outputs, particles_all.star/.cs and volumes_all.zip (rule `write_classes`).

Run by Snakemake (reads the `snakemake` object) or from the command line:
`python scripts/classes.py --metadata metadata.pkl --info info.json --assign a_*.npz
--hard-sums h_*.npz --refs iter_008/references.npz --model iter_008/model.json
--mask mask.mrc --out-dir results/demo`.
"""

import argparse

from hetrefine.config import job_setup, parse_cli

if "snakemake" in globals():
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    i = sm.input
    args = dict(metadata=i.metadata, info=i.info, assign=list(i.assign))
    args |= dict(hard_sums=list(i.hard_sums), refs=i.refs, model=i.model, mask=i.mask)
    args |= dict(out_dir=sm.params.out_dir)
    config, log, threads = sm.config, sm.log[0], sm.threads
else:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("assign", "hard-sums"):
        p.add_argument(f"--{name}", nargs="+", required=True, help="one file per shard")
    for name in ("metadata", "info", "refs", "model", "mask", "out-dir"):
        p.add_argument(f"--{name}", required=True)
    args, config, log, threads = parse_cli(p)

job_setup(log, threads)
from hetrefine import steps  # noqa: E402 (after the thread caps)

steps.write_classes(**args, config=config)
