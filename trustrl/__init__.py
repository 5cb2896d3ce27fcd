"""trustrl: divergence-based trust regions (DPPO) for LLM reinforcement learning in JAX."""

__version__ = "0.1.0"
