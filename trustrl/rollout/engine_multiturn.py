"""Multi-turn episodes through an external engine (vLLM, SGLang, llama.cpp), token-in-token-out.

    client = EngineClient(url, SamplerConfig(eos_ids=(eot, ...), record_topk=K, ...), V, ...)
    rollout, traj = run_episodes(client, [TokenEnv(...) for _ in range(B)], seeds, group_size,
                                 max_turns=4, max_turn_tokens=64, max_total_tokens=512, seed=step)

The same episode record as ``trustrl.rollout.multiturn`` (the in-process sampler on one KV
cache), built with ``trajectory.build``; read that module and ``trajectory`` for the layout.
Turns run in lock-step over the live episodes. Per turn, every live episode's WHOLE token
sequence so far (its first prompt, every earlier policy turn and every observation, as ids)
is the prompt of one ``EngineClient.complete`` row (one request per row, n=1, seed
``row_seed(seed, episode, turn)``; module docstring of engine_client), with
max_tokens = min(max_turn_tokens, the episode's remaining total tokens). The engine's
completion ids, log-probs and top-K are appended as policy tokens (response_mask 1); the
environment's ``TokenEnv.step(completion ids, ended)`` gives the observation ids, appended with
mask 0. Nothing is decoded and re-encoded into the trajectory, and the engine must condition on
exactly these ids: ``complete`` refuses an answer whose prompt_token_ids differ from the ids
sent (a re-tokenising server; engines that return no prompt ids are held to the length in
usage.prompt_tokens).

A turn ends on an EOS id of the client's SamplerConfig (``ended``: the engine stops on exactly
``eos_ids``, which must hold the environments' end-of-turn id ``TokenEnv.eot``; any EOS id ends
the turn, as in the in-process sampler), at max_turn_tokens (the template then closes the turn
with the end-of-turn id as a template token, mask 0) or at max_total_tokens. An episode ends
when the environment terminates or truncates it, after max_turns policy turns, or when its next
observation and one policy token no longer fit in max_total_tokens (its final observation is
then not appended, as in the in-process sampler). Responses are max_total_tokens columns wide.

Trajectories.processed: the tokens the engine processed for the episode, the sum over its turns
of the prompt sent (the whole history) plus the tokens generated: the naive re-prefill count an
engine without prefix caching pays (quadratic in the turns). With prefix caching (vLLM's
automatic prefix caching, SGLang's radix cache, llama.cpp's cache_prompt) the engine computes
only the new suffix of each prompt; the in-process sampler's count is len(prompt) + columns.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from trustrl.rollout import trajectory
from trustrl.rollout.engine_client import EngineClient, row_seed
from trustrl.rollout.record import Rollout
from trustrl.rollout.sampler import as_prompt_list, check_int, prompt_bucket


def _end_of_turn(envs: Sequence, client: EngineClient) -> int:
    """The environments' common end-of-turn id, checked against the client's eos_ids."""
    eots = {int(e.eot) for e in envs}
    if len(eots) != 1:
        raise ValueError(f"the token environments end turns with different ids {sorted(eots)}; "
                         "give every episode the same tokenizer and TurnTemplate")
    eot = eots.pop()
    if eot not in client.cfg.eos_ids:
        raise ValueError(
            f"the token environments end a turn with id {eot} (TokenEnv.eot) but the client's "
            f"SamplerConfig.eos_ids are {list(client.cfg.eos_ids)}: the engine stops on exactly "
            "eos_ids (vLLM / SGLang stop_token_ids; llama.cpp its own end-of-generation set), "
            f"so no turn would end on its end-of-turn token; add {eot} to eos_ids")
    return eot


def run_episodes(client: EngineClient, token_envs: Sequence, seeds: Sequence[int],
                 group_size: int, *, max_turns: int, max_turn_tokens: int,
                 max_total_tokens: int, seed: int | None = 0
                 ) -> tuple[Rollout, trajectory.Trajectories]:
    """Runs B = len(seeds) x group_size episodes through ``client``'s engine (module docstring).

    token_envs: one ``trustrl.data.environments.TokenEnv`` per episode (its own instance), the
      group_size episodes of a seed adjacent; seeds: one environment seed per group;
    max_turns / max_turn_tokens / max_total_tokens: the limits (MultiTurnConfig's meaning);
    seed: the engine's sampling seed of the call (e.g. the training step; each episode and
      turn gets ``row_seed(seed, episode, turn)``), None: the engine's own randomness.
    Returns (Rollout, trajectory.Trajectories), rows aligned."""
    check_int("group_size", group_size, 1)
    for name, value in (("max_turns", max_turns), ("max_turn_tokens", max_turn_tokens),
                        ("max_total_tokens", max_total_tokens)):
        check_int(name, value, 1)
    if seed is not None:
        check_int("seed", seed, 0)
    if not isinstance(client, EngineClient):
        raise TypeError(f"client must be an engine_client.EngineClient, got "
                        f"{type(client).__name__}")
    cfg = client.cfg
    ep_seeds = [int(s) for s in seeds for _ in range(group_size)]
    if len(token_envs) != len(ep_seeds):
        raise ValueError(f"{len(token_envs)} token environments for {len(ep_seeds)} episodes "
                         f"({len(ep_seeds) // group_size} seeds x group_size={group_size}): "
                         "give one TokenEnv instance per episode")
    _end_of_turn(token_envs, client)
    prompts = as_prompt_list([e.reset(s) for e, s in zip(token_envs, ep_seeds)],
                             client.vocab_size, cfg.max_prompt_len)
    b, n = len(prompts), max_total_tokens
    longest = max(len(p) for p in prompts)
    if longest + n - 1 > cfg.max_prompt_len:
        raise ValueError(f"the last turn's prompt can hold {longest} + {n - 1} = {longest + n - 1}"
                         f" ids (the longest first prompt + max_total_tokens - 1), more than "
                         f"SamplerConfig.max_prompt_len={cfg.max_prompt_len}; raise it (the "
                         "engine's context must hold them too) or lower max_total_tokens")
    k = cfg.record_topk
    tokens = np.zeros((b, n), np.int32)
    mask = np.zeros((b, n), np.int32)
    logp = np.zeros((b, n), np.float32)
    topk_ids = np.zeros((b, n, max(k, 1)), np.int32)
    topk_logp = np.zeros((b, n, max(k, 1)), np.float32)
    turn_index = np.full((b, n), -1, np.int32)
    history = [[int(t) for t in p] for p in prompts]  # what the engine is sent next
    t = np.zeros(b, np.int64)  # trajectory columns used
    processed = np.zeros(b, np.int64)
    rewards: list[list[float]] = [[] for _ in range(b)]
    finish = np.full(b, -1, np.int64)
    turn_ends = np.zeros(len(trajectory.TURN_ENDS), np.int64)
    live = list(range(b))
    while live:
        limits = [int(min(max_turn_tokens, n - t[i])) for i in live]
        row_seeds = (None if seed is None else
                     [row_seed(seed, i, len(rewards[i])) for i in live])
        outs = client.complete([history[i] for i in live], limits, seeds=row_seeds)
        still = []
        for i, c in zip(live, outs):
            turn, lo, m = len(rewards[i]), int(t[i]), len(c.ids)
            tokens[i, lo:lo + m], mask[i, lo:lo + m], logp[i, lo:lo + m] = c.ids, 1, c.logp
            if k:
                topk_ids[i, lo:lo + m], topk_logp[i, lo:lo + m] = c.topk_ids, c.topk_logp
            turn_index[i, lo:lo + m] = turn
            processed[i] += len(history[i]) + m
            history[i].extend(int(x) for x in c.ids)
            t[i] += m
            turn_ends[0 if c.eos else (2 if t[i] >= n else 1)] += 1
            step = token_envs[i].step(c.ids.tolist(), ended=c.eos)
            rewards[i].append(float(step.reward))
            obs = [int(x) for x in step.obs_ids]
            finish[i] = trajectory.episode_end(step, len(rewards[i]), int(t[i]), len(obs), n,
                                               max_turns)
            if finish[i] < 0:
                lo = int(t[i])
                tokens[i, lo:lo + len(obs)] = obs
                turn_index[i, lo:lo + len(obs)] = turn
                history[i].extend(obs)
                t[i] += len(obs)
                still.append(i)
        live = still
    width = prompt_bucket(longest, cfg)
    rollout = trajectory.build(prompts, width, tokens, mask, logp, topk_ids if k else None,
                               topk_logp if k else None, finish, group_size)
    traj = trajectory.Trajectories.assemble(turn_index, rewards, max_turns, finish, ep_seeds,
                                            turn_ends, processed)
    return rollout, traj
