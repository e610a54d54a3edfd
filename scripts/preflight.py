"""Pre-flight check: validate the inputs, estimate jobs, memory and time (rule `preflight`;
`python scripts/preflight.py --help` outside Snakemake, same as `python -m hetrefine.preflight`)."""

import sys

from hetrefine import preflight

if "snakemake" in globals():
    preflight.snakemake_main(snakemake)  # noqa: F821 (injected by Snakemake)
else:
    sys.exit(preflight.main())
