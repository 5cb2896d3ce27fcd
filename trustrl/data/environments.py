"""Environments for multi-turn RL: text episodes (reset / step) and their token-level view.

The text protocol is gym's, as GEM ("a gym for generalist LLMs", the `gem-llm` package) has it:

    obs, info = env.reset(seed)                                 # the first observation (text)
    obs, reward, terminated, truncated, info = env.step(action)  # action: the policy's text

``TokenEnv`` puts a tokenizer and a ``TurnTemplate`` (the chat template's turn delimiters) around
an environment, so the sampler works on token ids only (token-in, token-out):

    ids = tenv.reset(seed)                 # the first prompt, rendered and encoded
    step = tenv.step(action_ids, ended)    # the policy's ids of one turn -> observation ids
    step.obs_ids                           # rendered observation, encoded ONCE, with markers

The policy's own token ids are decoded to give the environment its text, and never re-encoded:
the trajectory the trainer scores holds exactly the ids the sampler produced. A tokenizer whose
decode-encode round trip changes ids ("12" sampled as "1" "2", re-encoded as one "12") would
otherwise move the recorded log-probs onto other tokens, and DPPO's per-token mask with them.

Environment ids (``make``):
    trustrl:guess_sum      the native multi-turn task: an arithmetic question, answered with
                           "higher" / "lower" feedback until right (a tiny CPU model learns it)
    trustrl:guess_number   guess a secret number in [1, high] with higher / lower feedback
    game:* rg:* math:* ... GEM environments (``trustrl.data.gem_env``; the optional `envs`
                           extra: pip install -e ".[envs]")
    reasoning_gym:<name>   a reasoning-gym dataset as a single-turn environment (same extra)
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Protocol, Sequence

import numpy as np

from trustrl.data import tasks

TEMPLATES = ("plain", "chatml")
NATIVE = ("guess_sum", "guess_number")
# GEM's environment id prefixes (gem.envs.registration.ENV_REGISTRY); "gem:<id>" is also accepted
GEM_PREFIXES = ("game", "rg", "math", "code", "qa", "logic", "eval", "gem")
# reasoning-gym datasets as single-turn environments ("reasoning_gym:arc_1d"), without GEM
REASONING_GYM = "reasoning_gym"


class Environment(Protocol):
    """A text environment (gym / GEM protocol)."""

    def reset(self, seed: int | None = None) -> tuple[str, dict]: ...

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]: ...


@dataclasses.dataclass(frozen=True)
class TurnTemplate:
    """How turns are rendered as text around the observations.

    "plain": the first observation is ``Question: {obs}\\nAnswer:`` (datasets.PLAIN_TEMPLATE); a
    policy turn ends with the tokenizer's EOS; each later observation is ``\\n{obs}\\nAnswer:``.
    "chatml" (Qwen, SmolLM2): the first observation is one user message rendered by the
    tokenizer's chat template (the ChatML fallback when it has none) with the generation prompt;
    a policy turn ends with ``<|im_end|>``; each later observation is
    ``\\n<|im_start|>user\\n{obs}<|im_end|>\\n<|im_start|>assistant\\n``.
    A turn that stops at the per-turn token limit gets the end-of-turn token appended as a
    template token (not the policy's: response_mask 0)."""
    name: str = "plain"
    # extra apply_chat_template arguments, e.g. (("enable_thinking", False),)
    chat_kwargs: tuple = ()

    def __post_init__(self):
        if self.name not in TEMPLATES:
            raise ValueError(f"unknown turn template {self.name!r}; valid: {list(TEMPLATES)}")

    def first(self, obs: str, tokenizer) -> str:
        if self.name == "plain":
            return f"Question: {obs}\nAnswer:"
        messages = [{"role": "user", "content": obs}]
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 **dict(self.chat_kwargs))
        return f"<|im_start|>user\n{obs}<|im_end|>\n<|im_start|>assistant\n"

    def later(self, obs: str) -> str:
        if self.name == "plain":
            return f"\n{obs}\nAnswer:"
        return f"\n<|im_start|>user\n{obs}<|im_end|>\n<|im_start|>assistant\n"

    def end_of_turn(self, tokenizer) -> int:
        """The token id that ends a policy turn."""
        token = "<|im_end|>" if self.name == "chatml" else None
        tid = tokenizer.token_to_id(token) if token else tokenizer.eos_id
        if tid is None:
            raise ValueError(f"turn template {self.name!r} needs "
                             f"{token or 'an EOS token'} in the tokenizer's vocabulary")
        return int(tid)


@dataclasses.dataclass
class TokenStep:
    """One environment step in token ids: the rendered observation (empty when the episode
    ended), the reward of the turn, whether the episode ended and why, and the env's info."""
    obs_ids: list
    reward: float
    terminated: bool
    truncated: bool
    info: dict


