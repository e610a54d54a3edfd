"""Check the particles, crop to the refinement box, normalise, write shards (rule `preprocess`).

Run by Snakemake (reads the `snakemake` object) or from the command line:
`python scripts/preprocess.py --particles p.star --out-dir out --n-shards 4 --config config.yaml`.
"""

import argparse

from hetrefine.config import job_setup, load_config

if "snakemake" in globals():
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    args = dict(
        particles=sm.input.particles, out_dir=sm.params.out_dir, n_shards=sm.params.n_shards
    )
    config, log, threads = sm.config, sm.log[0], sm.threads
else:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--particles", required=True, help="RELION .star or CryoSPARC .cs")
    p.add_argument("--out-dir", required=True, help="folder for info.json, metadata.pkl, shards")
    p.add_argument("--n-shards", type=int, required=True)
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--log", help="log file (default: stderr)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    args = dict(particles=a.particles, out_dir=a.out_dir, n_shards=a.n_shards)
    config, log, threads = load_config(a.config), a.log, a.threads

job_setup(log, threads)
from hetrefine import steps  # noqa: E402 (after the thread caps)

steps.preprocess(**args, config=config)
