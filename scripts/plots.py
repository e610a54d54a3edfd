"""Draw the convergence, FSC, posterior, slice and orientation plots (rule `plots`).

Run by Snakemake (reads the `snakemake` object) or from the command line:
`python scripts/plots.py --models iter_*/model.json --refs iter_*/references.npz
--assign iter_008/align/shard_*.npz --out-dir results/demo/plots`.
"""

import argparse

from hetrefine.config import job_setup, load_config

if "snakemake" in globals():
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    i = sm.input
    args = dict(models=list(i.models), refs=list(i.refs), assign=list(i.assign))
    args |= dict(out_dir=sm.params.out_dir)
    config, log = sm.config, sm.log[0]
else:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("models", "refs", "assign"):
        p.add_argument(f"--{name}", nargs="+", required=True, help="iteration order")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--log", help="log file (default: stderr)")
    a = p.parse_args()
    args = {k: v for k, v in vars(a).items() if k not in ("config", "log")}
    config, log = load_config(a.config), a.log

job_setup(log, 1)
from hetrefine import steps  # noqa: E402 (after the thread caps)

steps.make_plots(**args, config=config)
