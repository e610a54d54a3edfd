#!/usr/bin/env bash
# Snakemake runs this inside the new conda env, from the working directory,
# after creating it (--use-conda): install this hetrefine checkout into the
# env without touching the conda-provided dependencies. Run Snakemake from the
# checkout, or set HETREFINE_SOURCE to it.
set -euo pipefail
python -m pip install --no-deps --editable "${HETREFINE_SOURCE:-$PWD}"
