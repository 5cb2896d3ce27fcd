"""Reading runs: inspection of a batch's trust-region decisions, summaries and plots of metrics.
"""
