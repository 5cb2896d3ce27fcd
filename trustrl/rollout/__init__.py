"""Rollouts: the Rollout record the trainer consumes (record.py), the jitted sampler
(sampler.py) with continuous batching (continuous.py), and external engines speaking the
OpenAI API (engine_client.py: vLLM, SGLang, llama.cpp); multi-turn episodes token-in-token-out
(multiturn.py in-process, engine_multiturn.py through an engine; trajectory.py their record).

``trustrl.rollout`` was one module before the package had layers; its names
(``trustrl.rollout.Rollout``, ...) still resolve here, lazily, to ``trustrl.rollout.record``.
"""
import importlib

SUBMODULES = ('record', 'sampler', 'continuous', 'engine_client', 'trajectory', 'multiturn',
              'engine_multiturn')


def __getattr__(name):
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module(f"{__name__}.record"), name)
