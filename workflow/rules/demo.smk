# The simulated demo data set. Runs only when its files are needed (`particles`
# points at results/demo_data/) and missing, or when `demo:` changes.


rule simulate_demo:
    output:
        particles=f"{hetrefine.config.DEMO_DIR}/particles.star",
        stack=f"{hetrefine.config.DEMO_DIR}/particles.mrcs",
        truth=f"{hetrefine.config.DEMO_DIR}/truth.csv",
        truth_maps=demo_truth_maps(),
        models=simulate_demo_outputs(),
    params:
        out_dir=output_folder,
        settings=settings("demo"),
        kernel=KERNEL,
    log:
        "logs/demo_data/simulate_demo.log",
    benchmark:
        "benchmarks/demo_data/simulate_demo.tsv"
    conda:
        "../../envs/kernel.yaml"
    threads: 1
    resources:
        mem_mb=mem_preprocess,
        runtime=runtime_short,
    script:
        "../../scripts/demo.py"
