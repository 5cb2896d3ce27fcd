"""Training: the loop (loop.py), the jitted update (step.py), everything a run builds from its
config (experiment.py, programs.py), warm start, filtering, evaluation, config validation and
the workdir's resume provenance (resume.py).
"""
