"""Which parameters an iteration's rollout runs and where its mu comes from: the mismatch
dial's staleness and ``rollout.mu`` (trustrl.rollout.mismatch) for the loop.

    source = RolloutSource(cfg, run)
    params_roll, metrics = source.start(state)      # each iteration, before sampling
    batch, host_r = source.rescore(batch, host_r)   # rollout.mu="rescored": mu replaced
    source.stepped(state)                           # after every optimizer step
    source.eval_params(params_roll)                 # the current policy's rollout parameters
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from trustrl.infra import multihost, sharding
from trustrl.rollout import mismatch


class RolloutSource:
    """Staleness k > 0 keeps copies of the trainer's parameters of the last k + 1 optimizer
    steps (``mismatch.ParamHistory``; the train step donates the state, so they are copies) and
    rolls out with the oldest: exactly the parameters of k steps earlier once k steps were
    taken, the run's first parameters before. The history is not checkpointed: after a resume
    it refills from the restored parameters (``rollout/staleness`` logs the actual value)."""

    def __init__(self, cfg, run):
        self.run = run
        k = int(mismatch.settings(cfg)["staleness"])
        self.history = mismatch.ParamHistory(k + 1) if k else None
        self.rescored = mismatch.mu_source(cfg) == "rescored"
        self._copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p))
        self._mask = jax.jit(lambda lp, m: jnp.where(m > 0, lp, 0.0).astype(jnp.float32))
        self.src = self._now = None

    def start(self, state):
        """(the rollout's parameters in the rollout dtypes, metrics) of this iteration."""
        metrics = {}
        if self.history is None:
            self.src = state.params
        else:
            if not len(self.history):  # the run's (or the resume's) first parameters
                self.history.push(int(state.step), sharding.cpu_sync(self._copy(state.params)))
            self.src, step = self.history.oldest()
            self._now = self.history.newest()[0]
            metrics["rollout/staleness"] = float(int(state.step) - step)
        return sharding.cpu_sync(self.run.rollout_params(self.src)), metrics

    def stepped(self, state):
        if self.history is not None:
            self.history.push(int(state.step), sharding.cpu_sync(self._copy(state.params)))

    @property
    def reuses_score(self) -> bool:
        """Whether the rescored mu is the score pass's pi_old (staleness 0: same parameters,
        same program), so that pass need not run twice."""
        return self.rescored and self.history is None

    def rescore(self, batch: dict, host_r):
        """rollout.mu="rescored": mu := the trainer's forward (the score program) of the
        rollout's parameters on the sampled tokens, 0 outside the response (as recorded).
        Returns (batch, host rollout) with rollout_logp replaced; unchanged otherwise."""
        if not self.rescored:
            return batch, host_r
        mu = self.run.score(self.run.policy_params(self.src), batch)
        mu = sharding.cpu_sync(self._mask(mu, batch["response_mask"]))
        return {**batch, "rollout_logp": mu}, host_r.replace(rollout_logp=multihost.to_host(mu))

    def eval_params(self, params_roll):
        """The rollout-dtype parameters of the policy at this iteration's start (with staleness,
        not the stale ones the rollout used)."""
        if self.history is None:
            return params_roll
        return sharding.cpu_sync(self.run.rollout_params(self._now))
