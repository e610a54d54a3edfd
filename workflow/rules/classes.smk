# Final outputs: a map of only the hard-assigned particles per class (summed per
# shard, then in the sums tree of rule reduce_sums), then the per-class folders,
# particles_all.star and volumes_all.zip.


rule hard_sums:
    input:
        chunks=shard_chunks,
        assign=L.assignments(LAST, "{s}"),
        model=L.model(LAST),
    output:
        sums=temp(L.hard_sums("{s}")),
    params:
        settings=settings("hard_sums"),
        kernel=KERNEL,
    log:
        f"{LOGS}/hard_sums/shard_{{s}}.log",
    benchmark:
        f"{BENCH}/hard_sums/shard_{{s}}.tsv"
    conda:
        "../../envs/kernel.yaml"
    threads: shard_threads
    resources:
        mem_mb=mem_align,
        runtime=runtime_short,
    script:
        "../../scripts/hard_sums.py"


rule write_classes:
    input:
        metadata=L.metadata,
        info=L.info,
        assign=final_assignments(),
        hard_sums=final_hard_sums(),
        refs=L.references(LAST),
        model=L.model(LAST),
        mask=L.mask,
    output:
        particles=f"{RUN}/particles_all.star",
        particles_cs=f"{RUN}/particles_all.cs",
        classes=class_outputs(),
        volumes=f"{RUN}/volumes_all.zip",
    params:
        out_dir=run_folder,
        settings=settings("write_classes"),
        kernel=KERNEL,
    log:
        f"{LOGS}/write_classes.log",
    benchmark:
        f"{BENCH}/write_classes.tsv"
    conda:
        "../../envs/kernel.yaml"
    threads: 2
    resources:
        mem_mb=mem_reconstruct,
        runtime=runtime_short,
    script:
        "../../scripts/write_classes.py"
