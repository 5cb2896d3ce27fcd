"""A task's text side: prompts -> token ids, response ids -> text -> rewards (TaskEnv).

The trainer, the filter and the evaluator see a task only through this object.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from trustrl.data import datasets as data, rewards
from trustrl.infra import multihost
from trustrl.data.tokenizer import Tokenizer


@dataclasses.dataclass
class TaskEnv:
    """Text side of a task: prompts -> token ids, response ids -> text -> rewards."""
    tokenizer: Tokenizer
    task: str
    template: str
    train: Any                     # random-access sequence of example dicts
    test: Any
    correct: float = 1.0
    wrong: float = 0.0

    @property
    def prefix(self) -> str:
        return data.response_prefix(self.template)

    @property
    def correct_threshold(self) -> float:
        return (self.correct + self.wrong) / 2 if self.correct > self.wrong else self.correct

    def prompt_text(self, example) -> str:
        return data.format_prompt(example, self.template, self.tokenizer)

    def prompt_messages(self, example) -> list[dict]:
        """The example's conversation as [{"role", "content"}, ...] (a reward model re-renders
        it with the response as the assistant turn: trustrl.training.rlhf)."""
        return data.prompt_messages(example)

    def encode_prompts(self, examples) -> list[list[int]]:
        return [self.tokenizer.encode(self.prompt_text(ex)) for ex in examples]

    def decode_responses(self, rollout) -> list[str]:
        toks, mask = multihost.to_host((rollout.response_tokens, rollout.response_mask))
        mask = mask.astype(bool)
        return self.tokenizer.decode_batch([t[m].tolist() for t, m in zip(toks, mask)],
                                           skip_special_tokens=True)

    def score(self, texts, answers) -> np.ndarray:
        return rewards.score(self.task, texts, answers, correct=self.correct, wrong=self.wrong,
                             prefix=self.prefix)

    def eval_examples(self, n: int) -> list[dict]:
        return [self.test[i] for i in range(min(n, len(self.test)))]

    def extract_answer(self, text: str):
        return rewards.extract_answer(self.prefix + text)

    def answer_matches(self, answer: str, gold: str) -> bool:
        return bool(rewards.get_reward_fn(self.task)(f"Answer: {answer}", gold))
