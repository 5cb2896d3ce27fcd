"""Multi-turn rollouts, token-in-token-out, on one KV cache per episode.

Every episode is one row of a jitted decode loop. At each step a row either

    GEN   samples its next token from mu (recorded: log-prob, top-K, response_mask 1), or
    FEED  consumes the next token of its pending observation (the environment's reply, rendered
          with the template's turn markers and encoded once; response_mask 0), or
    WAIT  has ended its turn and waits for the environment (the loop returns to the host), or
    DONE  its episode is over (its columns are padding, never attended).

Both GEN and FEED tokens go through the same one-token model step onto the row's KV cache, so an
observation is appended where the policy stopped and generation continues after it: nothing of
an earlier turn is ever processed again (no re-prefill), and the policy's tokens are never
decoded and re-encoded (TokenEnv decodes them only to give the environment its text). The loop
leaves for the host as soon as one row ends its turn, so a row waits for its environment step
for one loop exit only and the other rows are not held back by it; the host steps the
environments of every waiting row (batched when several ended at the same step), queues their
observations and re-enters the loop on the same cache.

Cache: the prompts are prefilled left-padded into columns [0, P); each loop step writes one
column for all rows. A row that is not DONE is GEN or FEED at every step, so the number of steps
is the longest trajectory, at most ``max_total_tokens``: the cache has P + max_total_tokens
columns. Limits: ``max_turns`` policy turns, ``max_turn_tokens`` policy tokens per turn (the turn
is then closed by the template's end-of-turn token, a template token) and ``max_total_tokens``
trajectory tokens after the prompt (policy and observation together).

Not supported here (errors): a mixture-of-experts rollout that records its routing (R3), and
fewer decode slots than episodes (every episode of a call holds a row until the call ends).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trustrl.core import divergences
from trustrl.rollout import sampler as sampler_lib, trajectory
from trustrl.rollout.sampler import SamplerConfig, check_int

FEED, GEN, WAIT, DONE = range(4)


@dataclasses.dataclass(frozen=True)
class MultiTurnConfig:
    max_turns: int = 4          # policy turns per episode
    max_turn_tokens: int = 16   # policy tokens per turn (its end-of-turn token included)
    max_total_tokens: int = 128  # trajectory tokens after the first prompt (policy + observations)
    min_obs_bucket: int = 8     # observation queues are padded to powers of two from here

    def __post_init__(self):
        for name, low in (("max_turns", 1), ("max_turn_tokens", 1), ("max_total_tokens", 1),
                          ("min_obs_bucket", 1)):
            check_int(name, getattr(self, name), low)


class LoopState(NamedTuple):
    logits: jax.Array     # [B, V] next-token logits of each row
    cache: Any
    key: jax.Array
    step: jax.Array       # scalar: loop steps so far (= cache columns written after the prompt)
    t: jax.Array          # [B] the next trajectory column of each row
    pos: jax.Array        # [B] the RoPE position of its next token
    mode: jax.Array       # [B] FEED / GEN / WAIT / DONE
    turn_len: jax.Array   # [B] policy tokens of the current turn
    turn_end: jax.Array   # [B] why the last turn ended (trajectory.TURN_ENDS index)
    queue: jax.Array      # [B, Q] observation tokens to feed
    qlen: jax.Array       # [B]
    qpos: jax.Array       # [B]
    tokens: jax.Array     # [B, N] trajectory tokens
    mask: jax.Array       # [B, N] 1 on policy tokens
    logp: jax.Array       # [B, N]
    topk_ids: jax.Array   # [B, N, K]
    topk_logp: jax.Array  # [B, N, K]


def _loop(params, s: LoopState, *, model, cfg: SamplerConfig, mt: MultiTurnConfig, eot: int):
    """Steps every row (GEN / FEED) until one ends its turn or none is left."""
    n = s.tokens.shape[1]
    eos = jnp.asarray(sorted({eot, *cfg.eos_ids}), jnp.int32)
    rows = jnp.arange(s.t.shape[0])

    def body(s: LoopState):
        key, sub = jax.random.split(s.key)
        sampled, lp, logp_full = sampler_lib.next_token(s.logits, sub, cfg)
        feed, gen = s.mode == FEED, s.mode == GEN
        queued = jnp.take_along_axis(
            s.queue, jnp.clip(s.qpos, 0, s.queue.shape[1] - 1)[:, None], axis=1)[:, 0]
        tok = jnp.where(feed, queued, jnp.where(gen, sampled, 0))
        active = feed | gen
        col = jnp.where(active, s.t, n)  # out of range: dropped
        put = lambda buf, val: buf.at[rows, col].set(val.astype(buf.dtype), mode="drop")
        state = s._replace(tokens=put(s.tokens, tok), mask=put(s.mask, gen),
                           logp=put(s.logp, jnp.where(gen, lp, 0.0)))
        if cfg.record_topk:
            ids, vals = sampler_lib.record_topk(logp_full, cfg)
            state = state._replace(
                topk_ids=put(s.topk_ids, jnp.where(gen[:, None], ids, 0)),
                topk_logp=put(s.topk_logp, jnp.where(gen[:, None], vals, 0.0)))
        logits, cache = model.decode(params, tok, s.pos, s.cache, active)
        t = s.t + active
        turn_len = s.turn_len + gen
        qpos = s.qpos + feed
        eot_hit = gen & jnp.any(tok[:, None] == eos[None, :], axis=-1)
        full = active & (t >= n)
        capped = gen & (turn_len >= mt.max_turn_tokens)
        ends = gen & (eot_hit | capped) | full
        reason = jnp.where(eot_hit, 0, jnp.where(full, 2, 1))
        mode = jnp.where(ends, WAIT, jnp.where(feed & (qpos >= s.qlen), GEN, s.mode))
        return state._replace(
            logits=jnp.where(active[:, None], logits, s.logits), cache=cache, key=key,
            step=s.step + 1, t=t, pos=s.pos + active, mode=mode, turn_len=turn_len,
            turn_end=jnp.where(ends, reason, s.turn_end), qpos=qpos)

    def cond(s: LoopState):
        live = (s.mode == GEN) | (s.mode == FEED)
        return jnp.any(live) & ~jnp.any(s.mode == WAIT) & (s.step < n)

    return jax.lax.while_loop(cond, body, s)


def _prefill(params, tokens, valid, cache, *, model):
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    return model.prefill(params, tokens, positions, valid, cache)


def obs_bucket(length: int, mt: MultiTurnConfig) -> int:
    return max(mt.min_obs_bucket, 1 << max(0, math.ceil(math.log2(max(length, 1)))))


@dataclasses.dataclass
class Counts:
    """What a call processed: model steps (loop iterations), host round trips, tokens."""
    steps: int = 0
    exits: int = 0
    prefill_tokens: int = 0


class MultiTurnSampler:
    """Runs episodes of token environments (trustrl.data.environments.TokenEnv) with a policy.

    >>> mts = MultiTurnSampler(decode_model, SamplerConfig(record_topk=4), MultiTurnConfig())
    >>> rollout, traj = mts.run(params, [TokenEnv(...) for _ in range(B)], seeds, group_size, key)
    """

    def __init__(self, model, cfg: SamplerConfig, mt: MultiTurnConfig):
        cfg.validate(model.vocab_size)
        if cfg.record_routes:
            raise ValueError("multi-turn rollouts do not record routed experts (R3) yet; set "
                             "record_routes=False")
        if cfg.max_rows:
            raise ValueError("multi-turn rollouts run every episode of a call in its own row "
                             f"(max_rows={cfg.max_rows} is not supported); set max_rows=0")
        self.model, self.cfg, self.mt = model, cfg, mt
        self._prefill = jax.jit(functools.partial(_prefill, model=model), donate_argnums=(3,))
        self._loops = {}
        self.counts = Counts()

    def _loop_fn(self, eot: int):
        if eot not in self._loops:
            self._loops[eot] = jax.jit(functools.partial(
                _loop, model=self.model, cfg=self.cfg, mt=self.mt, eot=eot), donate_argnums=(1,))
        return self._loops[eot]

    def run(self, params, envs: Sequence, seeds: Sequence[int], group_size: int, key):
        """``envs``: one TokenEnv per episode (B = len(seeds) x group_size; the group_size
        episodes of a seed adjacent, each with its own env instance); returns (Rollout,
        trajectory.Trajectories). Every env must share one end-of-turn id."""
        mt, cfg = self.mt, self.cfg
        check_int("group_size", group_size, 1)
        seeds = [int(s) for s in seeds for _ in range(group_size)]
        if len(envs) != len(seeds):
            raise ValueError(f"{len(envs)} environments for {len(seeds)} episodes "
                             f"({len(seeds) // group_size} seeds x group_size={group_size})")
        eots = {e.eot for e in envs}
        if len(eots) != 1:
            raise ValueError(f"the environments end turns with different token ids {eots}")
        eot = eots.pop()
        prompts = sampler_lib.as_prompt_list([e.reset(s) for e, s in zip(envs, seeds)],
                                             self.model.vocab_size, cfg.max_prompt_len)
        b, n, k = len(prompts), mt.max_total_tokens, max(cfg.record_topk, 1)
        width = sampler_lib.prompt_bucket(max(len(p) for p in prompts), cfg)
        toks, valid = sampler_lib.left_pad(prompts, width)
        cache = self.model.init_cache(b, width + n)
        logits, cache = self._prefill(params, jnp.asarray(toks), jnp.asarray(valid), cache)
        self.counts = Counts(prefill_tokens=int(valid.sum()))
        z = lambda *shape, dt=jnp.int32: jnp.zeros(shape, dt)
        # the loop donates its state: the caller's key is not handed in (a derived one is)
        s = LoopState(logits=logits, cache=cache, key=jax.random.fold_in(key, 0),
                      step=jnp.int32(0), t=z(b),
                      pos=jnp.asarray(valid.sum(1), jnp.int32), mode=jnp.full((b,), GEN),
                      turn_len=z(b), turn_end=z(b), queue=z(b, mt.min_obs_bucket),
                      qlen=z(b), qpos=z(b), tokens=z(b, n), mask=z(b, n),
                      logp=z(b, n, dt=jnp.float32), topk_ids=z(b, n, k),
                      topk_logp=z(b, n, k, dt=jnp.float32))
        loop = self._loop_fn(eot)
        rewards = [[] for _ in range(b)]
        starts = [[0] for _ in range(b)]  # trajectory column of each turn's first policy token
        finish = np.full(b, -1, np.int64)
        turn_ends = np.zeros(len(trajectory.TURN_ENDS), np.int64)
        while True:
            s = loop(params, s)
            self.counts.exits += 1
            mode, t, turn_end, tokens, queue, qlen, qpos = jax.device_get(
                (s.mode, s.t, s.turn_end, s.tokens, s.queue, s.qlen, s.qpos))
            waiting = np.flatnonzero(mode == WAIT)
            if waiting.size == 0:
                break
            # rows still feeding an observation keep its rest (moved to the queue's front)
            mode, queues = mode.copy(), {i: queue[i, qpos[i]:qlen[i]].tolist()
                                         for i in np.flatnonzero(mode == FEED)}
            for i in waiting:
                start = starts[i][-1]
                turn_ends[turn_end[i]] += 1
                step = envs[i].step(tokens[i, start:t[i]].tolist(), ended=turn_end[i] == 0)
                rewards[i].append(step.reward)
                obs = step.obs_ids
                if step.terminated or step.truncated:
                    finish[i] = (trajectory.TERMINATED if step.terminated
                                 else trajectory.ENV_TRUNCATED)
                elif len(rewards[i]) >= mt.max_turns:
                    finish[i] = trajectory.MAX_TURNS
                elif t[i] + len(obs) >= n:  # no room for the observation and one policy token
                    finish[i] = trajectory.MAX_TOTAL_TOKENS
                else:
                    queues[i] = obs
                    starts[i].append(int(t[i]) + len(obs))  # the next policy turn's column
                mode[i] = FEED if i in queues else DONE
            q = obs_bucket(max((len(v) for v in queues.values()), default=1), mt)
            waited = np.zeros(b, bool)
            waited[waiting] = True
            queue, qlen = np.zeros((b, q), np.int32), np.zeros(b, np.int32)
            for i, obs in queues.items():
                queue[i, :len(obs)], qlen[i] = obs, len(obs)
            s = s._replace(mode=jnp.asarray(mode), queue=jnp.asarray(queue),
                           qlen=jnp.asarray(qlen), qpos=jnp.zeros(b, jnp.int32),
                           turn_len=jnp.where(jnp.asarray(waited), 0, s.turn_len))
        mode, t = jax.device_get((s.mode, s.t))
        # rows still live when the loop stopped ran out of columns (cannot happen unless a
        # row is live at step n); rows DONE keep their reason
        finish = np.where(finish < 0, trajectory.MAX_TOTAL_TOKENS, finish)
        self.counts.steps = int(s.step)
        out = jax.device_get((s.tokens, s.mask, s.logp, s.topk_ids, s.topk_logp))
        tokens, mask, logp, topk_ids, topk_logp = out
        if cfg.record_topk:
            topk_ids, topk_logp = jax.device_get(divergences.force_sampled(
                jnp.asarray(topk_ids), jnp.asarray(topk_logp), jnp.asarray(tokens),
                jnp.asarray(logp)))
            topk_ids = np.where(mask[..., None] > 0, topk_ids, 0)
            topk_logp = np.where(mask[..., None] > 0, topk_logp, 0.0)
        else:
            topk_ids = topk_logp = None
        turn_index = np.full((b, n), -1, np.int32)  # turn k: its policy tokens + the next obs
        for i in range(b):
            bounds = starts[i][1:] + [int(t[i])]
            lo = 0
            for turn, hi in enumerate(bounds):
                turn_index[i, lo:hi] = turn
                lo = hi
        turn_rewards = np.zeros((b, mt.max_turns), np.float32)
        for i, r in enumerate(rewards):
            turn_rewards[i, :len(r)] = r
        rollout = trajectory.build(prompts, width, tokens, mask, logp, topk_ids, topk_logp,
                                   finish, group_size)
        traj = trajectory.Trajectories(
            turn_index=turn_index, turn_rewards=turn_rewards,
            num_turns=np.asarray([len(r) for r in rewards], np.int32),
            finish=finish.astype(np.int32), seeds=np.asarray(seeds, np.int64),
            turn_ends=turn_ends,
            processed=np.asarray([len(p) for p in prompts], np.int64) + t)
        return rollout, traj
