"""Training: the loop (loop.py), the jitted update (step.py), the optimizer (optim.py), everything
a run builds from its config, its jitted programs included (experiment.py), warm start,
filtering, evaluation, config validation and the workdir's resume provenance (resume.py).
"""
