"""Pre-flight check: validate the inputs, estimate jobs, memory and time (rule `preflight`).

Run by Snakemake (`snakemake preflight`: the report goes to the log and to
results/<run>/preflight.txt) or from the command line:
`python scripts/preflight.py --config config.yaml` (same as
`python -m hetrefine.preflight --config config.yaml`; `--help` for options).
"""

import sys

if "snakemake" in globals():
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    from hetrefine.preflight import run_preflight

    report = run_preflight(dict(sm.config), ".", cores=sm.threads)
    text = str(report)
    print(text, end="", file=sys.stderr)  # shown in Snakemake's output
    with open(sm.log[0], "w") as fh:
        fh.write(text)
    with open(sm.output.report, "w") as fh:
        fh.write(text)
    if not report.ok:
        sys.exit(1)
else:
    from hetrefine.preflight import main

    sys.exit(main())
