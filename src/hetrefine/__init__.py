"""hetrefine: heterogeneous refinement for single-particle cryo-EM.

The kernel package behind the Snakemake workflow: all math (``projection``,
``ctf``, ``reconstruction``, ``alignment`` ...) and all I/O (``hetrefine.io``)
live here; the workflow's scripts are thin adapters around ``hetrefine.steps``.
"""

__version__ = "0.1.0"