class TokenEnv:
    """A text Environment seen in token ids through a tokenizer and a TurnTemplate."""

    def __init__(self, env: Environment, tokenizer, template: TurnTemplate):
        self.env, self.tokenizer, self.template = env, tokenizer, template
        self.eot = template.end_of_turn(tokenizer)

    def reset(self, seed: int) -> list:
        obs, _ = self.env.reset(seed=int(seed))
        return self.tokenizer.encode(self.template.first(obs, self.tokenizer))

    def step(self, action_ids: Sequence[int], ended: bool = True) -> TokenStep:
        """``action_ids``: the policy's tokens of this turn (its end-of-turn token included when
        it emitted one; ``ended`` False: the turn hit its token limit, the template closes it)."""
        ids = [int(t) for t in action_ids if int(t) != self.eot]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        obs, reward, terminated, truncated, info = self.env.step(text)
        close = [] if ended else [self.eot]
        if terminated or truncated:
            return TokenStep(close, float(reward), bool(terminated), bool(truncated), info)
        return TokenStep(close + self.tokenizer.encode(self.template.later(obs)), float(reward),
                         False, False, info)


# --- native tasks ------------------------------------------------------------------------------

_INT = re.compile(r"-?\d+")


def _first_int(text: str):
    m = _INT.search(text)
    return int(m.group()) if m else None


def _feedback(action: str, target, correct: float):
    """One guess against ``target``: "correct" (reward ``correct``, the episode ends), else
    "higher" / "lower" (the target is higher / lower than the guess's first integer) or
    "invalid" (no integer), reward 0."""
    if target is None:
        raise RuntimeError("step() before reset()")
    guess = _first_int(action)
    if guess == target:
        return "correct", correct, True, False, {"guess": guess}
    obs = "invalid" if guess is None else ("higher" if target > guess else "lower")
    return obs, 0.0, False, False, {"guess": guess}


class GuessTheSum:
    """An arithmetic question (trustrl.data.tasks.arithmetic_example, drawn from the seed),
    answered over turns: a wrong answer gets "higher" / "lower" (the sum is higher / lower than
    it), an answer without a number "invalid"; the right one ends the episode with reward
    ``correct``. Every other turn's reward is 0. Deterministic per seed."""

    def __init__(self, difficulty: int = 2, operations: str = "+", correct: float = 1.0):
        tasks.check_task("arithmetic", difficulty, operations)
        self.difficulty, self.operations, self.correct = difficulty, operations, correct
        self.answer = None

    def reset(self, seed: int | None = None):
        ex = tasks.arithmetic_example(np.random.default_rng(seed), self.difficulty,
                                      self.operations)
        self.answer = int(ex["answer"])
        return ex["prompt"], {"answer": ex["answer"]}

    def step(self, action: str):
        return _feedback(action, self.answer, self.correct)


class GuessTheNumber:
    """Guess a secret integer in [1, high] (drawn from the seed) with "higher" / "lower"
    feedback; reward ``correct`` when found. Deterministic per seed."""

    def __init__(self, high: int = 16, correct: float = 1.0):
        if not isinstance(high, int) or high < 2:
            raise ValueError(f"guess_number: high must be an int >= 2, got {high!r}")
        self.high, self.correct, self.secret = high, correct, None

    def reset(self, seed: int | None = None):
        self.secret = int(np.random.default_rng(seed).integers(1, self.high + 1))
        return (f"Guess my number between 1 and {self.high}.", {})

    def step(self, action: str):
        return _feedback(action, self.secret, self.correct)


def make(env_id: str, **kwargs: Any) -> Environment:
    """An environment by id: "trustrl:<name>" (NATIVE) or a GEM id ("game:Sudoku-v0-easy",
    "rg:arc_1d", ...; needs the optional `envs` extra). Unknown ids raise ValueError naming the
    valid choices."""
    if not isinstance(env_id, str) or ":" not in env_id:
        raise ValueError(f"environment id {env_id!r} must be '<source>:<name>': "
                         f"trustrl:{{{', '.join(NATIVE)}}} or a GEM id (prefixes "
                         f"{', '.join(GEM_PREFIXES)}, e.g. game:Sudoku-v0-easy, rg:arc_1d)")
    source, name = env_id.split(":", 1)
    if source == "trustrl":
        if name == "guess_sum":
            return GuessTheSum(**kwargs)
        if name == "guess_number":
            return GuessTheNumber(**kwargs)
        raise ValueError(f"unknown trustrl environment {name!r}; valid: "
                         f"{['trustrl:' + n for n in NATIVE]}")
    if source in GEM_PREFIXES or source == REASONING_GYM:
        from trustrl.data import gem_env  # the optional `envs` extra: a clear error without it
        return gem_env.make(env_id, **kwargs)
    raise ValueError(f"unknown environment source {source!r} in {env_id!r}; valid: trustrl "
                     f"(native: {list(NATIVE)}), {REASONING_GYM} (reasoning-gym datasets) or "
                     f"GEM's {list(GEM_PREFIXES)}")
