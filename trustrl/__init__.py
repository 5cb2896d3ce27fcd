"""trustrl: divergence-based trust regions (DPPO) for LLM reinforcement learning in JAX.

The package is seven layers and its tools on top, each a folder, each importing only the folders
below it (tests/test_layering.py holds the order):

    core/      the paper's math: losses (the DPPO masks, METHODS), divergences, advantages
    infra/     storage, checkpoints, metrics, multi-host, sharding, preemption, integrity
    data/      tasks, datasets, rewards, tokenizers, TaskEnv
    model/     the transformer, attention backends, the vocabulary head, HF loading, policy
    rollout/   the Rollout record, the sampler, continuous batching, external engines
    training/  the loop, the step, the run's programs (experiment), warm start, validation
    analysis/  inspection, summaries, plots
    tools/     command-line tools on top (nothing in the package imports them)

The flat module names of trustrl <= 0.1 (``from trustrl import losses``,
``trustrl.train_step.train_step``, ``import trustrl.sampler``) resolve to their new homes
lazily: ``import trustrl`` imports no jax.
"""
import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

LAYERS = ("core", "infra", "data", "model", "rollout", "training", "analysis", "tools")

# Old flat module -> its home. ``model``, ``rollout`` and ``data`` are now subpackages whose
# ``__init__`` re-exports the old module's names (trustrl.model.ModelConfig, ...).
MOVED = {
    "losses": "core.losses", "divergences": "core.divergences", "advantages": "core.advantages",
    "storage": "infra.storage", "durable": "infra.storage", "integrity": "infra.integrity",
    "workdir_lock": "infra.workdir_lock", "checkpoint": "infra.checkpoint",
    "metrics": "infra.metrics", "multihost": "infra.multihost", "sharding": "infra.sharding",
    "preemption": "infra.preemption",
    "tasks": "data.tasks", "rewards": "data.rewards", "tokenizer": "data.tokenizer",
    "attention": "model.attention", "vocab_head": "model.vocab_head", "hf": "model.hf",
    "quant": "model.quant", "policy": "model.policy", "reward_model": "model.reward_model",
    "sampler": "rollout.sampler", "continuous": "rollout.continuous",
    "engine_client": "rollout.engine_client",
    "train": "training.loop", "train_step": "training.step", "experiment": "training.experiment",
    "warmstart": "training.warmstart", "filtering": "training.filtering",
    "evaluation": "training.evaluation", "config_validation": "training.config_validation",
    "inspection": "analysis.inspection", "summary": "analysis.summary", "plot": "analysis.plot",
}


def __getattr__(name):  # PEP 562: ``from trustrl import losses`` / ``trustrl.train_step``
    if name in MOVED:
        return importlib.import_module(f"{__name__}.{MOVED[name]}")
    if name in LAYERS or name == "main":
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(MOVED) | set(LAYERS))


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import trustrl.train_step`` (and mock.patch("trustrl.sampler.x")): the old dotted name
    is the new module object itself, not a copy, so patches and isinstance checks agree."""

    def find_spec(self, fullname, path=None, target=None):
        pkg, _, name = fullname.rpartition(".")
        if pkg != __name__ or name not in MOVED:
            return None
        new = importlib.util.find_spec(f"{__name__}.{MOVED[name]}")
        return importlib.util.spec_from_loader(fullname, self, origin=new.origin)

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}")

    def exec_module(self, module):
        pass

    # ``python -m trustrl.<old>`` (runpy) runs the new module's code as __main__
    def get_code(self, fullname):
        new = f"{__name__}.{MOVED[fullname.rpartition('.')[2]]}"
        return importlib.util.find_spec(new).loader.get_code(new)

    def is_package(self, fullname):
        return False


if not any(isinstance(f, _OldNames) for f in sys.meta_path):
    sys.meta_path.append(_OldNames())
