"""Write the soft spherical mask at the refinement box (rule `make_mask`).

Run by Snakemake (reads the `snakemake` object) or from the command line:
`python scripts/make_mask.py --info preprocess/info.json --out mask.mrc --config config.yaml`.
"""

import argparse

from hetrefine.config import job_setup, load_config

if "snakemake" in globals():
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    info, out, config, log = sm.input.info, sm.output.mask, sm.config, sm.log[0]
else:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--info", required=True, help="preprocess/info.json (box, pixel size)")
    p.add_argument("--out", required=True, help="mask MRC to write")
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--log", help="log file (default: stderr)")
    a = p.parse_args()
    info, out, config, log = a.info, a.out, load_config(a.config), a.log

job_setup(log, 1)
from hetrefine import steps  # noqa: E402 (after the thread caps)

steps.make_mask(info, out, config)
