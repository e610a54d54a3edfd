# Final outputs: a map of only the hard-assigned particles per class (summed per
# shard), then the per-class folders, particles_all.star and volumes_all.zip.


rule hard_sums:
    input:
        shard=f"{RUN}/preprocess/shard_{{s}}.npz",
        assign=f"{RUN}/iter_{LAST}/align/shard_{{s}}.npz",
    output:
        sums=temp(f"{RUN}/final/hard_{{s}}.sums.npz"),
    params:
        settings=settings("refine"),
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
        metadata=f"{RUN}/preprocess/metadata.pkl",
        info=f"{RUN}/preprocess/info.json",
        assign=final_assignments(),
        hard_sums=[f"{RUN}/final/hard_{s}.sums.npz" for s in SHARDS],
        refs=f"{RUN}/iter_{LAST}/references.npz",
        model=f"{RUN}/iter_{LAST}/model.json",
        mask=f"{RUN}/mask.mrc",
    output:
        particles=f"{RUN}/particles_all.star",
        particles_cs=f"{RUN}/particles_all.cs",
        classes=class_outputs(),
        volumes=f"{RUN}/volumes_all.zip",
    params:
        out_dir=output_folder,
        settings=settings("refine"),
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
        "../../scripts/classes.py"
