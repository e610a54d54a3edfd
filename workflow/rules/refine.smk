# The refinement loop as a static DAG: init writes iter_000; iteration it
# (1..N) aligns every shard against iter_{it-1}'s references (one job per shard,
# streaming the shard's chunks), reduce_sums adds the shards' sums in a tree of at
# most SUMS_FAN_IN files per job (when there are more shards than that), and
# reconstruct turns the top of the tree into iter_{it}'s references.
# `iterations` is a cap: once an iteration has converged (hetrefine.convergence), the
# later ones are pass-through jobs (align copies the shard's previous assignments and
# writes empty sums, reconstruct copies the references and statistics), so the DAG is
# the same at every parse, locally and on a cluster, and a resumed run does the same.


rule init_references:
    input:
        models=config["initial_models"],
        info=L.info,
        sample=L.sample,
        mask=L.mask,
    output:
        refs=L.references(0),
        model=L.model(0),
    params:
        settings=settings("init_references"),
        kernel=KERNEL,
    log:
        f"{LOGS}/init_references.log",
    benchmark:
        f"{BENCH}/init_references.tsv"
    conda:
        "../../envs/kernel.yaml"
    threads: 2
    resources:
        mem_mb=mem_reconstruct,
        runtime=runtime_short,
    script:
        "../../scripts/init_references.py"


rule align:
    input:
        chunks=shard_chunks,
        refs=previous_references,
        model=previous_model,
        mask=L.mask,
        focus_mask=L.focus_mask,
        prev_assign=previous_shard_assignments,
    output:
        assign=L.assignments("{it}", "{s}"),
        sums=temp(L.sums("{it}", "{s}")),
    params:
        iteration=iteration_number,
        settings=settings("align"),
        kernel=KERNEL,
    log:
        f"{LOGS}/align/iter_{{it}}_shard_{{s}}.log",
    benchmark:
        f"{BENCH}/align/iter_{{it}}_shard_{{s}}.tsv"
    conda:
        align_env()
    threads: shard_threads
    group:
        iteration_group
    resources:
        mem_mb=mem_align,
        runtime=runtime_long,
    script:
        "../../scripts/align.py"


rule reduce_sums:
    input:
        sums=tree_children,
    output:
        sums=temp(L.tree_sums("{stage}", "{level}", "{node}")),
    wildcard_constraints:
        stage=r"iter_\d{3}|final",
        level=r"\d+",
        node=r"\d{4}",
    params:
        settings=settings("reduce_sums"),
        kernel=KERNEL,
    log:
        f"{LOGS}/reduce_sums/{{stage}}_{{level}}_{{node}}.log",
    benchmark:
        f"{BENCH}/reduce_sums/{{stage}}_{{level}}_{{node}}.tsv"
    conda:
        "../../envs/kernel.yaml"
    threads: 1
    group:
        sums_group
    resources:
        mem_mb=mem_reduce,
        runtime=runtime_short,
    script:
        "../../scripts/reduce_sums.py"


rule reconstruct:
    input:
        assign=iteration_assignments,
        sums=iteration_sums,
        prev_model=previous_model,
        prev_refs=previous_references,
        prev_assign=previous_assignments,
        mask=L.mask,
    output:
        refs=L.references("{it}"),
        model=L.model("{it}"),
    wildcard_constraints:
        it=r"(?!000)\d{3}",
    params:
        iteration=iteration_number,
        settings=settings("reconstruct"),
        kernel=KERNEL,
    log:
        f"{LOGS}/reconstruct/iter_{{it}}.log",
    benchmark:
        f"{BENCH}/reconstruct/iter_{{it}}.tsv"
    conda:
        "../../envs/kernel.yaml"
    threads: 4
    group:
        iteration_group
    resources:
        mem_mb=mem_reconstruct,
        runtime=runtime_long,
    script:
        "../../scripts/reconstruct.py"
