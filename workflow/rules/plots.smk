# Figures, flagged for `snakemake --report report.html`.


# The report opens on the run's summary page (results/<run>/summary.html).
report: "../report/workflow.rst"


rule plots:
    input:
        models=all_models(),
        refs=all_references(),
        assign=final_assignments(),
    output:
        class_sizes=report(
            plot_files("class_sizes", "png"),
            caption="../report/class_sizes.rst",
            category="Convergence",
        ),
        changed_fraction=report(
            plot_files("changed_fraction", "png"),
            caption="../report/changed_fraction.rst",
            category="Convergence",
        ),
        resolution=report(
            plot_files("resolution", "png"),
            caption="../report/resolution.rst",
            category="Convergence",
        ),
        posterior_hist=report(
            plot_files("posterior_hist", "png"),
            caption="../report/posterior_hist.rst",
            category="Classes",
        ),
        fit_score_hist=report(
            plot_files("fit_score_hist", "png"),
            caption="../report/fit_score_hist.rst",
            category="Classes",
        ),
        slices=report(
            plot_files("slices", "png"),
            caption="../report/slices.rst",
            category="Classes",
        ),
        fsc=report(
            plot_files("fsc_class_{k}", "png"),
            caption="../report/fsc.rst",
            category="FSC",
        ),
        orientations=report(
            plot_files("orientations_class_{k}", "png"),
            caption="../report/orientations.rst",
            category="Orientations",
        ),
        fsc_all=plot_files("fsc_all", "png"),
        svg=plot_svgs(),
        summary=report(
            plot_files("summary", "html"),
            caption="../report/summary.rst",
            category="Summary",
        ),
        class_orientations=class_orientations(),
    params:
        out_dir=plots_folder,
        settings=settings("plots"),
        kernel=KERNEL,
    log:
        f"{LOGS}/plots.log",
    benchmark:
        f"{BENCH}/plots.tsv"
    conda:
        "../../envs/plots.yaml"
    threads: 1
    resources:
        mem_mb=mem_small,
        runtime=runtime_short,
    script:
        "../../scripts/plots.py"
