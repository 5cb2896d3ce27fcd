"""GEM and reasoning-gym environments behind trustrl's text protocol (environments.Environment).

Both come with the optional `envs` extra (``pip install -e ".[envs]"``: gem-llm, reasoning-gym);
``trustrl.data.environments.make`` sends these ids here:

    game:GuessTheNumber-v0-easy    any GEM id (gem.envs.registration.ENV_REGISTRY: "game:",
    rg:arc_1d, math:GSM8K, ...     "rg:", "math:", "code:", "qa:", "logic:", "eval:" prefixes)
    gem:<GEM id>                   the same, the rest of the id taken as GEM's id as it is
    reasoning_gym:<dataset>        a reasoning-gym dataset as a single-turn environment, without
                                   GEM (``ReasoningGymEnv``; reasoning_gym.factory.DATASETS)

``GemEnv`` adapts a GEM environment to the protocol exactly:

* observations are text: GEM puts the state a model needs next (Sudoku's board, "Enter your
  next guess.") in ``info["suffix"]`` (and sometimes ``info["prefix"]``), which GEM's own
  observation wrappers glue on; the adapter does the same for the current turn only (the turn
  history is already in the model's context, TokenEnv appends each observation to it).
* the observation returned with the step that ends the episode (terminated or truncated) is
  GEM's final message ("Congratulations! ...") without the suffix, or "" where GEM returns its
  ``TERMINAL_STATE`` marker '<｜TERMINAL_STATE｜>' (math, qa, GEM's rg single-turn envs): a
  placeholder, not text for a model. TokenEnv renders no observation after the end anyway.
* reward / terminated / truncated are Python float / bool, numpy scalars in info Python values.
* randomness is per environment: GEM seeds Python's and numpy's GLOBAL generators in reset
  (``random.seed(seed); np.random.seed(seed)``) and some games draw from them in step (2048's
  new tiles). Run B environments in lockstep and each would draw from whichever was reset last,
  so an episode would depend on its batch. The adapter keeps each environment's generator state
  to itself and puts the caller's global state back after every call: an episode is a function
  of its seed and actions, and the trainer's global generators are left as they were.

GEM environments differ in what a malformed action does: the games end the episode
(terminated=True) with ``LanguageGameReward.format_error_reward`` (-0.1); the adapter passes
that through unchanged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import inspect
import logging
import random
from typing import Any

import numpy as np

from trustrl.data import rewards

# the id sources (environments.GEM_PREFIXES / REASONING_GYM; not imported from there, which
# imports this module): "gem:<GEM id>" and "reasoning_gym:<dataset>"; the other GEM prefixes
# are read from GEM's registry
GEM = "gem"
REASONING_GYM = "reasoning_gym"

EXTRA_PACKAGES = ("gem-llm==0.1.0", "reasoning-gym==0.1.23")
# gem-llm 0.1.0 declares Requires-Python ">=3.10, <=3.12": pip reads "<=3.12" as "<=3.12.0"
PY312_NOTE = ("gem-llm declares Requires-Python <=3.12, so pip does not install it on Python "
              "3.12.1 and later: there, `pip install --ignore-requires-python gem-llm==0.1.0` "
              "works (gem-llm 0.1.0 imports and plays its games on Python 3.12.1; reasoning-gym "
              "alone installs normally for reasoning_gym:* ids)")


class MissingExtraError(ImportError):
    """An environment id needs the optional `envs` extra, which is not installed."""


def _missing_extra(env_id: str, module: str, why: str) -> MissingExtraError:
    return MissingExtraError(
        f"environment {env_id!r} needs the optional 'envs' extra ({', '.join(EXTRA_PACKAGES)}"
        f"; {module!r} {why}): pip install -e '.[envs]' ({PY312_NOTE})")


def _require(module: str, env_id: str):
    """Imports ``module`` or raises MissingExtraError saying how to install it."""
    try:
        if module == "gem":
            return _import_gem()
        return importlib.import_module(module)
    except ImportError as e:
        raise _missing_extra(env_id, module, f"failed to import: {e}") from e


def check_installed(env_id: str):
    """Raises MissingExtraError when the package ``env_id`` needs (reasoning_gym for
    "reasoning_gym:*", gem for the GEM ids) is not installed; imports nothing (config
    validation runs it before a run starts)."""
    import importlib.util
    module = "reasoning_gym" if env_id.split(":", 1)[0] == REASONING_GYM else "gem"
    if importlib.util.find_spec(module) is None:
        raise _missing_extra(env_id, module, "is not installed")


def _import_gem():
    """``import gem``, undoing its import-time ``logging.basicConfig(level=INFO)``, which would
    otherwise turn on every library's INFO logging in the trainer's process."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import gem
    import gem.envs  # noqa: F401  (registers GEM's environments in ENV_REGISTRY)
    root.handlers[:] = handlers
    root.setLevel(level)
    return gem


