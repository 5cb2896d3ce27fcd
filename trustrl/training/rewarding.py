"""An iteration's rewards from its rollout: the task's verifier, or a learned reward model's
shaped score (trustrl.training.rlhf), with rollout.overlong="penalty" applied. Shared by the
loop and the mismatch calibration (trustrl.training.calibration)."""
from __future__ import annotations

import numpy as np

from trustrl.rollout.record import FINISH_LENGTH


def rollout_rewards(env, host_rollout, examples, group_size, cfg, reward=None):
    """(rewards [B] float32, metrics): the task's verifier, or with ``reward`` (RLHF) the
    reward model's shaped score of the decoded responses (trustrl.training.rlhf)."""
    texts = env.decode_responses(host_rollout)
    metrics = {}
    if reward is None:
        answers = [ex["answer"] for ex in examples for _ in range(group_size)]
        rewards = env.score(texts, answers)
    else:
        prompts = [env.prompt_messages(ex) for ex in examples for _ in range(group_size)]
        rewards, metrics = reward(prompts, texts, host_rollout.response_mask.sum(1))
    if cfg.rollout.overlong == "penalty":
        rewards = np.where(host_rollout.finish_reason == FINISH_LENGTH,
                           cfg.rollout.overlong_penalty, rewards)
    return np.asarray(rewards, np.float32), metrics
