"""Data: synthetic tasks (tasks.py), tfds datasets and math files (datasets.py), rewards and
verifiers (rewards.py), tokenizers (tokenizer.py, qwen_vocab.py) and a task's text side
(task_env.py: TaskEnv), environments for multi-turn episodes (environments.py; GEM and
reasoning-gym adapters in gem_env.py), preference data for RLHF (preferences.py: prompt sets,
preference pairs, the synthetic "wordpref" task's hidden ground truth).

``trustrl.data`` was one module before the package had layers; its names
(``trustrl.data.build``, ...) still resolve here, lazily, to ``trustrl.data.datasets``.
"""
import importlib

SUBMODULES = ('datasets', 'tasks', 'rewards', 'tokenizer', 'qwen_vocab', 'task_env',
              'environments', 'gem_env', 'preferences')


def __getattr__(name):
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module(f"{__name__}.datasets"), name)
