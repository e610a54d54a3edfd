#!/usr/bin/env bash
# Snakemake runs this inside the new conda env, from the working directory,
# after creating it (--use-conda): install this hetrefine checkout into the
# env without touching the conda-provided dependencies. Run Snakemake from the
# checkout, or set HETREFINE_SOURCE to it.
set -euo pipefail
python -m pip install --no-deps --editable "${HETREFINE_SOURCE:-$PWD}"
# compile the CPU kernels once into Numba's cache (a few seconds), not in the first jobs
python -c "from hetrefine.kernels import warm_up; warm_up()"
