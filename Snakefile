# hetrefine: heterogeneous refinement for single-particle cryo-EM.
# This file is the table of contents; the rules live in workflow/rules/.
#   snakemake --cores 4                                # the demo, end to end
#   snakemake --profile workflow/profiles/slurm        # the same on a SLURM cluster
#   snakemake --report report.html                     # plots gathered into one page

from snakemake.utils import min_version

import hetrefine.config
import hetrefine.validation

min_version("8.0")


configfile: "config.yaml"


# Validate, fill defaults and check cross-key rules before any job is planned.
hetrefine.validation.check_config_files(workflow.configfiles)
config.update(
    hetrefine.config.validate_config(
        config,
        schema_path=workflow.source_path("workflow/schemas/config.schema.yaml"),
        source="config",
    )
)


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/mask.smk"
include: "workflow/rules/refine.smk"
include: "workflow/rules/classes.smk"
include: "workflow/rules/plots.smk"
include: "workflow/rules/preflight.smk"


# Iterations are zero-padded to 3 digits (iter_000 = initial references), shards to 4.
wildcard_constraints:
    it=r"\d{3}",
    s=r"\d{4}",


# Jobs too small to be worth a cluster queue.
localrules:
    all,
    make_mask,


rule all:
    input:
        final_outputs(),
    default_target: True
