"""Input and output: MRC maps and stacks, RELION STAR and CryoSPARC .cs particle tables.

Math modules never open files; everything that touches the disk lives here and
returns numpy arrays and pandas tables.
"""
