# Read and check the particle metadata, crop to the refinement box, normalise,
# split half-sets and write fixed-size chunks (an align job streams its shard's chunks).


rule preprocess:
    input:
        particles=config["particles"],
    output:
        info=L.info,
        metadata=L.metadata,
        sample=L.sample,
        chunks=all_chunks(),
    params:
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
