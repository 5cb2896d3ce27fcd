"""Training: the loop (loop.py), the jitted update (step.py), the optimizer (optim.py), everything
a run builds from its config, its jitted programs included (experiment.py), warm start,
filtering, evaluation, config validation, the workdir's resume provenance (resume.py) and
environment episodes (episodes.py: multi-turn RL).
"""
