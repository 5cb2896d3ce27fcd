"""The model: the transformer (transformer.py: ModelConfig, forward, KV-cache decode), attention
backends behind one dispatcher (attention.py: reference / blockwise / cuDNN / Pallas splash on
TPU), the fused vocabulary head (vocab_head.py), weight quantisation (quant.py), Hugging Face
loading (hf.py), the policy in its two precisions (policy.py) and reward models (reward_model.py:
Hugging Face sequence classifiers scored in JAX).

``trustrl.model`` was one module before the package had layers; its names
(``trustrl.model.ModelConfig``, ...) still resolve here, lazily, to ``trustrl.model.transformer``.
"""
import importlib

SUBMODULES = ('transformer', 'attention', 'vocab_head', 'quant', 'hf', 'policy', 'reward_model')


def __getattr__(name):
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module(f"{__name__}.transformer"), name)
