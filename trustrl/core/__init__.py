"""The paper's math, pure functions of arrays: the policy losses and the DPPO trust-region
masks (losses.py, with the METHODS table), the divergences (divergences.py) and the
advantage estimators (advantages.py). Imports nothing else from trustrl.
"""
