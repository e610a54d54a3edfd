# Pre-flight check, not part of `rule all`: `snakemake preflight` validates the
# inputs and prints the estimated memory per job, the number of jobs and the time
# per iteration on this machine (also written to results/<run>/preflight.txt).
# It always runs afresh (the report depends on the machine, not only on files).


rule preflight:
    output:
        report=f"{RUN}/preflight.txt",
    params:
        cores=workflow.cores,
        settings=settings("refine"),
        kernel=KERNEL,
    log:
        f"{LOGS}/preflight.log",
    conda:
        "../../envs/kernel.yaml"
    threads: 1
    resources:
        mem_mb=mem_small,
        runtime=runtime_short,
    script:
        "../../scripts/preflight.py"
