"""Environment-driven (multi-turn) RL in the run: episodes instead of prompt -> response.

A run with ``cfg.env.id`` set collects each iteration's batch with trustrl.rollout.multiturn:
``rollout.prompts_per_iter`` environment seeds x ``rollout.group_size`` episodes each, one token
sequence per episode (the policy's turns and the rendered observations between them; only the
policy's tokens in response_mask). Advantages (``env.advantage``):

    episode  the episode return (sum of turn rewards) through ``loss.advantage``'s group
             baseline over the episodes of one seed, on every policy token of the episode
    turn     per turn: the return-to-go from that turn, baseline over the group's episodes that
             played the turn (core.advantages.turn_advantages), on the policy tokens of the turn

Seeds: training episodes draw seeds 0 .. task.num_train - 1 (in the run's shuffled, checkpointed
order); held-out evaluation uses TEST_SEED_OFFSET + 0 .. eval.num_prompts - 1, disjoint from
them. Evaluation plays each held-out seed once greedily (eval/pass@1: the share of episodes the
environment ended as solved, i.e. terminated with a positive return) and eval.k times sampled.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from trustrl.core import advantages as adv_lib
from trustrl.data import environments
from trustrl.infra import multihost, sharding
from trustrl.model import policy
from trustrl.rollout import multiturn, trajectory
from trustrl.training import evaluation

TEST_SEED_OFFSET = 1_000_000_000


def enabled(cfg) -> bool:
    return bool(cfg.get("env", {}).get("id", ""))


def multiturn_config(cfg) -> multiturn.MultiTurnConfig:
    e = cfg.env
    return multiturn.MultiTurnConfig(max_turns=int(e.max_turns),
                                     max_turn_tokens=int(e.max_turn_tokens),
                                     max_total_tokens=int(e.max_total_tokens))


def env_kwargs(cfg) -> dict:
    kw = cfg.env.get("kwargs", None)
    return dict(kw.to_dict() if hasattr(kw, "to_dict") else (kw or {}))


def train_seeds(cfg) -> list[dict]:
    """The training 'examples' of an environment run: {"seed": s} for s < task.num_train (the
    run's PromptIterator shuffles and checkpoints them like prompts)."""
    return [{"seed": s} for s in range(int(cfg.task.num_train))]


@dataclasses.dataclass
class Episodes:
    """The environment side of a run: token environments, the rollout and greedy multi-turn
    samplers, advantages."""
    cfg: Any
    tokenizer: Any
    sampler: multiturn.MultiTurnSampler
    greedy: multiturn.MultiTurnSampler
    template: environments.TurnTemplate
    last: Any = None  # the Trajectories of the last collected batch

    def token_envs(self, n: int) -> list:
        make = lambda: environments.make(self.cfg.env.id, **env_kwargs(self.cfg))
        return [environments.TokenEnv(make(), self.tokenizer, self.template) for _ in range(n)]

    def play(self, params, seeds, group_size, key, greedy=False):
        s = self.greedy if greedy else self.sampler
        return s.run(params, self.token_envs(len(seeds) * group_size), seeds, group_size, key)

    def collect(self, params_roll, prompt_iter, key, mesh):
        """One iteration's episodes: (rollout on the devices, its host copy, the seed examples,
        episode returns [B], metrics, advantages [B] or [B, N])."""
        cfg, g = self.cfg, self.cfg.rollout.group_size
        examples = next(prompt_iter)
        rollout, traj = self.play(params_roll, [ex["seed"] for ex in examples], g, key)
        host = jax.device_get(rollout)
        returns = traj.returns
        if cfg.env.advantage == "turn":
            turn_adv = adv_lib.turn_advantages(traj.turn_rewards, traj.num_turns, g,
                                               cfg.loss.advantage)
            adv = trajectory.token_advantages(turn_adv, traj.turn_index)
        else:
            adv = np.asarray(adv_lib.compute_advantages(returns, g, cfg.loss.advantage),
                             np.float32)
        self.last = traj  # for turn_mismatch after the score pass
        extra = traj.metrics(host.response_mask)
        extra["episode/processed_tokens_mean"] = float(traj.processed.mean())
        r = multihost.to_global(host, jax.tree.map(
            lambda x: sharding.batch_sharding(mesh, x.ndim), host))
        return r, host, examples, returns, extra, adv

    def turn_mismatch(self, trainer_logp, host_rollout) -> dict:
        """Training-inference mismatch per turn of the last collected batch: mean |pi - mu|
        over the policy tokens of turn k (``episode/mismatch_turn{k}``, turns with tokens)."""
        lp = np.asarray(multihost.to_host(trainer_logp), np.float64)
        mu = np.asarray(host_rollout.rollout_logp, np.float64)
        mask = np.asarray(host_rollout.response_mask) > 0
        out = {}
        for k in range(int(self.last.turn_index.max()) + 1):
            sel = mask & (self.last.turn_index == k)
            if sel.any():
                out[f"episode/mismatch_turn{k}"] = float(
                    np.abs(np.exp(lp[sel]) - np.exp(mu[sel])).mean())
        return out

    def evaluate(self, params_roll, key) -> dict:
        """Held-out seeds: greedy (pass@1, turns to solve, return) and, with eval.k > 1,
        eval.k sampled episodes per seed (sampled return, pass@k)."""
        cfg = self.cfg
        seeds = [TEST_SEED_OFFSET + i for i in range(int(cfg.eval.num_prompts))]
        _, traj = self.play(params_roll, seeds, 1, key, greedy=True)
        solved = traj.solved
        out = {"eval/pass@1": float(solved.mean()), "eval/num_prompts": len(seeds),
               "eval/return_mean": float(traj.returns.mean()),
               "eval/turns_mean": float(traj.num_turns.mean())}
        if solved.any():  # left out otherwise (not a NaN in the metrics)
            out["eval/turns_to_solve"] = float(traj.num_turns[solved].mean())
        k = int(cfg.eval.k)
        if k > 1:
            _, st = self.play(params_roll, seeds, k, jax.random.fold_in(key, 1))
            ok = st.solved.reshape(-1, k)
            out[f"eval/pass@{k}"] = evaluation.pass_at_k(ok, k)
            out["eval/sampled_reward_mean"] = float(st.returns.mean())
            out["eval/sampled_reward_se"] = evaluation.standard_error(
                st.returns.reshape(-1, k).mean(1))
        return out


def build(cfg, tokenizer, roll_cfg, sampler_cfg, greedy_cfg, mesh=None) -> Episodes:
    """The Episodes of a run (``sampler_cfg`` / ``greedy_cfg``: the run's SamplerConfigs;
    ``mesh``: the run's, over whose batch axes the samplers' rows and caches are laid out)."""
    if jax.process_count() > 1:
        raise ValueError("env.id (environment episodes) runs in one process: the environments "
                         "step on the host; multi-process runs are not supported yet")
    environments.make(cfg.env.id, **env_kwargs(cfg))  # an unknown id / missing extra: now
    mt = multiturn_config(cfg)
    model = policy.decode_model(roll_cfg)
    template = environments.TurnTemplate(cfg.env.template)
    template.end_of_turn(tokenizer)
    plain = lambda c: dataclasses.replace(c, max_new_tokens=mt.max_total_tokens)
    sh = None if mesh is None else sharding.batch_sharding(mesh)
    return Episodes(cfg=cfg, tokenizer=tokenizer, template=template,
                    sampler=multiturn.MultiTurnSampler(model, plain(sampler_cfg), mt,
                                                       batch_sharding=sh),
                    greedy=multiturn.MultiTurnSampler(model, plain(greedy_cfg), mt,
                                                      batch_sharding=sh))
