# Pre-flight check, not part of `rule all`: `snakemake preflight --cores N`
# validates the inputs and prints the estimated memory per job, the number of
# jobs and the time per iteration on this machine with N cores (also written to
# results/<run>/preflight.txt). Delete that file to run the check again.
# It asks for many threads so that Snakemake hands it all of --cores (capped
# there), which it reads as the cores available to the run; it runs locally.


localrules:
    preflight,


rule preflight:
    output:
        report=f"{RUN}/preflight.txt",
    params:
        settings={key: config[key] for key in sorted(config) if key != "run"},
        kernel=KERNEL,
    log:
        f"{LOGS}/preflight.log",
    benchmark:
        f"{BENCH}/preflight.tsv"
    conda:
        "../../envs/kernel.yaml"
    threads: 1024
    resources:
        mem_mb=mem_small,
        runtime=runtime_short,
    script:
        "../../scripts/preflight.py"
