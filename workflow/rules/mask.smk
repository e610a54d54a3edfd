# Soft spherical mask at the refinement box.


rule make_mask:
    input:
        info=L.info,
    output:
        mask=L.mask,
    params:
        settings=settings("mask"),
        kernel=KERNEL,
    log:
        f"{LOGS}/make_mask.log",
    benchmark:
        f"{BENCH}/make_mask.tsv"
    conda:
        "../../envs/kernel.yaml"
    threads: 1
    resources:
        mem_mb=mem_small,
        runtime=runtime_short,
    script:
        "../../scripts/mask.py"
