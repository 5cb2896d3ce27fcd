"""Infrastructure every layer may use: local / gs:// storage with crash-safe writes, integrity
records, the workdir lock, Orbax checkpoints, metrics, multi-host helpers, meshes and
shardings, preemption, offline assets. Imports only trustrl.core (and nothing from it today).
"""
