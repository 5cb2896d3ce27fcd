"""Multi-turn episodes as the trainer's Rollout record, plus their per-turn facts.

One episode is ONE token sequence: the first prompt (left-padded into ``prompt_tokens``, as for a
single-turn rollout) and then every later token in ``response_tokens``: the policy's turns and
the observations between them (rendered with the template's turn markers), in the order the
sampler processed them. The trainer's forward runs on exactly these ids at their positions.

    response_mask   1 only on the policy's tokens (its end-of-turn token included); observation
                    and template tokens are 0: out of the loss, out of every divergence and out
                    of every aggregation denominator (they all read response_mask)
    rollout_logp    mu's log-prob of each policy token (0 elsewhere); the recorded top-K likewise
    finish_reason   FINISH_EOS when the environment ended the episode (terminated), FINISH_LENGTH
                    when a limit did (env truncation, max turns, max total tokens)

``Trajectories`` keeps what the Rollout has no field for: the turn each column belongs to
(``turn_index``: the policy tokens of turn k and the observation that follows them are turn k;
-1 after the end), per-turn rewards, the number of turns, why each episode ended and its seed.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from trustrl.rollout.record import FINISH_EOS, FINISH_LENGTH, Rollout

# why an episode ended (Trajectories.finish)
FINISHES = ("terminated", "env_truncated", "max_turns", "max_total_tokens")
TERMINATED, ENV_TRUNCATED, MAX_TURNS, MAX_TOTAL_TOKENS = range(4)
# why a policy turn ended (Trajectories.turn_ends counts them)
TURN_ENDS = ("end_of_turn", "max_turn_tokens", "max_total_tokens")


@dataclasses.dataclass
class Trajectories:
    """Host-side per-turn facts of B episodes (numpy), rows aligned with their Rollout."""
    turn_index: np.ndarray    # [B, N] int32
    turn_rewards: np.ndarray  # [B, max_turns] float32 (0 for turns not played)
    num_turns: np.ndarray     # [B] int32
    finish: np.ndarray        # [B] int32, index into FINISHES
    seeds: np.ndarray         # [B] int64: the environment seed of each episode
    turn_ends: np.ndarray     # [len(TURN_ENDS)] int64: how the policy turns ended, counted
    processed: np.ndarray     # [B] int64: tokens the model processed for the episode

    @classmethod
    def assemble(cls, turn_index, rewards, max_turns: int, finish, seeds, turn_ends,
                 processed) -> "Trajectories":
        """From a sampler's host bookkeeping: ``rewards`` one list of turn rewards per episode
        (its length the number of turns), the other fields as the dataclass has them."""
        turn_rewards = np.zeros((len(rewards), max_turns), np.float32)
        for i, r in enumerate(rewards):
            turn_rewards[i, :len(r)] = r
        return cls(turn_index=np.asarray(turn_index, np.int32), turn_rewards=turn_rewards,
                   num_turns=np.asarray([len(r) for r in rewards], np.int32),
                   finish=np.asarray(finish).astype(np.int32),
                   seeds=np.asarray(seeds, np.int64), turn_ends=turn_ends,
                   processed=np.asarray(processed, np.int64))

    @property
    def returns(self) -> np.ndarray:
        """[B] float32: the episode return, the sum of its turn rewards."""
        return self.turn_rewards.sum(axis=1).astype(np.float32)

    @property
    def solved(self) -> np.ndarray:
        """[B] bool: the environment ended the episode (terminated) with a positive return."""
        return (self.finish == TERMINATED) & (self.returns > 0)

    def metrics(self, response_mask) -> dict:
        """Turns per episode, tokens per turn, the observation / policy token ratio, how
        episodes and turns ended (shares) and turns to solve (``solved`` episodes)."""
        mask = np.asarray(response_mask) > 0
        policy = mask.sum()
        obs = ((self.turn_index >= 0) & ~mask).sum()
        turns = max(int(self.num_turns.sum()), 1)
        out = {"episode/turns_mean": float(self.num_turns.mean()),
               "episode/tokens_per_turn": float(policy / turns),
               "episode/obs_policy_ratio": float(obs / max(policy, 1)),
               "episode/return_mean": float(self.returns.mean())}
        for i, name in enumerate(FINISHES):
            out[f"episode/finish_{name}"] = float((self.finish == i).mean())
        ends = max(int(self.turn_ends.sum()), 1)
        for i, name in enumerate(TURN_ENDS):
            out[f"episode/turn_end_{name}"] = float(self.turn_ends[i] / ends)
        solved = self.solved  # as the evaluation's: an episode the environment ended in failure
        if solved.any():  # is not solved (left out otherwise, not a NaN in the metrics)
            out["episode/turns_to_solve"] = float(self.num_turns[solved].mean())
        return out


def episode_end(step, turns: int, t: int, obs_len: int, n: int, max_turns: int) -> int:
    """Whether an episode ends after a turn, and why (a FINISHES index; -1: it goes on with the
    observation). ``step``: the turn's TokenStep, ``turns``: turns played (this one included),
    ``t``: trajectory columns used, ``obs_len``: the observation's ids, ``n``: max total
    tokens. The observation must leave room for at least one policy token."""
    if step.terminated or step.truncated:
        return TERMINATED if step.terminated else ENV_TRUNCATED
    if turns >= max_turns:
        return MAX_TURNS
    if t + obs_len >= n:
        return MAX_TOTAL_TOKENS
    return -1


def build(prompts: Sequence[Sequence[int]], width: int, tokens, policy_mask, logp, topk_ids,
          topk_logp, finish, group_size: int) -> Rollout:
    """The Rollout of B episodes from host arrays: ``prompts`` the first prompts (B token lists,
    left-padded to ``width``), ``tokens`` / ``policy_mask`` / ``logp`` [B, N] the trajectory
    after the prompt, ``topk_ids`` / ``topk_logp`` [B, N, K] or None, ``finish`` [B] (FINISHES
    indices). Rows are in groups of ``group_size`` episodes of one seed."""
    b = len(prompts)
    toks = np.zeros((b, width), np.int32)
    pmask = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):  # sampler.left_pad's layout (not imported: layer depth)
        if len(p) > width:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than the width {width}")
        toks[i, width - len(p):] = p
        pmask[i, width - len(p):] = 1
    if b % group_size:
        raise ValueError(f"{b} episodes are not a multiple of group_size={group_size}")
    reason = np.where(np.asarray(finish) == TERMINATED, FINISH_EOS, FINISH_LENGTH)
    as_j = lambda x, dt: None if x is None else jnp.asarray(np.asarray(x, dt))
    return Rollout(prompt_tokens=jnp.asarray(toks), prompt_mask=jnp.asarray(pmask),
                   response_tokens=as_j(tokens, np.int32),
                   response_mask=as_j(policy_mask, np.int32),
                   rollout_logp=as_j(np.where(np.asarray(policy_mask) > 0, logp, 0.0),
                                     np.float32),
                   rollout_topk_ids=as_j(topk_ids, np.int32),
                   rollout_topk_logp=as_j(topk_logp, np.float32),
                   finish_reason=jnp.asarray(reason.astype(np.int32)),
                   group_index=jnp.repeat(jnp.arange(b // group_size, dtype=jnp.int32),
                                          group_size))


def token_advantages(turn_adv, turn_index) -> np.ndarray:
    """Per-turn advantages [B, max_turns] broadcast to the response columns [B, N] by
    ``turn_index`` (0 where it is -1; non-policy columns carry their turn's value, masked out
    by response_mask)."""
    turn_adv, turn_index = np.asarray(turn_adv, np.float32), np.asarray(turn_index)
    idx = np.clip(turn_index, 0, turn_adv.shape[1] - 1)
    return np.where(turn_index >= 0, np.take_along_axis(turn_adv, idx, axis=1),
                    0.0).astype(np.float32)
