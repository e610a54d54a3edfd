# Read and check the particle metadata, crop to the refinement box, normalise,
# split half-sets and write fixed-size shards.


rule preprocess:
    input:
        particles=config["particles"],
    output:
        info=f"{RUN}/preprocess/info.json",
        metadata=f"{RUN}/preprocess/metadata.pkl",
        sample=f"{RUN}/preprocess/sample.npz",
        shards=[shard_file(s) for s in SHARDS],
    params:
        out_dir=output_folder,
        n_shards=N_SHARDS,
        settings=settings("preprocess"),
        kernel=KERNEL,
    log:
        f"{LOGS}/preprocess.log",
    benchmark:
        f"{BENCH}/preprocess.tsv"
    conda:
        "../../envs/kernel.yaml"
    threads: 2
    resources:
        mem_mb=mem_preprocess,
        runtime=runtime_long,
    script:
        "../../scripts/preprocess.py"