# --- per-environment random state --------------------------------------------------------------

@contextlib.contextmanager
def _own_rng(env):
    """Runs the body with ``env._rng`` as Python's and numpy's global generator state, stores
    the state the body leaves in ``env._rng`` and restores the caller's state."""
    outer = random.getstate(), np.random.get_state()
    try:
        if env._rng is not None:
            random.setstate(env._rng[0])
            np.random.set_state(env._rng[1])
        yield
        env._rng = random.getstate(), np.random.get_state()
    finally:
        random.setstate(outer[0])
        np.random.set_state(outer[1])


def _py(value):
    """numpy scalars -> Python scalars (one level into dicts / lists)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(v.item() if isinstance(v, np.generic) else v for v in value)
    return value


# --- GEM ---------------------------------------------------------------------------------------

def gem_ids() -> list:
    """Every registered GEM environment id (needs gem)."""
    _require("gem", "gem")
    from gem.envs.registration import ENV_REGISTRY
    return list(ENV_REGISTRY)


def _unknown_gem_id(gem_id: str, ids: list) -> ValueError:
    prefix = gem_id.split(":", 1)[0] + ":"
    same = [i for i in ids if i.startswith(prefix)]
    close = difflib.get_close_matches(gem_id, ids, n=3, cutoff=0.5)
    hint = f" did you mean {close}?" if close else ""
    some = same[:8] if same else ids[:8]
    where = f"with prefix {prefix!r} ({len(same)})" if same else f"(prefixes {_prefixes(ids)})"
    return ValueError(f"unknown GEM environment {gem_id!r};{hint} GEM ids {where} include "
                      f"{some}; all {len(ids)}: gem.envs.registration.ENV_REGISTRY")


def _prefixes(ids) -> list:
    return sorted({i.split(":", 1)[0] for i in ids})


def _check_kwargs(gem_id: str, spec, kwargs: dict):
    """GEM's environment classes take ``**_`` and drop unknown arguments silently: refuse a
    misspelt one here, naming the arguments the class takes."""
    entry = spec.entry_point
    if isinstance(entry, str):
        module, name = entry.split(":")
        entry = getattr(importlib.import_module(module), name)
    params = inspect.signature(entry).parameters.values()
    valid = [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"GEM environment {gem_id!r} ({getattr(entry, '__name__', entry)}) "
                         f"takes no argument {unknown}; valid: {valid}")


class GemEnv:
    """A GEM environment (``gem.make(gem_id, **kwargs)``) behind the trustrl protocol; see the
    module docstring for what it changes (suffix, terminal marker, types, random state)."""

    def __init__(self, gem_id: str, env_id: str | None = None, **kwargs: Any):
        self.env_id = env_id or gem_id
        gem = _require("gem", self.env_id)
        from gem.envs.registration import ENV_REGISTRY
        from gem.utils.constants import TERMINAL_STATE
        if gem_id not in ENV_REGISTRY:
            raise _unknown_gem_id(gem_id, list(ENV_REGISTRY))
        _check_kwargs(gem_id, ENV_REGISTRY[gem_id], kwargs)
        self.gem_id, self.terminal_state = gem_id, TERMINAL_STATE
        self._rng, self._live = None, False
        with _own_rng(self):  # GEM's constructors call reset() on the global generators
            self.env = gem.make(gem_id, **kwargs)

    @staticmethod
    def _text(obs, info: dict, gem_id: str) -> str:
        if not isinstance(obs, str):
            raise TypeError(f"GEM environment {gem_id!r} returned a {type(obs).__name__} "
                            f"observation; trustrl's environments are text only")
        prefix, suffix = info.get("prefix", ""), info.get("suffix", "")
        if suffix and obs and not obs.endswith("\n"):
            obs += "\n"
        return f"{prefix}{obs}{suffix}"

    def reset(self, seed: int | None = None) -> tuple[str, dict]:
        # GEM's reset seeds the global generators, which _own_rng then keeps for this env alone;
        # seed None gets a fresh one (GEM would otherwise draw from the caller's state, which
        # _own_rng restores, so two reset(None) in a row would replay one episode)
        seed = random.SystemRandom().randrange(2**32) if seed is None else int(seed)
        self._rng = None
        with _own_rng(self):
            obs, info = self.env.reset(seed=seed)
        self._live = True
        info = _py(dict(info))
        return self._text(obs, info, self.gem_id), info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if not self._live:
            raise RuntimeError(f"{self.env_id}: step() before reset() or after the episode "
                               f"ended")
        with _own_rng(self):
            obs, reward, terminated, truncated, info = self.env.step(action)
        terminated, truncated, info = bool(terminated), bool(truncated), _py(dict(info))
        if terminated or truncated:
            self._live = False
            if obs == self.terminal_state:
                obs = ""
            elif not isinstance(obs, str):
                raise TypeError(f"GEM environment {self.gem_id!r} returned a "
                                f"{type(obs).__name__} observation; trustrl's environments "
                                f"are text only")
        else:
            obs = self._text(obs, info, self.gem_id)
        return obs, float(reward), terminated, truncated, info


# --- reasoning-gym -----------------------------------------------------------------------------

def reasoning_gym_names() -> list:
    """Every registered reasoning-gym dataset name (needs reasoning_gym)."""
    _require("reasoning_gym", REASONING_GYM)
    from reasoning_gym.factory import DATASETS
    return sorted(DATASETS)


class ReasoningGymEnv:
    """One reasoning-gym question per episode: ``reset(seed)`` draws the entry of
    ``reasoning_gym.create_dataset(name, seed=seed, size=1, **dataset_kwargs)`` (deterministic
    per seed) and returns its question; ``step(text)`` scores the answer with the dataset's own
    ``score_answer`` and ends the episode: ("", score, True, False, info).

    The answer is ``rewards.extract_answer(text)`` (the last ``\\boxed{...}`` or the rest of
    the last "Answer:" line, decoration such as ``$...$`` and a trailing period removed), else
    the whole text stripped. info: {"answer": the extracted answer, "expected": the entry's}."""

    def __init__(self, name: str, **dataset_kwargs: Any):
        rg = _require("reasoning_gym", f"{REASONING_GYM}:{name}")
        from reasoning_gym.factory import DATASETS
        if name not in DATASETS:
            close = difflib.get_close_matches(str(name), list(DATASETS), n=3, cutoff=0.5)
            hint = f" did you mean {close}?" if close else ""
            raise ValueError(f"unknown reasoning-gym dataset {name!r};{hint} valid: "
                             f"{sorted(DATASETS)}")
        self.name, self.kwargs, self._rg = name, dict(dataset_kwargs), rg
        self.dataset, self.entry = self._dataset(0), None  # bad dataset_kwargs fail here

    def _dataset(self, seed):
        try:
            return self._rg.create_dataset(self.name, seed=seed, size=1, **self.kwargs)
        except TypeError as e:  # the dataset's config dataclass rejected an argument
            from reasoning_gym.factory import DATASETS
            fields = [f.name for f in dataclasses.fields(DATASETS[self.name][1])
                      if f.name not in ("seed", "size")]
            raise ValueError(f"reasoning-gym dataset {self.name!r}: bad arguments "
                             f"{self.kwargs} ({e}); valid: {fields}") from e

    def reset(self, seed: int | None = None) -> tuple[str, dict]:
        self.dataset = self._dataset(None if seed is None else int(seed))
        self.entry = self.dataset[0]
        return self.entry["question"], {"answer": self.entry["answer"]}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self.entry is None:
            raise RuntimeError(f"{REASONING_GYM}:{self.name}: step() before "
                               f"reset() or after the episode ended")
        answer = rewards.extract_answer(action)
        if answer is None:
            answer = action.strip()
        entry, self.entry = self.entry, None
        score = float(self.dataset.score_answer(answer, entry))
        return "", score, True, False, {"answer": answer, "expected": entry["answer"]}


# --- ids ---------------------------------------------------------------------------------------

def make(env_id: str, **kwargs: Any):
    """The environment of a GEM id ("game:Sudoku-v0-easy", "gem:<GEM id>") or of
    "reasoning_gym:<dataset>"; kwargs go to gem.make / the dataset's config."""
    if not isinstance(env_id, str) or ":" not in env_id:
        raise ValueError(f"environment id {env_id!r} must be '<source>:<name>': a GEM id "
                         f"(game:Sudoku-v0-easy, rg:arc_1d, ...), {GEM}:<GEM id> or "
                         f"{REASONING_GYM}:<dataset>")
    source, name = env_id.split(":", 1)
    if source == REASONING_GYM:
        return ReasoningGymEnv(name, **kwargs)
    return GemEnv(name if source == GEM else env_id, env_id=env_id, **kwargs)
