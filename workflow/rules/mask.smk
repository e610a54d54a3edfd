# Soft spherical mask at the refinement box, and the mask the references get in
# align (mask.file resampled to the refinement box; else, with mask.solvent, the
# initial models' envelope; else the sphere).
# mask.file is an input, so a changed mask file reruns the mask and every iteration.


rule make_mask:
    input:
        info=L.info,
        user_mask=user_mask_file,
        models=solvent_mask_models,
    output:
        mask=L.mask,
        focus_mask=L.focus_mask,
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
